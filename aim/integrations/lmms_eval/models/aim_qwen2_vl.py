"""``aim_qwen2_vl``: lmms-eval's ``qwen2_vl`` with AIM applied after loading."""

from __future__ import annotations

from lmms_eval.models.simple.qwen2_vl import Qwen2_VL as _Qwen2VL

from ..base import AIMModelMixin


class AimQwen2VL(AIMModelMixin, _Qwen2VL):
    AIM_MODEL_ID = "aim_qwen2_vl"
    is_simple = True
