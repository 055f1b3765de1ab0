"""LLaVA-OneVision in vLLM with aim's merging of videos (see the package docstring).

A video's features are its frames (pooled grids) end to end and one closing ``image_newline``,
which never merges; each frame merges on its own. The count comes from
`aim.counts.merged_item_tokens` in the processing info (which writes the placeholders) and is
checked against what the encoder returns. LLaMA-style 1-D RoPE numbers the shorter prompt on
without gaps (``merged_positions="contiguous"``). Images (any-resolution crops with newlines)
are not merged by the plugin: they are served as vLLM serves them (a warning says so when the
deployment merges), unlike aim's transformers path, which merges them too. Written for vLLM 0.32.
"""

from __future__ import annotations

import logging
import math

from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...counts import merged_item_tokens
from ...merge import merge_item
from .settings import check_count, merge_schedule

logger = logging.getLogger(__name__)
NEWLINES = 1  # the image_newline closing each video


class AimLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        schedule = merge_schedule(self.get_hf_config())
        if not schedule:
            return super().get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames)
        per_frame = self._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return merged_item_tokens(per_frame, num_frames, schedule, markers=NEWLINES)


class AimLlavaOnevisionMultiModalProcessor(LlavaOnevisionMultiModalProcessor):
    pass  # the placeholders come from the processing info's video token count


@MULTIMODAL_REGISTRY.register_processor(
    AimLlavaOnevisionMultiModalProcessor, info=AimLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class AimLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with aim's merging of videos (on when the config sets ``aim_merge_keep``)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if merge_schedule(self.config):
            logger.warning("aim's vLLM plugin merges LLaVA-OneVision videos; images are served unmerged")

    def _process_video_pixels(self, inputs):
        videos = super()._process_video_pixels(inputs)
        schedule = merge_schedule(self.config)
        if not schedule:
            return videos
        frames = [len(video) for video in inputs["pixel_values_videos"]]
        # the frame size the processing info assumed when it wrote the placeholders
        grid = self.config.vision_config.image_size // self.config.vision_config.patch_size
        per_frame = math.ceil(grid / getattr(self.config, "spatial_pool_stride", 2)) ** 2
        merged = []
        for video, count in zip(videos, frames):
            features = video.reshape(-1, video.shape[-1])
            check_count("video", features.shape[0], per_frame * count + NEWLINES)
            out = merge_item(features, count, schedule, markers=NEWLINES)
            check_count("video", out.shape[0], merged_item_tokens(per_frame, count, schedule, markers=NEWLINES))
            merged.append(out)
        return merged
