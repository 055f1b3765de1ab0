"""Integrations of aim with evaluation frameworks (lmms-eval: `aim.integrations.lmms_eval`)."""
