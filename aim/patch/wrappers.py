"""The patched callables: the multimodal forward, ``generate`` and the feature functions.

Each is a small object holding its controller and the original (so ``copy.deepcopy`` patches the
copy); per-call state goes down the call as a value (`aim.context`), never onto these objects.
Written for transformers 5.21-5.24 (see `aim.patch.base`).
"""

from __future__ import annotations

import contextvars
import inspect
import time
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from ..config import AIMConfig
from ..context import CallState, call_options, current_call, options_for, running
from ..speculative import (current_run, forward_prompt_then_drafted, generate_with_draft, note_target_forward,
                           prompt_split)

if TYPE_CHECKING:  # the controller imports these wrappers
    from .base import Controller


class MultimodalForward:
    """The multimodal model's forward while patched: runs the original inside a new `CallState`.

    Takes ``aim_config=`` (an `AIMConfig` or a dict of its fields) for this call only."""

    def __init__(self, controller: Controller, original: Callable) -> None:
        self.controller = controller
        self.original = original
        self.signature = inspect.signature(original)  # read once: __call__ runs on every forward
        self.__wrapped__ = original  # inspect.signature and generate() see the original's arguments

    def __call__(self, *args, **kwargs):
        controller = self.controller
        if args and current_run(controller) is not None:  # generate passes keywords; a caller may not
            kwargs, args = self._as_keywords(args, kwargs), ()
        if (split := prompt_split(controller, kwargs)) is not None:
            return forward_prompt_then_drafted(self, split, kwargs)
        options = options_for(controller)
        given = kwargs.pop("aim_config", None)
        budget = budget_from(kwargs.pop("aim_budget", None), kwargs.pop("aim_budget_ms", None),
                             kwargs.pop("aim_budget_quantile", None))
        config = controller.per_call(given) if given is not None else controller.config_in_effect()
        call = self.signature.bind_partial(*args, **kwargs)
        state = CallState(owner=controller, config=config, input_ids=call.arguments.get("input_ids"),
                          record_positions=options.record_positions,
                          budget=None if given is not None else controller.budget_in_effect(budget))
        if state.budget is not None:
            controller.require_selector()
        # features encoded before the forward (generate() does this) arrive as mm_encoder_outputs
        for modality, output in (call.arguments.get("mm_encoder_outputs") or {}).items():
            if modality in state.recording and output is not None:
                state.recording[modality].append(output)
        clock = controller.selector.clock if controller.selector is not None else time.perf_counter
        start = clock()
        started = time.perf_counter()
        with running(state):
            output = self.original(*args, **kwargs)
        note_target_forward(controller, started)
        if state.choice is not None and state.stats is not None:
            measured = clock() - start
            choice = state.choice
            controller.selector.load.observe(measured, choice.predicted_seconds / choice.load_factor)
            state.stats.budget = {
                "budget": choice.budget.describe(), "point": choice.point, "config": choice.config,
                "predicted_flops_fraction": choice.predicted_flops_fraction,
                "predicted_seconds": choice.predicted_seconds, "load_factor": choice.load_factor,
                "margin": choice.margin,
                "measured_seconds": measured,
            }
        if state.stats is not None:
            controller.remember(state.stats)
        return output


    def _as_keywords(self, args: tuple, kwargs: dict) -> dict:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        var_keyword = [n for n, p in self.signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
        extra = bound.pop(var_keyword[0], {}) if var_keyword else {}
        return {**bound, **extra}


class Generate:
    """``generate`` while patched: takes ``aim_config=`` for this generation only (generate()
    itself refuses arguments its model's forward does not name)."""

    def __init__(self, controller: Controller, original: Callable) -> None:
        self.controller = controller
        self.original = original
        self.__wrapped__ = original

    def __call__(self, *args, aim_config: AIMConfig | Mapping | None = None, aim_budget: float | None = None,
                 aim_budget_ms: float | None = None, aim_budget_quantile: float | None = None,
                 aim_draft: torch.nn.Module | None = None, aim_draft_tokens: int | None = None, **kwargs):
        budget = budget_from(aim_budget, aim_budget_ms, aim_budget_quantile)
        if aim_config is not None and budget is not None:
            raise ValueError("give a call either aim_config or a budget (aim_budget / aim_budget_ms), not both")
        if aim_draft_tokens is not None and aim_draft is None:
            raise ValueError("aim_draft_tokens sets how many tokens the draft proposes: give aim_draft too")
        def run(*a, **k):
            if aim_draft is None:
                return self.original(*a, **k)
            # speculative decoding with a text-only draft (aim.speculative)
            return generate_with_draft(self.controller, self.original, a, k, aim_draft, aim_draft_tokens)
        if aim_config is None and budget is None:
            return run(*args, **kwargs)
        if budget is not None:
            with call_options(self.controller, budget=budget, config=None):
                return run(*args, **kwargs)
        with call_options(self.controller, config=self.controller.per_call(aim_config), budget=None):
            return run(*args, **kwargs)


def budget_from(flops: float | None, ms: float | None, quantile: float | None = None):
    """An `aim.budget.Budget` from a call's ``aim_budget`` / ``aim_budget_ms`` (None when neither)
    and ``aim_budget_quantile`` (a latency budget's share of prefills; default 0.9)."""
    if flops is None and ms is None:
        if quantile is not None:
            raise ValueError("a budget quantile goes with a latency budget (budget_ms / aim_budget_ms), which is missing")
        return None
    from ..budget.select import Budget

    return Budget(flops=flops, ms=ms, quantile=quantile)


_IN_FEATURES: contextvars.ContextVar = contextvars.ContextVar("aim_in_features", default=None)


class FeatureFunction:
    """``get_image_features`` / ``get_video_features`` while patched: notes each output's merge
    groups and records the output for the call in progress."""

    def __init__(self, controller: Controller, original: Callable, modality: str) -> None:
        self.controller = controller
        self.original = original
        self.modality = modality
        self.signature = inspect.signature(original)
        self.__wrapped__ = original

    def __call__(self, *args, **kwargs):
        if _IN_FEATURES.get() is self.controller:
            # a feature function called by another one (Qwen3-VL's get_video_features calls
            # get_image_features): only the outermost call describes and records its output
            return self.original(*args, **kwargs)
        token = _IN_FEATURES.set(self.controller)
        try:
            return self._record(self.original(*args, **kwargs), args, kwargs)
        finally:
            _IN_FEATURES.reset(token)

    def _record(self, output, args, kwargs):
        controller = self.controller
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            call = self.signature.bind_partial(*args, **kwargs)
            describe = getattr(controller.family, f"{self.modality}_groups")
            controller.groups.remember(output, pooled, describe(controller.multimodal, pooled, call))
            state = current_call(controller)
            if state is not None:
                state.recording[self.modality].append(output)
        return output
