"""`AIMModelMixin`: put in front of one of lmms-eval's own HF model classes, it

1. takes the AIM settings out of ``--model_args`` and validates them before anything loads
   (an unknown key or a bad value raises `AIMArgumentError`, a ValueError, with the allowed keys);
2. lets the lmms-eval class load the model as usual, then calls `aim.apply_aim` on it
   (``aim=off``: applied with ``enabled=False``, the unchanged model through the same code path;
   ``aim_budget`` / ``aim_budget_ms``: with that budget and its calibration profile, so that each
   request runs the most faithful calibrated setting that fits, see `aim.budget`);
3. after every prefill reads `aim.last_stats` (forward hook) and records the sample's visual
   tokens before / after merging, tokens per LLM layer and analytic prefill FLOPs (and under a
   budget the setting that ran, its predicted cost and measured time), tagged with the task and
   document it belongs to;
4. at the end of the run writes ``<date>_aim_cost.json`` (summary) and
   ``<date>_aim_cost_samples.jsonl`` next to lmms-eval's ``<date>_results.json``, puts the summary
   into the results JSON under ``"aim_cost"``, and logs it. With ``aim_output=PATH`` the summary is
   also (re)written at PATH after every batch of requests, so a crashed run still leaves it.

Generation errors that lmms-eval swallows (it logs them and scores an empty answer) are counted
and reported in the summary (``failed_generations``).
"""

from __future__ import annotations

import atexit
import copy
import functools
import inspect
import logging
import weakref
from pathlib import Path
from typing import Any

from aim import apply_aim, last_stats

from .args import AIMArgumentError, AIMSettings, parse_model_args
from .cost import CostTracker, flops_counter

logger = logging.getLogger(__name__)

_LIVE: "weakref.WeakSet[AIMModelMixin]" = weakref.WeakSet()


def _log(message: str, level: str = "info") -> None:
    try:
        from loguru import logger as eval_logger  # lmms-eval's logger

        getattr(eval_logger, level)(message)
    except ImportError:  # pragma: no cover
        getattr(logger, level if level != "success" else "info")(message)


def _base_class(cls: type) -> type:
    """The lmms-eval class behind the mixin: the first one after it in the MRO defining __init__."""
    mro = cls.__mro__
    start = mro.index(AIMModelMixin) + 1
    for klass in mro[start:]:
        if "__init__" in vars(klass):
            return klass
    raise TypeError(f"{cls.__name__} has no lmms-eval base class")  # pragma: no cover


def _init_params(klass: type) -> set[str]:
    params = inspect.signature(klass.__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _num_layers(config: Any) -> int | None:
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "num_hidden_layers", None)
    return int(value) if value else None


