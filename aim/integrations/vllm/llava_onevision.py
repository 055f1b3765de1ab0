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
from .settings import check_count, merge_schedule, position_rule

NEWLINES = 1  # the image_newline closing each video


def image_parts(config, height: int, width: int) -> tuple[int, int, int]:
    """(base view, high-resolution grid, newline) tokens vLLM 0.32 gives an image of `height` x
    `width` pixels, by its own formulas (LLaVA-NeXT's crop grid, LLaVA-OneVision's unpadding and
    ``anyres_max_9`` shrinking, whose method reads no instance state); the processing info counts
    placeholders and the model checks the encoder's layout with it."""
    vision = config.vision_config
    patches = vision.image_size // vision.patch_size
    rows, cols = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, vision.image_size)
    grid, newlines = LlavaOnevisionProcessingInfo._get_num_unpadded_features(
        None, original_height=height, original_width=width, npatches=patches, num_patch_height=rows, num_patch_width=cols,
    )
    return patches**2, grid, newlines


def _layout_error(what: str) -> RuntimeError:
    return RuntimeError(f"aim's vLLM plugin: {what}; vLLM's LLaVA-OneVision image layout is not the one the plugin "
                        "was written for (vLLM 0.32)")


class AimLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        total = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        schedule = merge_schedule(self.get_hf_config())
        if not schedule:
            return total
        parts = image_parts(self.get_hf_config(), image_height, image_width)
        if sum(parts) != total:
            raise _layout_error(f"an image of {image_width}x{image_height} has {total} tokens, not {parts} (base, grid, newlines)")
        return merged_anyres_tokens(*parts, schedule)

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        schedule = merge_schedule(self.get_hf_config())
        if not schedule:
            return super().get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames)
        per_frame = self._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return merged_item_tokens(per_frame, num_frames, schedule, markers=NEWLINES)


class AimLlavaOnevisionMultiModalProcessor(LlavaOnevisionMultiModalProcessor):
    pass  # the placeholders come from the processing info's image / video token counts


@MULTIMODAL_REGISTRY.register_processor(
    AimLlavaOnevisionMultiModalProcessor, info=AimLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class AimLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with aim's merging of images and videos (on when the config sets ``aim_merge_keep``)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        # 1-D RoPE numbered by vLLM before encoding: merged tokens get contiguous positions only
        position_rule(vllm_config.model_config.hf_config, "LLaVA-OneVision", destination_supported=False)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _process_image_input(self, image_input):
        images = super()._process_image_input(image_input)
        schedule = merge_schedule(self.config)
        if not schedule or isinstance(image_input, LlavaOnevisionImageEmbeddingInputs):
            return images
        sizes = image_input.get("image_sizes")
        merged = []
        for i, image in enumerate(images):
            # the image size the processing info counted the placeholders for (vLLM's default: the tile size)
            height, width = sizes[i].tolist() if sizes is not None else (self.config.vision_config.image_size,) * 2
            base, grid, newlines = image_parts(self.config, height, width)
            groups = groups_without_markers(image, self.image_newline, base_tokens=base)
            found = (image.shape[0], groups[1].numel() if len(groups) > 1 else 0)
            if found != (base + grid + newlines, grid):
                raise _layout_error(f"the encoder returned {found[0]} features with a grid of {found[1]} for a "
                                    f"{width}x{height} image; expected {base} + {grid} + {newlines} newlines")
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

