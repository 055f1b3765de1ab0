"""aim: training-free visual token merging and pruning for multimodal LLMs (AIM, arXiv 2412.03248).

    from aim import apply_aim
    apply_aim(model)                       # paper defaults
    apply_aim(model, merge_keep=0.25, prune_start=14, prune_step=0.125)

The patching API (and torch with it) loads on first use, so ``aim.flops`` and ``aim flops``
run without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import AIMConfig

if TYPE_CHECKING:  # pragma: no cover
    from .patch import SUPPORTED_MODELS, apply_aim, is_applied, last_stats, remove_aim, settings
    from .stats import AIMStats

__all__ = ["AIMConfig", "AIMStats", "SUPPORTED_MODELS", "apply_aim", "remove_aim", "is_applied", "last_stats", "settings"]
__version__ = "0.1.0"

_LAZY = {name: ".patch" for name in ("SUPPORTED_MODELS", "apply_aim", "remove_aim", "is_applied", "last_stats", "settings")}
_LAZY["AIMStats"] = ".stats"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
