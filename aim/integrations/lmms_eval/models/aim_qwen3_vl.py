"""``aim_qwen3_vl``: lmms-eval's ``qwen3_vl`` (Qwen3-VL, dense and MoE; chat by default, simple with
``--force_simple``) with AIM applied after loading (the family: ``aim.families.qwen3_vl``)."""

from __future__ import annotations

from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as _Qwen3VLChat
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as _Qwen3VLSimple

from ..base import AIMModelMixin


class AimQwen3VL(AIMModelMixin, _Qwen3VLSimple):
    AIM_MODEL_ID = "aim_qwen3_vl"
    is_simple = True


class AimQwen3VLChat(AIMModelMixin, _Qwen3VLChat):
    AIM_MODEL_ID = "aim_qwen3_vl"
    is_simple = False
