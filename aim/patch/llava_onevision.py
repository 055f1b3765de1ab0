"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): anyres images and videos.

Video: SigLIP patches pooled 2x2 per frame (27x27 -> 14x14 = 196 at 384 px), frames laid end
to end and one ``image_newline`` closing the video; each frame is one merge group, the
newline is never merged. Images as LLaVA-NeXT. Written for transformers 5.x (checked on 5.23).
"""

from __future__ import annotations

from .base import Family
from .llava_next import anyres_image_groups
from .llava_next_video import frame_groups


class LlavaOnevisionFamily(Family):
    name = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")

    def image_groups(self, model, features, call):
        return anyres_image_groups(model, features)

    def video_groups(self, model, features, call):
        return frame_groups(features, call.arguments["pixel_values_videos"].shape[1], trailing_markers=1)
