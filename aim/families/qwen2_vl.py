"""Qwen2-VL and Qwen2.5-VL (``model_type`` "qwen2_vl", "qwen2_5_vl"): per-frame groups from ``grid_thw``.

The vision tower emits, per image or video, ``t * (h / m) * (w / m)`` tokens (``m`` the spatial
merge size), temporal frame by frame in row-major order; each temporal frame is one merge group.
3-D M-RoPE positions are computed by the model over the full prompt and gathered by the engine, so
a merged token takes its destination token's position. Since transformers 5.x the decoder gets
4-row position ids (text positions first, then t / h / w): the rotary embedding takes the last 3.
Written for transformers 5.21-5.24.
"""

from __future__ import annotations

import math

from .base import VIDEO_ID, IMAGE_ID, VISION_END_ID, VISION_HIDDEN, VISION_START_ID, Family, mrope_section

PATCH = 14
IMAGE_GRID = (12, 16)  # (h, w) in patches of the tiny inputs -> 6x8 = 48 merged tokens per image / slice


def grid_groups(model, grid_thw) -> list:
    from ..layout import chunk_groups

    merge = model.visual.spatial_merge_size
    return [chunk_groups(t * (h // merge) * (w // merge), t) for t, h, w in grid_thw.tolist()]


class Qwen2VLFamily(Family):
    model_type = "qwen2_vl"
    class_names = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    supports_video = True
    vision_fields = ("embed_dim", "depth", "patch_size")
    tiny_vision_markers = True
    tiny_token_types = True

    def image_groups(self, model, features, call):
        return grid_groups(model, call.arguments["image_grid_thw"])

    def video_groups(self, model, features, call):
        return grid_groups(model, call.arguments["video_grid_thw"])

    def rope_position_ids(self, position_ids):
        return position_ids[1:] if position_ids.ndim == 3 and position_ids.shape[0] == 4 else position_ids

    def frames_per_group(self, vision):
        return vision.temporal_patch_size if vision is not None else 1  # frame pairs form one temporal slice

    def default_tokens_per_image(self, spec):
        return None  # dynamic resolution: the image decides

    def vision_shape(self, vision, llm):
        from ..flops.model_spec import VisionShape

        width, mlp, out = self._vision_widths(vision)
        return VisionShape(
            kind=self.model_type, hidden_size=width, intermediate_size=mlp, num_layers=int(vision.get("depth", 32)),
            patch_size=int(vision.get("patch_size", 14)),
            num_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            projector_hidden=int(out or llm.hidden_size),
        )

    def _vision_widths(self, vision) -> tuple[int, int, int | None]:
        """(ViT width, ViT MLP width, merger output): Qwen2-VL calls its ViT width ``embed_dim``."""
        width = int(vision.get("embed_dim", 1280))
        return width, int(width * vision.get("mlp_ratio", 4)), vision.get("hidden_size")

    def _tiny_vision(self, hidden_size: int) -> dict:
        # Qwen2-VL: ``embed_dim`` is the ViT width, ``hidden_size`` the merger output (= text hidden).
        return dict(embed_dim=VISION_HIDDEN, hidden_size=hidden_size, mlp_ratio=2)

    def _tiny_class(self):
        import transformers as tf

        return tf.Qwen2VLConfig

    def tiny_config(self, text, image_size):
        if image_size is not None:
            raise ValueError("image_size applies to the llava families; Qwen inputs set their own grid")
        text = dict(text, rope_parameters={
            "rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section(text["hidden_size"] // 4),
        })
        vision = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                      **self._tiny_vision(text["hidden_size"]))
        return self._tiny_class()(
            text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        )

    def tiny_visual_inputs(self, model, kind, num_frames, image_sizes, rand, batch):
        import torch

        vc = model.config.vision_config
        t = 1 if kind == "image" else math.ceil(num_frames / vc.temporal_patch_size)
        grid = torch.tensor([[t, *IMAGE_GRID]] * batch, dtype=torch.long, device=model.device)
        row = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        patches = torch.cat([rand(i, int(grid[i].prod()), row) for i in range(batch)])
        if kind == "image":
            return {"pixel_values": patches, "image_grid_thw": grid}
        return {"pixel_values_videos": patches, "video_grid_thw": grid}


class Qwen2_5_VLFamily(Qwen2VLFamily):
    model_type = "qwen2_5_vl"
    class_names = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    vision_fields = ("hidden_size", "intermediate_size", "depth", "patch_size")

    def _vision_widths(self, vision) -> tuple[int, int, int | None]:
        return int(vision.get("hidden_size", 1280)), int(vision.get("intermediate_size", 3420)), vision.get("out_hidden_size")

    def _tiny_vision(self, hidden_size: int) -> dict:
        # Qwen2.5-VL: ``hidden_size`` is the ViT width, ``out_hidden_size`` the merger output. A window of
        # 112 px = 4 merged units (8x8 patches), so a 12x16-patch image really uses windowed attention;
        # block 1 is a full-attention block.
        return dict(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, out_hidden_size=hidden_size,
                    window_size=4 * 2 * PATCH, fullatt_block_indexes=[1], tokens_per_second=2)

    def _tiny_class(self):
        import transformers as tf

        return tf.Qwen2_5_VLConfig


FAMILIES = (Qwen2VLFamily(), Qwen2_5_VLFamily())
