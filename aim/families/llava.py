"""LLaVA-1.5 (``model_type`` "llava", `LlavaForConditionalGeneration`): one merge group per image.

Written for transformers 5.21-5.24: ``get_image_features`` returns the projected patch features of
each image as a list in ``pooler_output``.
"""

from __future__ import annotations

from .base import IMAGE_ID, VISION_HIDDEN, Family

PATCH = 8  # patch size of the tiny CLIP / SigLIP towers


def clip_config(image_size: int):
    import transformers as tf

    return tf.CLIPVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, projection_dim=VISION_HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=PATCH,
    )


def pinpoints(size: int) -> list[list[int]]:
    return [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]


def still_images(model, rand, batch: int) -> dict:
    size = model.config.vision_config.image_size
    import torch

    return {"pixel_values": torch.stack([rand(i, 3, size, size) for i in range(batch)])}


def video_frames(model, rand, batch: int, num_frames: int) -> dict:
    size = model.config.vision_config.image_size
    import torch

    return {"pixel_values_videos": torch.stack([rand(i, num_frames, 3, size, size) for i in range(batch)])}


class LlavaFamily(Family):
    model_type = "llava"
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")
    tiny_image_size = 48
    tiny_bos = True

    def image_groups(self, model, features, call):
        import torch

        return [[torch.arange(item.shape[0])] for item in features]

    def tiny_config(self, text, image_size):
        import transformers as tf

        size = image_size or self.tiny_image_size
        return tf.LlavaConfig(
            vision_config=clip_config(size), text_config=tf.LlamaConfig(**text),
            image_token_index=IMAGE_ID, image_seq_length=(size // PATCH) ** 2,
        )

    def tiny_visual_inputs(self, model, kind, num_frames, image_sizes, rand, batch):
        return still_images(model, rand, batch)


FAMILIES = (LlavaFamily(),)
