"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): anyres images, pooled video frames.

Video features come as ``(videos, frames * tokens_per_frame, dim)`` after the model's
spatial pooling; each frame is one merge group. Written for transformers 5.x (checked on 5.23).
"""

from __future__ import annotations

from ..layout import chunk_groups
from .base import Family
from .llava_next import anyres_image_groups


def frame_groups(features, frames: int, trailing_markers: int = 0) -> list:
    """Per-frame groups of ``(videos, frames * tokens [+ markers], dim)`` video features."""
    return [chunk_groups(video.shape[0] - trailing_markers, frames) for video in features]


class LlavaNextVideoFamily(Family):
    name = "llava_next_video"
    class_names = ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel")

    def image_groups(self, model, features, call):
        return anyres_image_groups(model, features)

    def video_groups(self, model, features, call):
        return frame_groups(features, call.arguments["pixel_values_videos"].shape[1])
