"""Choose between the torch references and the Triton kernels.

CUDA tensors use the Triton kernels when triton is importable; everything else
uses the torch references in `aim.merge` / `aim.prune`. ``AIM_BACKEND=torch`` or
``AIM_BACKEND=triton`` forces one path. `aim.merge.best_match` and
`aim.prune.pagerank_importance` ask here; this module imports neither.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .optional import require

BACKENDS = ("auto", "torch", "triton")


def backend_for(tensor: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for a tensor, honouring ``AIM_BACKEND``."""
    choice = os.environ.get("AIM_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"AIM_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if tensor.is_cuda and _triton_available() else "torch"
    if choice == "triton":
        require("triton", "AIM_BACKEND=triton")
    return choice


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
