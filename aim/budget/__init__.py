"""Budget-driven inference: give a compute or latency budget, aim runs the setting that keeps the
most fidelity within it.

- `calibrate` measures every candidate configuration (`config_space`) on unlabeled inputs and
  returns a `Profile` (fidelity, cost, latency model of this machine, Pareto frontier).
- ``apply_aim(model, budget=0.3, profile=...)`` / ``budget_ms=250``, or per request
  ``model.generate(..., aim_budget=0.3)`` / ``aim_budget_ms=250``: the engine predicts each
  frontier point's cost for the input at hand and runs the most faithful one that fits, or a
  merge keep fraction between two calibrated ones when its interpolated fidelity is higher
  (`Selector`, `aim.budget.curves`), correcting latency predictions under load and holding a
  latency budget for 90% of prefills (`LoadTracker`).
"""

from __future__ import annotations

import importlib

# name -> submodule; imported on first use so that `aim --help` / `aim flops` need no torch
_EXPORTS = {
    "calibrate": "calibration",
    "PROFILE_FILE": "profile", "Fidelity": "profile", "LatencyModel": "profile", "Point": "profile", "Profile": "profile",
    "model_fingerprint": "profile", "monotone_fidelity": "profile", "pareto_frontier": "profile",
    "Budget": "select", "Choice": "select", "LoadTracker": "load", "Selector": "select",
    "Candidate": "space", "config_space": "space",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
