"""`aim demo`: baseline vs AIM, side by side, on the embedded default model and a synthetic video.

The embedded default is a LLaVA-OneVision-class model (SigLIP tower, 2x2 pooling to 196 tokens
per frame as in LLaVA-OneVision-7B, Qwen2 decoder) built offline from code with fixed random
weights: it shows what AIM does to the tokens, the KV cache and the prefill time, not answer quality.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from . import apply_aim, last_stats
from .tiny import build_tiny_model, make_inputs

DEMO_MODEL = dict(family="llava_onevision", num_layers=12, hidden_size=384, image_size=224, seed=0)
DEMO_TEXT_TOKENS = 24
SPECIAL_IDS = list(range(8))  # placeholders and markers of the tiny vocabulary


def build_demo_model(attn_implementation: str = "sdpa"):
    """The embedded default model (deterministic random weights)."""
    return build_tiny_model(attn_implementation=attn_implementation, **DEMO_MODEL)


def _kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def _measure(model, inputs, repeats: int, new_tokens: int) -> dict:
    with torch.no_grad():
        model(**inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(**inputs, use_cache=True)
            times.append(time.perf_counter() - start)
        stats = last_stats(model)
        generated = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, suppress_tokens=SPECIAL_IDS
        )
    return {
        "tokens_entering_llm": stats.tokens_per_layer[0][0],
        "visual_tokens_before_merge": stats.visual_tokens_before_merge[0],
        "visual_tokens_entering_llm": stats.visual_tokens_after_merge[0],
        "tokens_per_layer": [t[0] for t in stats.tokens_per_layer],
        "kv_cache_entries": sum(stats.kv_cache_entries_per_layer),
        "kv_cache_bytes": _kv_bytes(out.past_key_values),
        "prefill_seconds": statistics.median(times),
        "generated_ids": generated[0, inputs["input_ids"].shape[1] :].tolist(),
    }


def run_demo(
    frames: int = 8,
    repeats: int = 3,
    new_tokens: int = 8,
    attn_implementation: str = "sdpa",
    as_json: bool = False,
    **aim_options,
) -> int:
    """Run the demo and print the comparison; returns a process exit code."""
    if frames < 1 or repeats < 1 or new_tokens < 1:
        raise ValueError("frames, repeats and new tokens must be >= 1")
    torch.manual_seed(0)
    model = build_demo_model(attn_implementation)
    inputs = make_inputs(model, kind="video", num_frames=frames, text_lengths=(DEMO_TEXT_TOKENS,))
    apply_aim(model, enabled=False)
    baseline = _measure(model, inputs, repeats, new_tokens)
    apply_aim(model, **aim_options)
    aim = _measure(model, inputs, repeats, new_tokens)
    config = model._aim.config
    if as_json:
        print(json.dumps({"config": repr(config), "baseline": baseline, "aim": aim}, indent=2))
        return 0
    print(f"aim demo: LLaVA-OneVision-class model (random weights, {DEMO_MODEL['num_layers']} layers), "
          f"synthetic {frames}-frame video, {torch.get_num_threads()} CPU threads")
    print(f"AIM config: {config}\n")
    rows = [
        ("visual tokens (vision tower)", "visual_tokens_before_merge", "{:d}"),
        ("visual tokens entering LLM", "visual_tokens_entering_llm", "{:d}"),
        ("tokens entering LLM", "tokens_entering_llm", "{:d}"),
        ("KV-cache entries (all layers)", "kv_cache_entries", "{:d}"),
        ("KV-cache MiB", "kv_cache_bytes", "{:.2f}"),
        ("prefill ms (median of %d)" % repeats, "prefill_seconds", "{:.1f}"),
    ]
    print(f"{'':32s}{'baseline':>12s}{'AIM':>12s}{'ratio':>9s}")
    for label, key, fmt in rows:
        b, a = baseline[key], aim[key]
        if key == "kv_cache_bytes":
            b, a = b / 2**20, a / 2**20
        if key == "prefill_seconds":
            b, a = b * 1000, a * 1000
        print(f"{label:32s}{fmt.format(b):>12s}{fmt.format(a):>12s}{b / a if a else float('inf'):>8.2f}x")
    print("\ntokens per layer:")
    print(f"{'layer':>7s}{'baseline':>10s}{'AIM':>8s}")
    for layer, (b, a) in enumerate(zip(baseline["tokens_per_layer"], aim["tokens_per_layer"])):
        print(f"{layer:>7d}{b:>10d}{a:>8d}")
    print(f"\ngenerated ids, baseline: {baseline['generated_ids']}")
    print(f"generated ids, AIM:      {aim['generated_ids']}")
    print("(random weights: the ids show that generation runs, not that answers match;")
    print(" prefill time includes the vision tower, which AIM does not change)")
    return 0
