"""lmms-eval plugin: AIM versions of lmms-eval's HF model classes, and offline tasks.

Models (each subclasses lmms-eval's own class and calls ``aim.apply_aim`` after it loads):

- ``aim_llava_hf``   LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision through transformers (``llava_hf``)
- ``aim_qwen2_vl``   Qwen2-VL (``qwen2_vl``)
- ``aim_qwen2_5_vl`` Qwen2.5-VL (``qwen2_5_vl``)
- ``aim_qwen3_vl``   Qwen3-VL, dense and MoE (``qwen3_vl``)

Registration: the entry point group ``lmms_eval.models`` (lmms-eval >= 0.6 reads it when
``lmms_eval.models`` is imported)::

    entry_points={"lmms_eval.models": ["aim = aim.integrations.lmms_eval:manifests"]}

or, without installing entry points, lmms-eval's legacy variable
``LMMS_EVAL_PLUGINS=aim.integrations.lmms_eval`` (which also adds this package's ``tasks`` folder
to the task search path).

AIM settings travel in ``--model_args`` (``merge_keep=0.25,prune_start=14,prune_step=0.125``;
``aim=off`` for the baseline); see :mod:`.args`. Costs: :mod:`.cost`. Tasks: :mod:`.make_data`
(the study's test split, task ``aim_study``, checked against the study's own evaluation by
:mod:`.study_check`; synthetic sets, task ``aim_synth``).
"""

from __future__ import annotations

MODELS_PACKAGE = __name__ + ".models"

# model id -> (simple class, chat class or None), mirroring lmms-eval's own registrations
MODEL_CLASSES: dict[str, tuple[str, str | None]] = {
    "aim_llava_hf": ("aim_llava_hf.AimLlavaHf", "aim_llava_hf.AimLlavaHfChat"),
    "aim_qwen2_vl": ("aim_qwen2_vl.AimQwen2VL", None),
    "aim_qwen2_5_vl": ("aim_qwen2_5_vl.AimQwen2_5VL", "aim_qwen2_5_vl.AimQwen2_5VLChat"),
    "aim_qwen3_vl": ("aim_qwen3_vl.AimQwen3VL", "aim_qwen3_vl.AimQwen3VLChat"),
}


def manifests() -> list:
    """lmms-eval `ModelManifest`s of the aim models (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=model_id,
            simple_class_path=f"{MODELS_PACKAGE}.{simple}",
            chat_class_path=f"{MODELS_PACKAGE}.{chat}" if chat else None,
        )
        for model_id, (simple, chat) in MODEL_CLASSES.items()
    ]
