"""LLaVA-NeXT (``model_type`` "llava_next", `LlavaNextForConditionalGeneration`): any-resolution images.

Each image's features are its base view (``(image_size / patch_size)^2`` tokens) followed by the
unpadded high-resolution grid with an ``image_newline`` token closing every row. The base view and
the grid are merged as separate groups; newline tokens are never merged. Written for transformers
5.21-5.24 (``pack_image_features``).
"""

from __future__ import annotations

from .base import IMAGE_ID, Family
from .llava import PATCH, clip_config, pinpoints


def anyres_image_groups(model, features) -> list:
    """Groups of any-resolution images: base view and grid, newline tokens left out."""
    from ..layout import groups_without_markers

    vision = model.config.vision_config
    base = (vision.image_size // vision.patch_size) ** 2
    marker = getattr(model, "image_newline", None)
    return [groups_without_markers(item, marker, base_tokens=base) for item in features]


def anyres_images(model, rand, batch: int, image_sizes) -> dict:
    """One base view + one tile per pinpoint cell, zero-padded to the largest count in the batch."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = model.config.vision_config.image_size
    sizes = list(image_sizes) if image_sizes is not None else [(size, size * 3 // 2)] * batch
    if len(sizes) != batch:
        raise ValueError(f"got {len(sizes)} image_sizes for batch_size {batch}")
    n_patches = [image_size_to_num_patches(list(s), model.config.image_grid_pinpoints, size) for s in sizes]
    pixel_values = torch.zeros(batch, max(n_patches), 3, size, size, device=model.device, dtype=model.dtype)
    for i, n in enumerate(n_patches):
        pixel_values[i, :n] = rand(i, n, 3, size, size)
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.long, device=model.device)}


class LlavaNextFamily(Family):
    model_type = "llava_next"
    class_names = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    tiny_image_size = 48
    tiny_bos = True
    tiny_anyres = True

    def image_groups(self, model, features, call):
        return anyres_image_groups(model, features)

    def tiny_config(self, text, image_size):
        import transformers as tf

        size = image_size or self.tiny_image_size
        return tf.LlavaNextConfig(
            vision_config=clip_config(size), text_config=tf.MistralConfig(sliding_window=None, **text),
            image_token_index=IMAGE_ID, image_grid_pinpoints=pinpoints(size), image_seq_length=(size // PATCH) ** 2,
        )

    def tiny_visual_inputs(self, model, kind, num_frames, image_sizes, rand, batch):
        return anyres_images(model, rand, batch, image_sizes)


FAMILIES = (LlavaNextFamily(),)
