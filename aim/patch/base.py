"""Shared patching machinery: the per-model controller (the patched callables it installs are in
`aim.patch.wrappers`).

A family (``aim/families/<model_type>.py``) says how its visual features split into merge
groups (frames / crops) and how its positions are read. Everything else is here: wrapping the multimodal
model's forward and feature functions to learn where the visual tokens are, and
installing `AIMTextForward` on the text decoder. Every change is an instance attribute
recorded in `Controller.saved`, so `remove` restores the model exactly.

Per-call state (input ids, recorded features, config, stats) never lives here: each call of the
patched forward makes a `aim.context.CallState` and passes it down through a context variable,
so one patched model serves many threads with different settings. The patched callables are
small objects, not closures, so ``copy.deepcopy(model)`` gives a copy patched on its own modules.

Written for transformers 5.21-5.24: the ``*Model`` classes expose ``language_model``,
``get_image_features`` / ``get_video_features`` returning ``BaseModelOutputWithPooling`` and fill
placeholders with ``masked_scatter``.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..config import AIMConfig
from ..context import CallState, CaptureHook, options_for
from ..engine import AIMTextForward
from ..families import Family
from ..layout import VisualLayout, build_layout, flatten_item_groups, match_item_groups
from ..speculative import CandidateGeneratorHook
from ..stats import AIMStats
from .wrappers import FeatureFunction, Generate, MultimodalForward

ItemGroups = list[list[torch.Tensor]]
CHUNKED_PREFILL = (
    "the visual tokens of this prompt chunk come without their whole image / video: the prompt was "
    "split by chunked prefill (generate(..., prefill_chunk_size=N)), or its features were encoded "
    "before apply_aim. AIM merges and prunes each image / video as a whole in one prefill: use "
    "prefill_chunk_size=None"
)


class _Missing:
    """Marks an attribute the model did not have before the patch; the same object after copies."""

    def __repr__(self) -> str:
        return "<missing>"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()


def as_config(config: AIMConfig | Mapping | None, base: AIMConfig | None = None) -> AIMConfig | None:
    """An `AIMConfig` from a config, or from a mapping of fields changed on `base` (default: the
    defaults), or None."""
    if config is None or isinstance(config, AIMConfig):
        return config
    if isinstance(config, Mapping):
        return (base or AIMConfig()).replace(**dict(config))
    raise TypeError(f"an AIM config must be an AIMConfig or a dict of its fields, got {type(config).__name__}")


class Controller:
    """The AIM patch of one model: what was changed, the model-level config, nothing per call.

    Stored as ``_aim`` on the model it was applied to (`owner`) and on its multimodal ``*Model``.
    """

    def __init__(self, model: torch.nn.Module, family: Family, config: AIMConfig) -> None:
        self.owner = model
        self.family = family
        self.multimodal = multimodal_of(model)
        self.text_model = self.multimodal.language_model
        layer_types = getattr(self.text_model.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"AIM supports decoders with full attention in every layer; this model has layer types "
                f"{sorted(set(layer_types))} (sliding-window attention is not supported)"
            )
        self.num_layers = len(self.text_model.layers)
        self.config = self.checked(config)
        self.saved: list[tuple[Any, str, Any]] = []
        self.active = False
        self.groups = FeatureGroups()
        self._last_stats: dict[int, AIMStats] = {}  # per thread
        self.selector = None  # aim.budget.Selector once a profile is given
        self._last_draft: dict[int, Any] = {}  # per thread: aim.speculative.DraftStats
        self.budget = None  # the model-level aim.budget.Budget, if any

    def checked(self, config: AIMConfig) -> AIMConfig:
        """`config` after the checks against this model (attention implementation, depth)."""
        attn = getattr(self.text_model.config, "_attn_implementation", "eager")
        if config.enabled and attn not in ("eager", "sdpa"):
            raise NotImplementedError(
                f"AIM supports attn_implementation 'eager' and 'sdpa'; this model uses {attn!r}. "
                "Load it with attn_implementation='sdpa'."
            )
        config.check_depth(self.num_layers)
        if config.drops_frames and not self.family.encodes_fewer_frames:
            from ..families import all_families

            allowed = sorted(f.model_type for f in all_families() if f.encodes_fewer_frames)
            why = ("whose vision tower encodes frames in pairs with positions from the frame grid: sample fewer "
                   "frames in the processor instead, or use temporal_keep") if self.family.supports_video \
                else "which takes no video"
            raise ValueError(
                f"frame_keep={config.frame_keep} (fewer video frames through the vision tower) is available for "
                f"{allowed}, not {self.family.model_type!r}, {why}"
            )
        return config

    def configure(self, config: AIMConfig) -> None:
        self.config = self.checked(config)

    def config_in_effect(self) -> AIMConfig:
        """The config calls from this thread use now: `settings` blocks first, else the model's."""
        return options_for(self).config or self.config

    def budget_in_effect(self, given=None):
        """The budget of a call: its own (`given`), a `settings` block's, the model's, or None when a
        config was asked for explicitly (a call's or a block's config wins over the model's budget)."""
        if given is not None:
            return given
        options = options_for(self)
        if options.budget is not None:
            return options.budget
        return None if options.config is not None else self.budget

    def choose(self, call: CallState, layout: VisualLayout, valid: torch.Tensor) -> AIMConfig:
        """The config a budgeted call runs: the selector's choice for this input (kept on the call)."""
        from ..budget.inputs import layout_specs

        self.require_selector()
        call.choice = self.selector.choose(call.budget, layout_specs(layout, valid))
        return self.checked(call.choice.config)

    def require_selector(self) -> None:
        if self.selector is None:
            raise ValueError(
                "a budget needs a calibration profile: apply_aim(model, profile='profile.json') "
                "(made by `aim calibrate`), or apply_aim(model, budget=..., profile=...)"
            )

    def per_call(self, given: AIMConfig | Mapping) -> AIMConfig:
        """A per-call config: an `AIMConfig` as is, a dict as changes to the config in effect."""
        return self.checked(as_config(given, base=self.config_in_effect()))

    def remember(self, stats: AIMStats) -> None:
        self._last_stats[threading.get_ident()] = stats

    def last_stats(self) -> AIMStats | None:
        """Stats of the last prefill this thread ran."""
        return self._last_stats.get(threading.get_ident())

    def remember_draft(self, stats) -> None:
        self._last_draft[threading.get_ident()] = stats

    def last_draft_stats(self):
        """`aim.speculative.DraftStats` of the last drafted generation this thread ran."""
        return self._last_draft.get(threading.get_ident())

    # --- installing and removing -------------------------------------------------------
    def _set(self, obj: Any, name: str, value: Any) -> None:
        self.saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def _projections(self):
        for layer in self.text_model.layers:
            query, key = self.family.qk_modules(layer.self_attn)
            yield "q", query
            yield "k", key

    def install(self) -> None:
        mm = self.multimodal
        self.original_text_forward = self.text_model.forward
        self._set(self.text_model, "forward", AIMTextForward(self.text_model, self))
        self._set(mm, "forward", MultimodalForward(self, mm.forward))
        if callable(getattr(self.owner, "generate", None)):
            self._set(self.owner, "generate", Generate(self, self.owner.generate))
        if callable(getattr(self.owner, "_get_candidate_generator", None)):
            # the extension point of assisted generation in transformers 5.21-5.24 (aim.speculative)
            self._set(self.owner, "_get_candidate_generator",
                      CandidateGeneratorHook(self, self.owner._get_candidate_generator))
        for modality in ("image", "video"):
            fn = getattr(mm, f"get_{modality}_features", None)
            if fn is not None:
                self._set(mm, f"get_{modality}_features", FeatureFunction(self, fn, modality))
        for name, projection in self._projections():  # inert unless a call asks (aim.context)
            projection.register_forward_hook(CaptureHook(name))
        self.active = True

    def remove(self) -> None:
        for obj, name, old in reversed(self.saved):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.saved.clear()
        for _, projection in self._projections():
            for key, hook in list(projection._forward_hooks.items()):
                if isinstance(hook, CaptureHook):
                    del projection._forward_hooks[key]
                    projection._forward_hooks_with_kwargs.pop(key, None)
                    projection._forward_hooks_always_called.pop(key, None)
        self.active = False

    # --- where the visual tokens are ---------------------------------------------------
    def take_layout(self, state: CallState | None) -> VisualLayout | None:
        """The visual layout of the call's LLM input (taken once per call)."""
        if state is None or state.layout_taken:
            return None
        state.layout_taken = True
        cfg = self.multimodal.config
        token_ids = [getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)]
        described = [self.groups.of(state.recording[m]) for m in ("image", "video")]
        groups = [g for g, _ in described]
        if state.input_ids is None:
            if any(groups):
                raise ValueError(
                    "AIM needs input_ids to find the visual placeholder tokens; got inputs_embeds only. "
                    "Pass input_ids (and pixel values) instead."
                )
            return None
        pairs = [(tid, g, modality == "video", dropped)
                 for tid, (g, dropped), modality in zip(token_ids, described, ("image", "video")) if tid is not None]
        layout = build_layout(state.input_ids, pairs)
        if not layout.visual.any():
            return None
        if state.input_ids.shape[1] > 1 and not any(state.recording.values()):
            # placeholders in a prompt chunk, but no visual features came with this call: transformers
            # < 5.24 runs chunked prefill this way (the pixels go with no chunk), and AIM would merge
            # and prune placeholder embeddings as if they were the image
            raise NotImplementedError(CHUNKED_PREFILL)
        return layout


