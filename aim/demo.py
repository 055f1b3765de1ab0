"""`aim demo`: baseline vs AIM, side by side, on the embedded default model and synthetic test clips.

The embedded default (``aim/default_model``) is a small LLaVA-OneVision-class model of
transformers' own classes (SigLIP tower, 2x2 video pooling, Qwen2 decoder) trained from scratch
on the synthetic video QA of `aim.study.data` (``python -m aim.study.train``). The demo shows what
AIM does to the tokens, the KV cache and the prefill time, and whether the answers stay right.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from . import AIMConfig, apply_aim, last_stats
from .compat import output_cache
from .study import data
from .study.evaluate import evaluate
from .study.model import load_default_model, model_inputs, to_inputs


def _kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def _measure(model, processor, clip, shown, questions, repeats: int) -> dict:
    inputs = model_inputs(to_inputs([clip], processor, model.config))
    tokenizer = getattr(processor, "tokenizer", processor)
    with torch.no_grad():
        model(**inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(**inputs, use_cache=True)
            times.append(time.perf_counter() - start)
        stats = last_stats(model)
        answers = []
        for example in shown:  # generate() with the KV cache, as a user would
            prompt = model_inputs(to_inputs([example], processor, model.config))
            generated = model.generate(**prompt, max_new_tokens=1, do_sample=False)
            answers.append(tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:]).strip())
    accuracy = evaluate(model, processor, questions)
    return {
        "tokens_entering_llm": stats.tokens_per_layer[0][0],
        "visual_tokens_before_merge": stats.visual_tokens_before_merge[0],
        "visual_tokens_entering_llm": stats.visual_tokens_after_merge[0],
        "tokens_per_layer": stats.tokens_per_layer_of(0),
        "kv_cache_entries": sum(stats.kv_cache_entries_per_layer),
        "kv_cache_bytes": _kv_bytes(output_cache(out)),
        "prefill_seconds": statistics.median(times),
        "accuracy": accuracy["accuracy"],
        "answers": answers,
    }


def run_demo(
    frames: int = data.NUM_FRAMES,
    repeats: int = 3,
    questions: int = 40,
    attn_implementation: str = "sdpa",
    as_json: bool = False,
    **aim_options,
) -> int:
    """Run the demo and print the comparison; returns a process exit code."""
    if frames < 1 or repeats < 1 or questions < 1:
        raise ValueError("frames, repeats and questions must be >= 1")
    model, processor = load_default_model(attn_implementation=attn_implementation)
    config = AIMConfig().replace(**aim_options)
    config.check_depth(model.config.text_config.num_hidden_layers)  # bad options fail before measuring
    test = data.dataset("test", questions, kinds=data.VIDEO_KINDS, frames=frames)
    shown = test[: len(data.VIDEO_KINDS)]  # one question of each kind
    apply_aim(model, enabled=False)
    baseline = _measure(model, processor, test[0], shown, test, repeats)
    apply_aim(model, config)
    aim = _measure(model, processor, test[0], shown, test, repeats)
    if as_json:
        print(json.dumps({"config": repr(config), "baseline": baseline, "aim": aim}, indent=2))
        return 0
    layers = model.config.text_config.num_hidden_layers
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"aim demo: trained LLaVA-OneVision-class model (aim/default_model, {params:.1f}M parameters, "
          f"{layers} LLM layers), synthetic {frames}-frame test clips, {torch.get_num_threads()} CPU threads")
    print(f"AIM config: {config}\n")
    rows = [
        ("visual tokens (vision tower)", "visual_tokens_before_merge", "{:d}"),
        ("visual tokens entering LLM", "visual_tokens_entering_llm", "{:d}"),
        ("tokens entering LLM", "tokens_entering_llm", "{:d}"),
        ("KV-cache entries (all layers)", "kv_cache_entries", "{:d}"),
        ("KV-cache KiB", "kv_cache_bytes", "{:.1f}"),
        ("prefill ms (median of %d)" % repeats, "prefill_seconds", "{:.1f}"),
    ]
    print(f"{'':32s}{'baseline':>12s}{'AIM':>12s}{'ratio':>9s}")
    for label, key, fmt in rows:
        b, a = baseline[key], aim[key]
        if key == "kv_cache_bytes":
            b, a = b / 2**10, a / 2**10
        if key == "prefill_seconds":
            b, a = b * 1000, a * 1000
        print(f"{label:32s}{fmt.format(b):>12s}{fmt.format(a):>12s}{b / a if a else float('inf'):>8.2f}x")
    print(f"{f'accuracy, {questions} test questions':32s}{baseline['accuracy']:>12.1%}{aim['accuracy']:>12.1%}")
    print("\nanswers (generate, greedy):")
    for example, b, a in zip(shown, baseline["answers"], aim["answers"]):
        print(f"  {example.question:<58s} truth {example.answer:<9s} baseline {b:<9s} AIM {a}")
    print("\ntokens per layer:")
    print(f"{'layer':>7s}{'baseline':>10s}{'AIM':>8s}")
    for layer, (b, a) in enumerate(zip(baseline["tokens_per_layer"], aim["tokens_per_layer"])):
        print(f"{layer:>7d}{b:>10d}{a:>8d}")
    print("(prefill time of one clip, vision tower included: AIM does not change the tower)")
    return 0
