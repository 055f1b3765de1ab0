"""LLaVA-NeXT-Video (``model_type`` "llava_next_video"): anyres images, pooled video frames.

Video features come as ``(videos, frames * tokens_per_frame, dim)`` after the model's spatial
pooling (before its projector); each frame is one merge group. Written for transformers 5.21-5.24
(5.20 and earlier returned the features per frame: aim refuses those, see `aim.layout`).
"""

from __future__ import annotations

from .base import IMAGE_ID, VIDEO_ID, Family
from .llava import PATCH, clip_config, pinpoints, video_frames
from .llava_next import anyres_image_groups, anyres_images


def frame_groups(features, frames: int, trailing_markers: int = 0) -> list:
    """Per-frame groups of ``(videos, frames * tokens [+ markers], dim)`` video features."""
    from ..layout import chunk_groups

    return [chunk_groups(video.shape[0] - trailing_markers, frames) for video in features]


class LlavaNextVideoFamily(Family):
    model_type = "llava_next_video"
    class_names = ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel")
    supports_video = True
    encodes_fewer_frames = True
    projector_on_patches = False  # frames are pooled before the projector
    tiny_image_size = 64
    tiny_anyres = True

    def image_groups(self, model, features, call):
        return anyres_image_groups(model, features)

    def video_groups(self, model, features, call):
        return frame_groups(features, call.arguments["pixel_values_videos"].shape[1])

    def default_tokens_per_frame(self, spec):
        grid = spec.vision.grid if spec.vision else None
        return (grid // spec.pool_stride) ** 2 if grid else None  # 24x24 -> 12x12 = 144 at 336 px

    def tiny_config(self, text, image_size):
        import transformers as tf

        size = image_size or self.tiny_image_size
        grid = size // PATCH
        return tf.LlavaNextVideoConfig(
            vision_config=clip_config(size), text_config=tf.Qwen2Config(use_sliding_window=False, **text),
            image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, image_grid_pinpoints=pinpoints(size),
            spatial_pool_mode="average", spatial_pool_stride=2, image_seq_length=grid**2, video_seq_length=(grid // 2) ** 2,
        )

    def tiny_visual_inputs(self, model, kind, num_frames, image_sizes, rand, batch):
        if kind == "video":
            return video_frames(model, rand, batch, num_frames)
        return anyres_images(model, rand, batch, image_sizes)


FAMILIES = (LlavaNextVideoFamily(),)