def multimodal_of(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal ``*Model`` of a ``*ForConditionalGeneration`` (or the model itself)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "language_model") else model


@dataclass
class EncodedFeatures:
    """What aim noted about one feature function output: its items as encoded, their merge groups,
    the feature indices of frames not encoded (`aim.frames`), the fraction of frames encoded, and
    how long the encoding took when it ran outside the forward that places it (generate() encodes
    first): a budgeted prefill's measured time includes it."""

    ref: weakref.ref
    items: list
    groups: ItemGroups
    dropped: ItemGroups
    frame_keep: float = 1.0
    seconds: float = 0.0


class FeatureGroups:
    """The merge groups of each visual-feature output, kept beside the outputs (not on them):
    generate() may encode the features before the forward that places them."""

    def __init__(self) -> None:
        self._table: dict[int, EncodedFeatures] = {}

    def remember(self, output: Any, items: Any, item_groups: ItemGroups, dropped: ItemGroups | None = None,
                 frame_keep: float = 1.0, seconds: float = 0.0) -> None:
        """Note the merge groups of each item of `output` and, where frames were not encoded
        (`aim.frames`), the feature indices of those frames (per item, one tensor in a list)."""
        key = id(output)
        ref = weakref.ref(output, lambda _, key=key: self._table.pop(key, None))
        items = list(items)
        self._table[key] = EncodedFeatures(ref, items, item_groups, dropped if dropped is not None else [[] for _ in items],
                                           frame_keep, seconds)

    def entry(self, output: Any) -> EncodedFeatures | None:
        """What was noted about `output` (None for features aim did not see encoded)."""
        entry = self._table.get(id(output))
        return entry if entry is not None and entry.ref() is output else None

    def item_groups(self, output: Any) -> tuple[ItemGroups, ItemGroups] | None:
        """The groups and dropped features of each item of ``output.pooler_output`` as it is now
        (generate() may have repeated the items since they were encoded)."""
        entry = self.entry(output)
        if entry is None:
            return None
        items = output.pooler_output
        return match_item_groups(items, entry.items, entry.groups), match_item_groups(items, entry.items, entry.dropped)

    def of(self, outputs: list) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Merge groups (indices into the modality's concatenated features) of recorded outputs,
        one list per item (image / video, a video's groups in time order), and the same for the
        features of frames the vision tower did not encode."""
        groups_out: list[list[torch.Tensor]] = []
        dropped_out: list[list[torch.Tensor]] = []
        offset = 0
        for output in outputs:
            items = output.pooler_output
            described = self.item_groups(output)
            if described is None:
                raise NotImplementedError(CHUNKED_PREFILL)
            for out, per_item in zip((groups_out, dropped_out), described):
                out.extend([g + offset for g in groups] for groups in flatten_item_groups(items, per_item))
            offset += sum(item.shape[0] for item in items)
        return groups_out, dropped_out
