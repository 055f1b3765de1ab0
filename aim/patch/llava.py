"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one merge group per image.

Written for transformers 5.x (checked on 5.23): ``get_image_features`` returns the
projected patch features of each image as a list in ``pooler_output``.
"""

from __future__ import annotations

import torch

from .base import Family




class LlavaFamily(Family):
    name = "llava"
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")

    def image_groups(self, model, features, call):
        return [[torch.arange(item.shape[0])] for item in features]

    def video_groups(self, model, features, call):  # LLaVA-1.5 has no video path
        return []
