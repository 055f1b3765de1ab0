"""Choose between the torch references and the Triton kernels.

CUDA tensors use the Triton kernels when triton is importable; everything else
uses the torch references in `aim.merge` / `aim.prune`. ``AIM_BACKEND=torch`` or
``AIM_BACKEND=triton`` forces one path.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .merge import best_match_reference
from .optional import require
from .prune import pagerank_importance_reference

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


def best_match(set_a: torch.Tensor, set_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in `set_b` for each token of `set_a` (see `best_match_reference`)."""
    if backend_for(set_a) == "triton":
        from .kernels.matching import best_match_triton

        return best_match_triton(set_a, set_b)
    return best_match_reference(set_a, set_b)


def pagerank_importance(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, tau: float = 0.1, iterations: int = 5
) -> torch.Tensor:
    """PageRank importance (see `pagerank_importance_reference`)."""
    if backend_for(query) == "triton":
        from .kernels.importance import pagerank_importance_triton

        return pagerank_importance_triton(query, key, valid, tau=tau, iterations=iterations)
    return pagerank_importance_reference(query, key, valid, tau=tau, iterations=iterations)
