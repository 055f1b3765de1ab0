"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): any-resolution images.

Each image's features are its base view (``(image_size / patch_size)^2`` tokens) followed by
the unpadded high-resolution grid with an ``image_newline`` token closing every row. The
base view and the grid are merged as separate groups; newline tokens are never merged.
Written for transformers 5.x (checked on 5.23: ``pack_image_features``).
"""

from __future__ import annotations

import torch

from ..layout import groups_without_markers
from .base import Family


def anyres_image_groups(model, features) -> list[list[torch.Tensor]]:
    """Groups of any-resolution images: base view and grid, newline tokens left out."""
    vision = model.config.vision_config
    base = (vision.image_size // vision.patch_size) ** 2
    marker = getattr(model, "image_newline", None)
    return [groups_without_markers(item, marker, base_tokens=base) for item in features]


class LlavaNextFamily(Family):
    name = "llava_next"
    class_names = ("LlavaNextForConditionalGeneration", "LlavaNextModel")

    def image_groups(self, model, features, call):
        return anyres_image_groups(model, features)

    def video_groups(self, model, features, call):
        return []
