"""``aim_qwen2_5_vl``: lmms-eval's ``qwen2_5_vl`` (chat by default, simple with ``--force_simple``)
with AIM applied after loading."""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5VLChat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5VLSimple

from ..base import AIMModelMixin


class AimQwen2_5VL(AIMModelMixin, _Qwen2_5VLSimple):
    AIM_MODEL_ID = "aim_qwen2_5_vl"
    is_simple = True


class AimQwen2_5VLChat(AIMModelMixin, _Qwen2_5VLChat):
    AIM_MODEL_ID = "aim_qwen2_5_vl"
    is_simple = False
