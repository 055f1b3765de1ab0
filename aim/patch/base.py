"""Shared patching machinery: the per-model controller and the family description.

A family module (``aim/patch/<family>.py``) only says how its visual features split
into merge groups (frames / crops). Everything else is here: wrapping the multimodal
model's forward and feature functions to learn where the visual tokens are, and
installing `AIMTextForward` on the text decoder. Every change is an instance attribute
recorded in `Controller.saved`, so `remove` restores the model exactly.

Written for transformers 5.x (checked against 5.23): the ``*Model`` classes expose
``language_model``, ``get_image_features`` / ``get_video_features`` returning
``BaseModelOutputWithPooling`` and fill placeholders with ``masked_scatter``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import torch

from ..config import AIMConfig
from ..engine import AIMTextForward
from ..layout import VisualLayout, build_layout, flatten_item_groups
from ..stats import AIMStats

logger = logging.getLogger(__name__)

_MISSING = object()
ItemGroups = list[list[torch.Tensor]]
_GROUPS_ATTR = "_aim_item_groups"  # set on the feature outputs, which generate() may compute before forward


class Family:
    """How one model family lays out its visual features.

    Subclasses set `class_names` (the ``*ForConditionalGeneration`` and ``*Model`` classes)
    and implement `image_groups` / `video_groups`: given the multimodal model, the
    ``pooler_output`` of its feature function (one item per image / video) and that call's
    bound arguments, return for each item its merge groups as index tensors relative to
    the item's first feature.
    """

    name: str = ""
    class_names: tuple[str, ...] = ()

    def image_groups(self, model: torch.nn.Module, features: Any, call: inspect.BoundArguments) -> ItemGroups:
        raise NotImplementedError

    def video_groups(self, model: torch.nn.Module, features: Any, call: inspect.BoundArguments) -> ItemGroups:
        raise NotImplementedError


class Controller:
    """The AIM state of one patched model, stored as ``model._aim``."""

    def __init__(self, model: torch.nn.Module, family: Family, config: AIMConfig) -> None:
        self.family = family
        # a *ForConditionalGeneration wraps the multimodal *Model as `.model`; the latter may be given directly
        inner = getattr(model, "model", None)
        self.multimodal = inner if inner is not None and hasattr(inner, "language_model") else model
        self.text_model = self.multimodal.language_model
        layer_types = getattr(self.text_model.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"AIM supports decoders with full attention in every layer; this model has layer types "
                f"{sorted(set(layer_types))} (sliding-window attention is not supported)"
            )
        self.num_layers = len(self.text_model.layers)
        self.configure(config)
        self.saved: list[tuple[Any, str, Any]] = []
        self.last_stats: AIMStats | None = None
        self.record_positions = False  # set by aim.visualize.record_kept_tokens
        self._recording: dict[str, list] | None = None
        self._input_ids: torch.Tensor | None = None

    def configure(self, config: AIMConfig) -> None:
        attn = getattr(self.text_model.config, "_attn_implementation", "eager")
        if config.enabled and attn not in ("eager", "sdpa"):
            raise NotImplementedError(
                f"AIM supports attn_implementation 'eager' and 'sdpa'; this model uses {attn!r}. "
                "Load it with attn_implementation='sdpa'."
            )
        config.check_depth(self.num_layers)
        self.config = config
        self.keep_ratios = config.keep_ratios(self.num_layers)

    # --- installing and removing -------------------------------------------------------
    def _set(self, obj: Any, name: str, value: Any) -> None:
        self.saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def install(self) -> None:
        mm = self.multimodal
        self.original_text_forward = self.text_model.forward
        self._set(self.text_model, "forward", AIMTextForward(self.text_model, self))
        self._set(mm, "forward", self._wrap_forward(mm.forward))
        for modality in ("image", "video"):
            fn = getattr(mm, f"get_{modality}_features", None)
            if fn is not None:
                self._set(mm, f"get_{modality}_features", self._wrap_features(fn, modality))

    def remove(self) -> None:
        for obj, name, old in reversed(self.saved):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.saved.clear()

    # --- learning where the visual tokens are -----------------------------------------
    def _wrap_forward(self, forward: Callable) -> Callable:
        signature = inspect.signature(forward)

        @functools.wraps(forward)
        def aim_multimodal_forward(*args, **kwargs):
            call = signature.bind_partial(*args, **kwargs)
            self._input_ids = call.arguments.get("input_ids")
            # features encoded before the forward (generate() does this) arrive as mm_encoder_outputs
            given = call.arguments.get("mm_encoder_outputs") or {}
            self._recording = {modality: [] for modality in ("image", "video")}
            for modality, output in given.items():
                if modality in self._recording and output is not None:
                    self._recording[modality].append(output)
            try:
                return forward(*args, **kwargs)
            finally:
                self._recording = None
                self._input_ids = None

        return aim_multimodal_forward

    def _wrap_features(self, fn: Callable, modality: str) -> Callable:
        signature = inspect.signature(fn)
        describe = getattr(self.family, f"{modality}_groups")

        @functools.wraps(fn)
        def aim_features(*args, **kwargs):
            output = fn(*args, **kwargs)
            pooled = getattr(output, "pooler_output", None)
            if pooled is not None:
                call = signature.bind_partial(*args, **kwargs)
                object.__setattr__(output, _GROUPS_ATTR, describe(self.multimodal, pooled, call))
                if self._recording is not None:
                    self._recording[modality].append(output)
            return output

        return aim_features

    def take_layout(self) -> VisualLayout | None:
        """The visual layout of the chunk the text decoder is about to run (once per forward)."""
        if self._recording is None:
            return None
        cfg = self.multimodal.config
        token_ids = [getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)]
        groups = [_feature_groups(self._recording[m]) for m in ("image", "video")]
        self._recording = None
        if self._input_ids is None:
            if any(groups):
                raise ValueError(
                    "AIM needs input_ids to find the visual placeholder tokens; got inputs_embeds only. "
                    "Pass input_ids (and pixel values) instead."
                )
            return None
        pairs = [(tid, g) for tid, g in zip(token_ids, groups) if tid is not None]
        layout = build_layout(self._input_ids, pairs)
        if not layout.visual.any():
            return None
        return layout


def _feature_groups(outputs: list) -> list[torch.Tensor]:
    """Merge groups (indices into the modality's concatenated features) of recorded outputs."""
    groups: list[torch.Tensor] = []
    offset = 0
    for output in outputs:
        items = output.pooler_output
        item_groups = getattr(output, _GROUPS_ATTR, None)
        if item_groups is None:
            logger.warning(
                "visual features were encoded before AIM was applied; their tokens are pruned but not merged"
            )
        else:
            groups.extend(g + offset for g in flatten_item_groups(items, item_groups))
        offset += sum(item.shape[0] for item in items)
    return groups
