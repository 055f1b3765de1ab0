"""LLaVA-OneVision (``model_type`` "llava_onevision"): anyres images and videos.

Video: SigLIP patches pooled 2x2 per frame (27x27 -> 14x14 = 196 at 384 px), frames laid end to end
and one ``image_newline`` closing the video; each frame is one merge group, the newline is never
merged. Images as LLaVA-NeXT. Written for transformers 5.21-5.24.
"""

from __future__ import annotations

import math

from .base import IMAGE_ID, VIDEO_ID, VISION_HIDDEN, Family
from .llava import PATCH, pinpoints, video_frames
from .llava_next import anyres_image_groups, anyres_images
from .llava_next_video import frame_groups


class LlavaOnevisionFamily(Family):
    model_type = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    supports_video = True
    encodes_fewer_frames = True
    video_markers = 1  # the image_newline closing each video
    tiny_image_size = 64
    tiny_anyres = True

    def image_groups(self, model, features, call):
        return anyres_image_groups(model, features)

    def video_groups(self, model, features, call):
        return frame_groups(features, call.arguments["pixel_values_videos"].shape[1], trailing_markers=1)

    def default_tokens_per_frame(self, spec):
        grid = spec.vision.grid if spec.vision else None
        return math.ceil(grid / 2) ** 2 if grid else None  # 27x27 -> 14x14 = 196 at 384 px

    def tiny_config(self, text, image_size):
        import transformers as tf

        size = image_size or self.tiny_image_size
        vision = tf.SiglipVisionConfig(
            hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=2,
            num_attention_heads=2, image_size=size, patch_size=PATCH, vision_use_head=False,
        )
        return tf.LlavaOnevisionConfig(
            vision_config=vision, text_config=tf.Qwen2Config(use_sliding_window=False, **text),
            image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, image_grid_pinpoints=pinpoints(size),
            vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full", vision_feature_layer=-1,
        )

    def tiny_visual_inputs(self, model, kind, num_frames, image_sizes, rand, batch):
        if kind == "video":
            return video_frames(model, rand, batch, num_frames)
        return anyres_images(model, rand, batch, image_sizes)


FAMILIES = (LlavaOnevisionFamily(),)
