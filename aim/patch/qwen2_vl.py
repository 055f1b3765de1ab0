"""Qwen2-VL and Qwen2.5-VL: per-frame groups from ``grid_thw``.

The vision tower emits, per image or video, ``t * (h / m) * (w / m)`` tokens (``m`` the
spatial merge size), temporal frame by frame in row-major order; each temporal frame is
one merge group. 3-D M-RoPE positions are computed by the model over the full prompt and
gathered by the engine, so a merged token takes its destination token's position.
Written for transformers 5.x (checked on 5.23).
"""

from __future__ import annotations

from ..layout import chunk_groups
from .base import Family


def grid_groups(model, grid_thw) -> list:
    merge = model.visual.spatial_merge_size
    return [chunk_groups(t * (h // merge) * (w // merge), t) for t, h, w in grid_thw.tolist()]


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    class_names = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
    )

    def image_groups(self, model, features, call):
        return grid_groups(model, call.arguments["image_grid_thw"])

    def video_groups(self, model, features, call):
        return grid_groups(model, call.arguments["video_grid_thw"])