class AIMModelMixin:
    """Mixin for lmms-eval HF model classes; see the module docstring. Subclasses set `AIM_MODEL_ID`."""

    AIM_MODEL_ID = "aim"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base = _base_class(type(self))
        settings, rest = parse_model_args(
            kwargs, base_params=_init_params(base), model=self.AIM_MODEL_ID, base=f"lmms-eval {base.__name__}",
        )
        pretrained = rest.get("pretrained")
        if pretrained is None and not args:
            default = inspect.signature(base.__init__).parameters.get("pretrained")
            pretrained = default.default if default is not None else None
        self._aim_precheck(settings, pretrained)
        super().__init__(*args, **rest)
        self._aim_install(settings, pretrained if isinstance(pretrained, str) else None)

    # -- construction -----------------------------------------------------------------------

    def _aim_precheck(self, settings: AIMSettings, pretrained: Any) -> None:
        """Check the schedule against the checkpoint's depth, and a budget's profile against the
        checkpoint, before the weights load (cheap)."""
        config = None
        if isinstance(pretrained, str):
            try:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(pretrained)
            except Exception:  # no config reachable here: apply_aim checks after loading
                pass
        num_layers = _num_layers(config) if config is not None else None
        if num_layers and settings.budget is None:
            try:
                settings.config.check_depth(num_layers)
            except ValueError as error:
                raise AIMArgumentError(f"{self.AIM_MODEL_ID}: AIM arguments do not fit {pretrained}: {error}") from None
        if settings.budget is not None:
            settings.profile = self._aim_profile(settings, pretrained, config)

    def _aim_profile(self, settings: AIMSettings, pretrained: Any, config: Any) -> str:
        """The path of a budget's calibration profile (``aim_profile``, else the one beside the
        weights), read and matched to the checkpoint's config: a clear error now, not after loading."""
        from aim.budget import PROFILE_FILE, Profile

        path = settings.profile
        if path is None:
            folder = Path(pretrained) if isinstance(pretrained, str) else None
            if folder is None or not (folder / PROFILE_FILE).is_file():
                where = f"no {PROFILE_FILE} in {pretrained}" if folder is not None and folder.is_dir() else \
                    f"{pretrained!r} is not a local folder holding one"
                raise AIMArgumentError(
                    f"{self.AIM_MODEL_ID}: a budget needs a calibration profile, and {where}: make one with "
                    f"`aim calibrate MODEL_PATH --out profile.json` and pass aim_profile=profile.json")
            path = str(folder / PROFILE_FILE)
        try:
            profile = Profile.load(path)
            if config is not None:
                profile.check_model(config)
        except ValueError as error:
            raise AIMArgumentError(f"{self.AIM_MODEL_ID}: aim_profile={path}: {error}") from None
        return path

    def _aim_install(self, settings: AIMSettings, pretrained: str | None) -> None:
        model = self.model  # the unwrapped transformers model
        budget = settings.budget
        try:
            if budget is None:
                apply_aim(model, settings.config)
            else:
                apply_aim(model, budget=budget.flops, budget_ms=budget.ms, budget_quantile=budget.quantile,
                          profile=settings.profile, interpolate_keeps=settings.interpolate_keeps)
        except (TypeError, ValueError) as error:
            raise AIMArgumentError(f"{self.AIM_MODEL_ID}: cannot apply AIM to {type(model).__name__}: {error}") from None
        counter, note = flops_counter(model) if settings.flops else (None, "aim_flops=off: token counts only")
        self._aim_settings = settings
        self._aim_cost = CostTracker(
            model=self.AIM_MODEL_ID, pretrained=pretrained, aim=settings.as_dict(),
            num_layers=_num_layers(model.config), counter=counter, flops_note=note,
        )
        self._aim_pending: list[tuple[str | None, int | None]] = []
        self._aim_seen = None
        self._aim_synced = (0, 0)  # samples, failures already gathered (several processes)
        self._aim_hook = model.register_forward_hook(self._aim_after_forward)
        original_generate = model.generate

        @functools.wraps(original_generate)
        def generate(*args: Any, **kwargs: Any):
            try:
                return original_generate(*args, **kwargs)
            except Exception as error:  # lmms-eval logs it and scores "": count it, then re-raise
                self._aim_cost.add_failure(error)
                raise

        model.generate = generate
        _LIVE.add(self)
        _install_results_hook()
        atexit.register(_at_exit, weakref.ref(self))
        if budget is not None:
            _log(f"[aim] {self.AIM_MODEL_ID}: AIM applied on {type(model).__name__} with a budget of "
                 f"{budget.describe()} per request (profile {settings.profile})")
        else:
            state = "applied" if settings.enabled else "applied with enabled=False (aim=off: unchanged model)"
            _log(f"[aim] {self.AIM_MODEL_ID}: AIM {state} on {type(model).__name__}: {settings.config}")

    # -- per-sample accounting ----------------------------------------------------------------

    def _aim_after_forward(self, module: Any, inputs: Any, output: Any) -> None:
        stats = last_stats(module)
        if stats is None or stats is self._aim_seen:
            return
        self._aim_seen = stats
        batch = len(stats.input_tokens)
        tags = self._aim_pending[-batch:] if len(self._aim_pending) >= batch else self._aim_pending[-1:]
        if batch > 1 and len(set(tags)) < batch:
            tags = tags[-1:]  # ambiguous: keep the task only
        self._aim_pending = []
        self._aim_cost.add_stats(stats, tags)

    def _aim_tag(self, requests: list) -> list:
        """Copies of the requests whose document callables note which (task, doc_id) is being read."""
        tagged = []
        for request in requests:
            tag = (getattr(request, "task_name", None), getattr(request, "doc_id", None))
            args = request.args
            new_args = tuple(self._aim_wrap_callable(a, tag) if callable(a) else a for a in args)
            clone = copy.copy(request)
            clone.arguments = new_args
            tagged.append(clone)
        return tagged

    def _aim_wrap_callable(self, fn: Any, tag: tuple) -> Any:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any):
            self._aim_pending.append(tag)
            return fn(*args, **kwargs)

        return wrapped

    def _aim_run(self, method: str, requests: list) -> list:
        try:
            tagged = self._aim_tag(requests)
        except Exception:  # unusual request objects: no tags, same results
            tagged = requests
        try:
            return getattr(super(), method)(tagged)
        finally:
            self._aim_sync()
            if self._aim_settings.output:
                self._aim_cost.write(self._aim_settings.output)
            _log(self._aim_cost.summary_line())

    def generate_until(self, requests: list) -> list:
        return self._aim_run("generate_until", requests)

    def loglikelihood(self, requests: list) -> list:
        return self._aim_run("loglikelihood", requests)

    def generate_until_multi_round(self, requests: list) -> list:
        return self._aim_run("generate_until_multi_round", requests)

    def _aim_sync(self) -> None:
        """With several processes, gather every rank's new samples on rank 0 (collective call:
        every rank runs the same request types, so each reaches this point the same number of times)."""
        if getattr(self, "_world_size", 1) <= 1:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        cost = self._aim_cost
        done_samples, done_failures = self._aim_synced
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (cost.samples[done_samples:], cost.failures[done_failures:]))
        # rank 0 keeps everyone's records; the others drop what they sent
        cost.samples, cost.failures = cost.samples[:done_samples], cost.failures[:done_failures]
        if dist.get_rank() == 0:
            for samples, failures in gathered:
                cost.samples.extend(samples)
                cost.failures.extend(failures)
        self._aim_synced = (len(cost.samples), len(cost.failures))


