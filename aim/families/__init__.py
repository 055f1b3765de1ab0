"""One home per model family, keyed by the HF config's ``model_type``.

Each module here describes one family completely: its transformers classes, how its visual
features split into merge groups (frames / crops), how its rotary positions are read, its facts
for the FLOPs model, and how to build a tiny random-weight model of it for tests. The engine and
the FLOPs model have no family-specific branches; they ask the family.

Adding a family is one new module in this package that defines ``FAMILIES = (MyFamily(),)``
(found automatically), plus tests: see "Adding a model" in the README. Importing this package
does not import torch: the FLOPs report runs without it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable

from .base import Family

__all__ = ["Family", "all_families", "family_for_model_type", "family_for_class"]

_REGISTRY: dict[str, Family] | None = None


def _discover() -> dict[str, Family]:
    registry: dict[str, Family] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name == "base":
            continue
        for family in getattr(importlib.import_module(f"{__name__}.{module.name}"), "FAMILIES", ()):
            if family.model_type in registry:
                raise RuntimeError(f"two families claim model_type {family.model_type!r}")
            family.module = f"aim/families/{module.name}.py"
            registry[family.model_type] = family
    return registry


def all_families() -> Iterable[Family]:
    """Every supported family, in a stable order."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _discover()
    return tuple(_REGISTRY[name] for name in sorted(_REGISTRY))


def register(family: Family) -> Family:
    """Add a family at run time (tests, or a family kept outside this package)."""
    all_families()
    assert _REGISTRY is not None
    if family.model_type in _REGISTRY:
        raise ValueError(f"a family for model_type {family.model_type!r} is registered already")
    _REGISTRY[family.model_type] = family
    return family


def unregister(model_type: str) -> None:
    all_families()
    assert _REGISTRY is not None
    _REGISTRY.pop(model_type, None)


def family_for_model_type(model_type: str) -> Family | None:
    return {f.model_type: f for f in all_families()}.get(model_type)


def family_for_class(class_name: str) -> Family | None:
    return next((f for f in all_families() if class_name in f.class_names), None)
