"""LLaVA-OneVision in vLLM with aim's merging of images and videos (see the package docstring).

A video's features are its frames (pooled grids) end to end and one closing ``image_newline``,
which never merges; each frame merges on its own (`aim.counts.merged_item_tokens`). An image's
features are its base view, then its unpadded high-resolution grid with an ``image_newline``
closing every row; the base view and the grid merge as two groups and the newlines stay, as in
aim's transformers path (`aim.counts.merged_anyres_tokens`). The processing info (which writes the
placeholders) computes the merged counts, and the model checks what it returns against them.
LLaMA-style 1-D RoPE numbers the shorter prompt on without gaps (``merged_positions="contiguous"``).
Embeddings passed in place of pixels are served as given. Written for vLLM 0.32.
"""

from __future__ import annotations

import math

from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionImageEmbeddingInputs,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...counts import merged_anyres_tokens, merged_item_tokens
from ...layout import groups_without_markers
from ...merge import merge_item, merge_item_groups
from .settings import check_count, merge_schedule

NEWLINES = 1  # the image_newline closing each video


class AimLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        total = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        schedule = merge_schedule(self.get_hf_config())
        if not schedule:
            return total
        config, encoder = self.get_hf_config(), self.get_vision_encoder_info()
        rows, cols = get_anyres_image_grid_shape(
            (image_height, image_width), config.image_grid_pinpoints, encoder.get_image_size(),
        )
        grid, newlines = self._get_num_unpadded_features(
            original_height=image_height, original_width=image_width, npatches=encoder.get_patch_grid_length(),
            num_patch_height=rows, num_patch_width=cols,
        )
        base = total - grid - newlines
        check_count("image", base, encoder.get_patch_grid_length() ** 2)  # the plugin's reading of vLLM's count
        return merged_anyres_tokens(base, grid, newlines, schedule)

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

    def _process_image_input(self, image_input):
        images = super()._process_image_input(image_input)
        schedule = merge_schedule(self.config)
        if not schedule or isinstance(image_input, LlavaOnevisionImageEmbeddingInputs):
            return images
        base = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
        merged = []
        for image in images:
            groups = groups_without_markers(image, self.image_newline, base_tokens=base)
            grid = groups[1].numel() if len(groups) > 1 else 0
            newlines = image.shape[0] - base - grid
            _check_rows(image.shape[0] - base, newlines, groups[1] - base if grid else None)
            out = merge_item_groups(image, groups, schedule)
            check_count("image", out.shape[0], merged_anyres_tokens(base, grid, newlines, schedule))
            merged.append(out)
        return merged

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


def _check_rows(length: int, newlines: int, grid_positions) -> None:
    """The grid part of an image as vLLM lays it out: rows of equal length, each closed by one
    newline (so the newline count equals the processing info's, and so does the merged count)."""
    row = length // newlines if newlines else 0
    ok = newlines > 0 and length % newlines == 0
    if ok and grid_positions is not None:
        ok = bool(((grid_positions % row) != row - 1).all()) and grid_positions.numel() == length - newlines
    if not ok:
        raise RuntimeError(
            f"aim's vLLM plugin expected an image's high-resolution grid as rows closed by newline tokens, got "
            f"{length} features with {newlines} newlines; vLLM's LLaVA-OneVision layout changed"
        )
