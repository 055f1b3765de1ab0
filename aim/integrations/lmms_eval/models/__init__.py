"""The aim models for lmms-eval, one module per model id.

``AVAILABLE_MODELS`` serves lmms-eval's legacy plugin variable
(``LMMS_EVAL_PLUGINS=aim.integrations.lmms_eval``, class path ``<plugin>.models.<id>.<class>``);
the entry point ``lmms_eval.models`` (see ``aim.integrations.lmms_eval.manifests``) is the
preferred registration and also exposes the chat variants.
"""

AVAILABLE_MODELS = {
    "aim_llava_hf": "AimLlavaHf",
    "aim_qwen2_vl": "AimQwen2VL",
    "aim_qwen2_5_vl": "AimQwen2_5VL",
    "aim_qwen3_vl": "AimQwen3VL",
}
