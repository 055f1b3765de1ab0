"""aim: training-free visual token merging and pruning for multimodal LLMs (AIM, arXiv 2412.03248).

    from aim import apply_aim
    apply_aim(model)                       # paper defaults
    apply_aim(model, merge_keep=0.25, prune_start=14, prune_step=0.125)
"""

from .config import AIMConfig
from .patch import SUPPORTED_MODELS, apply_aim, is_applied, last_stats, remove_aim, settings
from .stats import AIMStats

__all__ = ["AIMConfig", "AIMStats", "SUPPORTED_MODELS", "apply_aim", "remove_aim", "is_applied", "last_stats", "settings"]
__version__ = "0.1.0"