# -- end of run -------------------------------------------------------------------------------


def _install_results_hook() -> None:
    """Wrap lmms-eval's `EvaluationTracker.save_results_aggregated` (once) so that the cost
    summary goes into the results JSON and into ``<date>_aim_cost.json`` beside it."""
    try:
        from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    except ImportError:  # pragma: no cover
        _log("[aim] lmms-eval's EvaluationTracker not found: the cost summary is only logged "
             "(pass aim_output=PATH to write it)", "warning")
        return
    original = EvaluationTracker.save_results_aggregated
    if getattr(original, "_aim_hooked", False):
        return

    @functools.wraps(original)
    def save_results_aggregated(tracker, results, samples, datetime_str, *args, **kwargs):
        models = [m for m in list(_LIVE) if getattr(m, "_aim_cost", None) is not None]
        if isinstance(results, dict) and models:
            summaries = {m.AIM_MODEL_ID: m._aim_cost.summary() for m in models}
            results["aim_cost"] = next(iter(summaries.values())) if len(summaries) == 1 else summaries
        out = original(tracker, results, samples, datetime_str, *args, **kwargs)
        try:
            output_path = getattr(tracker, "output_path", None)
            date_id = getattr(tracker, "date_id", None)
            if output_path and date_id:
                folder = Path(output_path) / tracker.general_config_tracker.model_name_sanitized
                for m in models:
                    suffix = "" if len(models) == 1 else f"_{m.AIM_MODEL_ID}"
                    path = m._aim_cost.write(
                        folder / f"{date_id}_aim_cost{suffix}.json", folder / f"{date_id}_aim_cost{suffix}_samples.jsonl",
                    )
                    _log(f"[aim] cost summary written to {path}")
        except Exception as error:  # never lose lmms-eval's own results over ours
            _log(f"[aim] could not write the cost summary: {error}", "warning")
        for m in models:
            print(m._aim_cost.summary_line(), flush=True)
        return out

    save_results_aggregated._aim_hooked = True
    EvaluationTracker.save_results_aggregated = save_results_aggregated


def _at_exit(ref: "weakref.ref[AIMModelMixin]") -> None:
    """Last resort: (re)write ``aim_output`` and, if lmms-eval saved no results, print the summary."""
    model = ref()
    cost = getattr(model, "_aim_cost", None) if model is not None else None
    if cost is None:
        return
    output = model._aim_settings.output
    try:
        if output:
            cost.write(output)
        if not [p for p in cost.written_to if p != output]:  # the results hook did not run
            print(cost.summary_line() + ("" if output else " (no --output_path nor aim_output: not written)"),
                  flush=True)
    except Exception:  # pragma: no cover - interpreter shutdown
        pass
