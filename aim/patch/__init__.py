"""Registry of supported model classes and the apply / remove entry points."""

from __future__ import annotations

import logging

import torch

from .. import compat
from ..config import AIMConfig
from ..stats import AIMStats
from .base import Controller, Family
from .llava import LlavaFamily
from .llava_next import LlavaNextFamily
from .llava_next_video import LlavaNextVideoFamily
from .llava_onevision import LlavaOnevisionFamily
from .qwen2_vl import Qwen2VLFamily

logger = logging.getLogger(__name__)

FAMILIES: tuple[Family, ...] = (
    LlavaFamily(),
    LlavaNextFamily(),
    LlavaNextVideoFamily(),
    LlavaOnevisionFamily(),
    Qwen2VLFamily(),
)
REGISTRY: dict[str, Family] = {name: family for family in FAMILIES for name in family.class_names}
SUPPORTED_MODELS: tuple[str, ...] = tuple(REGISTRY)


def family_for(model: torch.nn.Module) -> Family:
    """The family of a model instance, or a clear error listing what is supported."""
    name = type(model).__name__
    if name not in REGISTRY:
        raise TypeError(
            f"AIM does not support {name}. Supported transformers classes: {', '.join(SUPPORTED_MODELS)}"
        )
    return REGISTRY[name]


def apply_aim(model: torch.nn.Module, config: AIMConfig | None = None, **overrides) -> torch.nn.Module:
    """Patch `model` in place so visual tokens are merged before the LLM and pruned inside it.

    Args:
        model: a loaded transformers model of a supported class (see `SUPPORTED_MODELS`).
        config: an `AIMConfig`; default: the paper's settings.
        **overrides: fields of `AIMConfig` to change, e.g. ``merge_keep=0.25, prune_start=14``.

    Applying again re-configures the existing patch (never patches twice).
    Returns the same model, for chaining.
    """
    family = family_for(model)
    compat.warn_if_untested()
    config = (config or AIMConfig()).replace(**overrides) if overrides else (config or AIMConfig())
    controller: Controller | None = getattr(model, "_aim", None)
    if controller is not None:
        controller.configure(config)
        logger.info("AIM re-configured on %s: %s", type(model).__name__, config)
        return model
    controller = Controller(model, family, config)
    controller.install()
    model._aim = controller
    logger.info("AIM applied to %s: %s", type(model).__name__, config)
    return model


def remove_aim(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_aim`: the model's methods are exactly the ones it had before."""
    controller: Controller | None = getattr(model, "_aim", None)
    if controller is None:
        raise ValueError(f"AIM is not applied to this {type(model).__name__}")
    controller.remove()
    del model._aim
    return model


def is_applied(model: torch.nn.Module) -> bool:
    """Whether `apply_aim` is in effect on `model`."""
    return getattr(model, "_aim", None) is not None


def _controller_of(model: torch.nn.Module) -> Controller:
    controller: Controller | None = getattr(model, "_aim", None)
    if controller is None:
        raise ValueError(f"AIM is not applied to this {type(model).__name__}; call apply_aim(model) first")
    return controller


def last_stats(model: torch.nn.Module) -> AIMStats | None:
    """Token counts of the model's last prefill under AIM (None before the first)."""
    return _controller_of(model).last_stats
