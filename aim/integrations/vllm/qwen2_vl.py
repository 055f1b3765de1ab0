"""Qwen2-VL and Qwen2.5-VL in vLLM with aim's merging (see the package docstring).

Four places count the visual tokens of an image / video and must agree: the processing info
(vLLM's profiling and encoder budget), the prompt update (the placeholders written), the encoder
output (`embed_multimodal`) and the M-RoPE grid (`iter_mm_grid_thw`, read by
`get_mrope_input_positions`). Each takes its count from `aim.counts.merged_item_tokens`; each frame's
merged tokens are laid out as one row of the grid (``merged_positions="contiguous"``).
Written for vLLM 0.32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...counts import group_size_after_merge, merged_item_tokens
from ...merge import merge_item
from .settings import check_count, merge_schedule


def _frame_tokens(grid_thw, merge_size: int) -> tuple[int, int]:
    """(temporal slices, LLM tokens per slice) of an item's patch grid ``(t, h, w)``."""
    t, h, w = (int(x) for x in grid_thw)
    return t, (h // merge_size) * (w // merge_size)


class _InfoMixin:
    def _get_vision_info(self, *, image_width: int, image_height: int, num_frames: int = 1, **kwargs: Any):
        size, tokens = super()._get_vision_info(image_width=image_width, image_height=image_height,
                                                num_frames=num_frames, **kwargs)
        schedule = merge_schedule(self.get_hf_config())
        if not schedule:
            return size, tokens
        temporal = self.get_hf_config().vision_config.temporal_patch_size
        slices = max(math.ceil(num_frames / temporal), 1)
        return size, merged_item_tokens(tokens // slices, slices, schedule)


class _ProcessorMixin:
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.get_hf_config()
        schedule = merge_schedule(config)
        if not schedule:
            return updates
        if getattr(self.info.ctx.get_mm_config(), "video_pruning_rate", None):
            raise ValueError("aim's merging and vLLM's --video-pruning-rate (EVS) cannot both reduce the same video; choose one")
        merge_size = config.vision_config.spatial_merge_size

        def merged(update):
            def replacement(item_idx: int):
                tokens = update.replacement(item_idx)
                grid = out_mm_kwargs[update.modality][item_idx][f"{update.modality}_grid_thw"].data
                slices, per_slice = _frame_tokens(grid.tolist(), merge_size)
                return tokens[:1] * merged_item_tokens(per_slice, slices, schedule)

            return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)

        return [merged(update) for update in updates]


class _ModelMixin:
    def _process_image_input(self, image_input):
        return self._aim_merge("image", super()._process_image_input(image_input), image_input["image_grid_thw"])

    def _process_video_input(self, video_input):
        return self._aim_merge("video", super()._process_video_input(video_input), video_input["video_grid_thw"])

    def _aim_merge(self, kind: str, items, grid_thw):
        schedule = merge_schedule(self.config)
        if not schedule:
            return items
        merge_size = self.config.vision_config.spatial_merge_size
        out = []
        for item, grid in zip(items, grid_thw.tolist()):
            slices, per_slice = _frame_tokens(grid, merge_size)
            check_count(kind, item.shape[0], slices * per_slice)
            merged = merge_item(item, slices, schedule)
            check_count(kind, merged.shape[0], merged_item_tokens(per_slice, slices, schedule))
            out.append(merged)
        return tuple(out)

    def get_encoder_cudagraph_config(self):
        # encoder CUDA graphs (GPU, opt-in) bypass _process_*_input: keep them off while merging,
        # or vLLM would place unmerged embeddings and cut them to the placeholders without a word
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(config, modalities=[]) if merge_schedule(self.config) else config

    def iter_mm_grid_thw(self, mm_features):
        schedule = merge_schedule(self.config)
        for offset, grid_t, grid_h, grid_w, t_factor in super().iter_mm_grid_thw(mm_features):
            if schedule:  # each temporal slice's merged tokens as one row (aim.positions)
                grid_h, grid_w = 1, group_size_after_merge(grid_h * grid_w, schedule)
            yield offset, grid_t, grid_h, grid_w, t_factor


class AimQwen2VLProcessingInfo(_InfoMixin, Qwen2VLProcessingInfo):
    pass


class AimQwen2VLMultiModalProcessor(_ProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    AimQwen2VLMultiModalProcessor, info=AimQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class AimQwen2VLForConditionalGeneration(_ModelMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with aim's merge stage (on when the config sets ``aim_merge_keep``)."""


class AimQwen2_5_VLProcessingInfo(_InfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class AimQwen2_5_VLMultiModalProcessor(_ProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    AimQwen2_5_VLMultiModalProcessor, info=AimQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class AimQwen2_5_VLForConditionalGeneration(_ModelMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with aim's merge stage (on when the config sets ``aim_merge_keep``)."""
