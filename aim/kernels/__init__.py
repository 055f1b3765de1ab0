"""Triton kernels for AIM (GPU), each with the torch reference in ``aim`` as its contract.

- ``best_match_triton``: fused cosine best-match for token merging (``aim.merge.best_match_reference``).
- ``pagerank_importance_triton``: O(N)-memory PageRank importance (``aim.prune.pagerank_importance_reference``).

``aim`` imports the submodules lazily (``aim.dispatch``), and this package itself imports
nothing until one of the two names is asked for: importing it must not pull in triton or define
the kernels (the Triton interpreter, ``TRITON_INTERPRET=1``, only takes effect when it is set
before triton is imported). The kernels live inside ``aim``: a top-level ``kernels`` package is
claimed by other distributions too (the hub's ``kernels``, ``sparsevlm``). ``common`` holds what
every kernel checks before it launches.
"""

from __future__ import annotations

import importlib

__all__ = ["best_match_triton", "pagerank_importance_triton"]

_WHERE = {"best_match_triton": ".matching", "pagerank_importance_triton": ".importance"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
