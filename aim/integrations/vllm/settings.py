"""The merge setting of a vLLM deployment, read from the model's (overridden) HF config."""

from __future__ import annotations

import logging
from typing import Any

from ...config import AIMConfig

logger = logging.getLogger(__name__)

KEEP_KEY = "aim_merge_keep"  # hf_overrides={"aim_merge_keep": 0.25}: merging on, halving steps
SCHEDULE_KEY = "aim_merge_schedule"  # or explicit cumulative keep fractions, e.g. [0.5, 0.25]
POSITIONS_KEY = "aim_merged_positions"  # "contiguous" (default) or "destination" (Qwen2.5-VL)
POSITION_RULES = ("contiguous", "destination")


def merge_schedule(hf_config: Any) -> tuple[float, ...]:
    """The deployment's cumulative merge keep fractions; empty when aim's merging is off.

    The same validation as `aim.AIMConfig` (an impossible fraction or step is a clear error)."""
    keep = getattr(hf_config, KEEP_KEY, None)
    schedule = getattr(hf_config, SCHEDULE_KEY, None)
    if keep is not None and schedule is not None:
        raise ValueError(f"give either {KEEP_KEY} or {SCHEDULE_KEY} in hf_overrides, not both")
    if keep is None and schedule is None:
        return ()
    try:
        config = AIMConfig(merge_keep=float(keep)) if keep is not None else AIMConfig(merge_schedule=tuple(schedule))
    except (TypeError, ValueError) as error:
        raise ValueError(f"aim's vLLM plugin: bad merge setting in hf_overrides: {error}") from None
    return config.merge_schedule if any(k < 1.0 for k in config.merge_schedule) else ()


def position_rule(hf_config: Any, family: str, destination_supported: bool) -> str:
    """The deployment's position rule for merged tokens (``aim_merged_positions``).

    ``"contiguous"`` (the default): merged tokens are numbered on without gaps, which vLLM can fix
    when the prompt arrives. ``"destination"``: each merged token keeps its destination's position,
    as `apply_aim`'s default does; vLLM can only renumber after encoding through its pruning
    interface, which `family` must implement (Qwen2.5-VL does), else a clear error."""
    rule = getattr(hf_config, POSITIONS_KEY, None) or "contiguous"
    if rule not in POSITION_RULES:
        raise ValueError(f"aim's vLLM plugin: {POSITIONS_KEY} must be one of {POSITION_RULES}, got {rule!r}")
    if rule == "destination" and not destination_supported:
        raise ValueError(
            f"aim's vLLM plugin: {POSITIONS_KEY}='destination' needs vLLM to renumber positions after the "
            f"encoder ran (its multimodal pruning interface), which vLLM's {family} does not offer; "
            "use 'contiguous' (the default) or a Qwen2.5-VL model"
        )
    return rule


def check_count(kind: str, produced: int, expected: int) -> None:
    """vLLM slices embeddings to the placeholders without a word: refuse any disagreement."""
    if produced != expected:
        raise RuntimeError(
            f"aim's vLLM plugin: the encoder returned {produced} merged {kind} embeddings but the prompt "
            f"holds {expected} placeholders for it; this vLLM release may process {kind}s differently"
        )
