"""Registry of supported model classes and the apply / remove entry points."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping

import torch

from .. import compat
from ..config import AIMConfig
from ..stats import AIMStats
from ..context import call_options
from ..families import Family, all_families, family_for_model_type
from .base import Controller, as_config, multimodal_of

logger = logging.getLogger(__name__)


def supported_models() -> tuple[str, ...]:
    """The transformers classes aim patches (``*ForConditionalGeneration`` and their ``*Model``)."""
    return tuple(name for family in all_families() for name in family.class_names)


SUPPORTED_MODELS: tuple[str, ...] = supported_models()


def family_for(model: torch.nn.Module) -> Family:
    """The family of a model instance (by its config's ``model_type``), or a clear error listing
    what is supported."""
    name = type(model).__name__
    family = family_for_model_type(getattr(getattr(model, "config", None), "model_type", ""))
    if family is None or name not in family.class_names:
        raise TypeError(f"AIM does not support {name}. Supported transformers classes: {', '.join(supported_models())}")
    return family


def apply_aim(
    model: torch.nn.Module,
    config: AIMConfig | Mapping | None = None,
    *,
    budget: float | None = None,
    budget_ms: float | None = None,
    budget_quantile: float | None = None,
    profile=None,
    interpolate_keeps: bool = True,
    **overrides,
) -> torch.nn.Module:
    """Patch `model` in place so visual tokens are merged before the LLM and pruned inside it.

    Args:
        model: a loaded transformers model of a supported class (see `SUPPORTED_MODELS`).
        config: an `AIMConfig` or a dict of its fields; default: the paper's settings.
        budget: instead of a fixed config, a budget per prefill as a fraction of the unchanged
            model's LLM prefill FLOPs: each call runs the most faithful calibrated setting (or
            merge keep fraction between two, see `interpolate_keeps`) whose cost for that input
            fits (`aim.budget`). Needs a profile.
        budget_ms: the same with a prefill latency budget in milliseconds (time to first token).
        budget_quantile: the share of prefills a latency budget should hold for (default 0.9),
            from the measured spread of this machine's prefill times; 0.5 targets the typical time.
        profile: an `aim.budget.Profile` or the path of one (``aim calibrate``); default: the
            ``aim_profile.json`` saved beside the model's weights (the default model ships one).
            Given alone, it enables per-call budgets (``generate(..., aim_budget=0.3)``).
        interpolate_keeps: with a budget, also run merge keep fractions between the calibrated
            ones, their fidelity interpolated between the calibrated neighbours (default; see
            `aim.budget.curves`); False runs calibrated settings only.
        **overrides: fields of `AIMConfig` to change, e.g. ``merge_keep=0.25, prune_start=14``.

    Applying again re-configures the existing patch (never patches twice). A single call can use
    another setting with ``model.generate(..., aim_config=...)`` or `settings`.
    Returns the same model, for chaining.
    """
    family = family_for(model)
    compat.warn_if_untested()
    from .wrappers import budget_from

    chosen_budget = budget_from(budget, budget_ms, budget_quantile)
    if chosen_budget is not None and (config is not None or overrides):
        raise ValueError("give apply_aim either a config (or AIM options) or a budget, not both")
    config = as_config(config) or AIMConfig()
    if overrides:
        config = config.replace(**overrides)
    selector = (_selector(model, profile, interpolate_keeps)
                if (profile is not None or chosen_budget is not None) else None)
    controller: Controller | None = getattr(multimodal_of(model), "_aim", None)
    if controller is not None:
        if controller.owner is not model:
            raise ValueError(_other_owner(model, controller))
        controller.configure(config)
        logger.info("AIM re-configured on %s: %s", type(model).__name__, config)
    else:
        controller = Controller(model, family, config)
        controller.install()
        for holder in {id(model): model, id(controller.multimodal): controller.multimodal}.values():
            holder._aim = controller
        logger.info("AIM applied to %s: %s", type(model).__name__, config)
    if selector is not None:
        controller.selector = selector
    controller.budget = chosen_budget
    return model


def _selector(model: torch.nn.Module, profile, interpolate_keeps: bool = True):
    """A budget selector for `model` from `profile` (a Profile, a path, or None: beside the weights)."""
    from pathlib import Path

    from ..budget import PROFILE_FILE, Profile, Selector
    from ..flops import load_model

    if profile is None:
        folder = Path(str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")))
        if not (folder / PROFILE_FILE).is_file():
            raise ValueError(
                f"no calibration profile for this model ({PROFILE_FILE} not found beside its weights in "
                f"'{folder}'); make one with `aim calibrate MODEL_PATH --out profile.json` and pass profile=..."
            )
        profile = folder / PROFILE_FILE
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    profile.check_model(model.config)
    return Selector(profile, load_model(model.config), interpolate=interpolate_keeps)


def remove_aim(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_aim`: the model's methods are exactly the ones it had before."""
    controller = _controller_of(model)
    controller.remove()
    for holder in {id(model): model, id(controller.multimodal): controller.multimodal}.values():
        del holder._aim
    return model


def is_applied(model: torch.nn.Module) -> bool:
    """Whether `apply_aim` is in effect on `model` (applied to it, or to the model that holds it)."""
    return getattr(model, "_aim", None) is not None


def _other_owner(model: torch.nn.Module, controller: Controller) -> str:
    inner = controller.multimodal
    applied_to = "the model that holds this one" if controller.owner is not inner else "its inner model (`.model`)"
    return (
        f"AIM is applied to {applied_to}, a {type(controller.owner).__name__}, not to this "
        f"{type(model).__name__}: call apply_aim / remove_aim / settings on that one"
    )


def _controller_of(model: torch.nn.Module) -> Controller:
    controller: Controller | None = getattr(multimodal_of(model), "_aim", None)
    if controller is None:
        raise ValueError(f"AIM is not applied to this {type(model).__name__}; call apply_aim(model) first")
    if controller.owner is not model:
        raise ValueError(_other_owner(model, controller))
    return controller


def last_stats(model: torch.nn.Module) -> AIMStats | None:
    """Token counts of the last prefill this thread ran on `model` under AIM (None before the first)."""
    return _controller_of(model).last_stats()


@contextlib.contextmanager
def settings(model: torch.nn.Module, config: AIMConfig | Mapping | None = None, **overrides) -> Iterator[None]:
    """Within the block, calls of `model` from this thread use another AIM setting; other threads
    keep theirs. ``config`` (an `AIMConfig`, or a dict of changes) and ``overrides`` apply on top of
    the config in effect (the model's, or an enclosing block's)::

        with aim.settings(model, merge_keep=0.5, prune=False):
            model.generate(**inputs)
    """
    controller = _controller_of(model)
    chosen = as_config(config, base=controller.config_in_effect()) or controller.config_in_effect()
    if overrides:
        chosen = chosen.replace(**overrides)
    with call_options(controller, config=controller.checked(chosen)):
        yield


@contextlib.contextmanager
def recording_positions(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, prefills of `model` from this thread record which visual tokens each
    stage kept (`AIMStats.kept_visual_positions`; see `aim.visualize`)."""
    with call_options(_controller_of(model), record_positions=True):
        yield
