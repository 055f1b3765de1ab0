"""Analytic prefill / decode FLOPs and KV-cache memory of a model under an AIM configuration.

Counting convention (`CONVENTION`, the one that reproduces the paper's 99.63 -> 14.76 TFLOPs for
LLaVA-OneVision-7B): FLOPs = 2 x multiply-accumulates of the LLM decoder layers only: q/k/v/o
projections, the gated MLP (gate, up, down), and QK^T and AV over the full ``n x n`` (no causal
halving). Not counted: norms, RoPE, softmax, residual adds, biases, the
embedding and LM head, and AIM's own work (merging before the LLM, PageRank importance at
pruning layers). The vision tower (and projector) is estimated separately and is the same
with and without AIM (merging happens after it). ``attention="causal"`` counts only the
query-key pairs a causal kernel computes (``n (n + 1) / 2``): closer to measured time, since
flash / sdpa ``is_causal`` kernels skip the upper triangle the paper's convention counts.

Token counts use the engine's rounding, so they match ``aim.last_stats(model)``: each merge
group (frame / crop) keeps ``group_size_after_merge(n, merge_schedule, merge_method)`` tokens, and decoder layer
``l`` sees ``visual_tokens_kept(visual_in_llm, keep_ratios[l])`` visual tokens plus every text
token (text is never pruned).

    from aim.flops import compare, video_input
    report = compare("llava-onevision-qwen2-7b", video_input("llava-onevision-qwen2-7b", frames=32,
                     tokens_per_frame=196, text_tokens=100))
    report.baseline.prefill_tflops, report.aim.prefill_tflops, report.prefill_ratio
"""

from .cost import (
    DTYPE_BYTES,
    TERA,
    Comparison,
    CostReport,
    LayerCost,
    SweepPoint,
    compare,
    estimate,
    prefill_flops,
    sweep,
    vision_flops,
    visual_tokens_per_layer,
)
from .inputs import InputSpec, image_input, video_input
from .model_spec import CONVENTION, MODEL_CONFIG_DIR, ModelSpec, builtin_models, load_model

__all__ = [
    "CONVENTION",
    "DTYPE_BYTES", "MODEL_CONFIG_DIR", "TERA", "Comparison", "CostReport", "InputSpec", "LayerCost", "ModelSpec", "SweepPoint",
    "builtin_models", "compare", "estimate", "image_input", "load_model", "prefill_flops", "sweep", "video_input", "vision_flops",
    "visual_tokens_per_layer",
]
