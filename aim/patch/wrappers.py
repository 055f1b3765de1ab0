"""The patched callables: the multimodal forward, ``generate`` and the feature functions.

Each is a small object holding its controller and the original (so ``copy.deepcopy`` patches the
copy); per-call state goes down the call as a value (`aim.context`), never onto these objects.
Written for transformers 5.21-5.24 (see `aim.patch.base`).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from ..config import AIMConfig
from ..counts import kept_frames
from ..frames import encode_kept_frames, without_dropped
from ..context import CallState, call_options, current_call, options_for, running
from ..speculative import (current_run, forward_prompt_then_drafted, generate_with_draft, note_target_forward,
                           prompt_split)

if TYPE_CHECKING:  # the controller imports these wrappers
    from .base import Controller

logger = logging.getLogger(__name__)


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
                          attention_mask=call.arguments.get("attention_mask"),
                          record_positions=options.record_positions,
                          budget=None if given is not None else controller.budget_in_effect(budget))
        if state.budget is not None:
            controller.require_selector()
        # features encoded before the forward (generate() does this) arrive as mm_encoder_outputs;
        # their encoding belongs to this prefill's time, and how many frames they hold to its stats
        encoded_seconds = 0.0
        for modality, output in (call.arguments.get("mm_encoder_outputs") or {}).items():
            if modality in state.recording and output is not None:
                state.recording[modality].append(output)
                if (entry := controller.groups.entry(output)) is not None:
                    encoded_seconds += entry.seconds
                    state.frame_keep = min(state.frame_keep, entry.frame_keep)
        clock = controller.selector.clock if controller.selector is not None else time.perf_counter
        start = clock()
        started = time.perf_counter()
        with running(state):
            output = self.original(*args, **kwargs)
        note_target_forward(controller, started)
        if state.choice is not None and state.stats is not None:
            measured = clock() - start + encoded_seconds
            choice = state.choice
            controller.selector.load.observe(measured, choice.predicted_seconds / choice.load_factor)
            state.stats.budget = {
                "budget": choice.budget.describe(), "point": choice.point, "config": choice.config,
                "frame_keep": state.frame_keep,
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
        # generate() encodes images / videos before its first forward: a latency budget chooses the
        # frames it encodes from the prompt (aim.patch.wrappers.FeatureFunction)
        prompt = (kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None)), kwargs.get("attention_mask"))
        if aim_config is None and budget is None:
            with call_options(self.controller, prompt=prompt):
                return run(*args, **kwargs)
        if budget is not None:
            with call_options(self.controller, budget=budget, config=None, prompt=prompt):
                return run(*args, **kwargs)
        with call_options(self.controller, config=self.controller.per_call(aim_config), budget=None, prompt=prompt):
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
        controller = self.controller
        clock = controller.selector.clock if controller.selector is not None else time.perf_counter
        try:
            start = clock()
            call = self.signature.bind_partial(*args, **kwargs)
            keep = self._frame_keep(call) if self.modality == "video" else 1.0
            if keep < 1.0:
                output, dropped = encode_kept_frames(self.original, args, kwargs, call, keep, controller.family.video_markers)
            else:
                output, dropped = self.original(*args, **kwargs), None
            return self._record(output, call, dropped, keep, clock() - start)
        finally:
            _IN_FEATURES.reset(token)

    def _frame_keep(self, call) -> float:
        """The fraction of each video's frames this encoding keeps: the config's `frame_keep`, or
        under a latency budget the selector's choice for this prompt (`Selector.frames_for`)."""
        controller = self.controller
        state = current_call(controller)
        if state is not None:
            budget, config, prompt = state.budget, state.config, (state.input_ids, state.attention_mask)
        else:  # generate() encoding before its first forward, inside the Generate wrapper's options
            prompt = options_for(controller).prompt
            if prompt is None:
                # called on its own (feature extraction, or features later given as
                # mm_encoder_outputs): no engine removes frames there, so encode every frame
                return 1.0
            budget, config = controller.budget_in_effect(), controller.config_in_effect()
        if budget is None:
            return config.frame_keep if config.drops_frames else 1.0
        pixels = call.arguments.get("pixel_values_videos")
        if (budget.ms is None or controller.selector is None or not controller.family.encodes_fewer_frames
                or prompt is None or not isinstance(prompt[0], torch.Tensor) or not isinstance(pixels, torch.Tensor)
                or pixels.ndim != 5):
            return 1.0
        from ..budget.inputs import video_prompt_specs

        cfg = controller.multimodal.config
        specs = video_prompt_specs(prompt[0], prompt[1], getattr(cfg, "image_token_id", None), cfg.video_token_id,
                                   pixels.shape[0], pixels.shape[1], controller.family.video_markers)
        if specs is None:
            return 1.0
        keep = controller.selector.frames_for(budget, specs)
        if len(kept_frames(pixels.shape[1], keep)) < pixels.shape[1]:
            logger.warning("latency budget %s: no calibrated setting fits whole videos under the current load "
                           "(x%.2f); encoding %g of each video's frames (evenly spaced)",
                           budget.describe(), controller.selector.load.factor, keep)
        return keep

    def _record(self, output, call, dropped, frame_keep: float, seconds: float):
        controller = self.controller
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            describe = getattr(controller.family, f"{self.modality}_groups")
            groups = describe(controller.multimodal, pooled, call)
            if dropped is not None:
                groups = without_dropped(groups, dropped)
            state = current_call(controller)
            # inside a forward its own clock covers the encoding; before it (generate), it is noted
            controller.groups.remember(output, pooled, groups, dropped, frame_keep if dropped is not None else 1.0,
                                       0.0 if state is not None else seconds)
            if state is not None:
                state.recording[self.modality].append(output)
                if dropped is not None:
                    state.frame_keep = min(state.frame_keep, frame_keep)
        return output
