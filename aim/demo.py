"""`aim demo`: baseline vs AIM, side by side, on the embedded default model and synthetic test clips.

The embedded default (``aim/default_model``) is a small LLaVA-OneVision-class model of
transformers' own classes (SigLIP tower, 2x2 video pooling, Qwen2 decoder) trained from scratch
on the synthetic video QA of `aim.study.data` (``python -m aim.study.train``). The demo shows what
AIM does to the tokens, the KV cache and the prefill time, and whether the answers stay right.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import torch

from . import AIMConfig, apply_aim, last_stats
from .budget.profile import PROFILE_FILE
from .compat import output_cache
from .study import data
from .study.evaluate import evaluate, standard_error
from .flops import prefill_flops
from .study.model import DEFAULT_MODEL_DIR, load_default_model, model_inputs, to_inputs


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
        point = stats.budget["point"] if stats.budget else None
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
        "tokens_all_layers": sum(stats.tokens_per_layer_of(0)),
        "kv_cache_entries": sum(stats.kv_cache_entries_per_layer),
        "kv_cache_bytes": _kv_bytes(output_cache(out)),
        "prefill_seconds": statistics.median(times),
        "accuracy": accuracy["accuracy"],
        "answers": answers,
        "flops": prefill_flops(model.config, stats.tokens_per_layer_of(0)),
        "budget_point": point,
    }


DEMO_BUDGETS = (0.5, 0.25)  # FLOPs budgets shown beside the fixed setting


def _describe(model, processor, clip, config: AIMConfig, repeats: int) -> dict | None:
    """The description task with and without the shipped text-only draft, with and without AIM
    (None where the model has no description vocabulary or no draft ships beside it)."""
    from .speculative import DEFAULT_DRAFT_TOKENS, last_draft_stats
    from .study.draft import DEFAULT_DRAFT_DIR, end_token_ids, load_default_draft, timed_greedy

    tokenizer = getattr(processor, "tokenizer", processor)
    if data.DESCRIBE not in tokenizer.get_vocab() or not (DEFAULT_DRAFT_DIR / "model.safetensors").is_file():
        return None
    try:
        described = data.description_of(clip)
    except ValueError:  # a clip of a recipe without descriptions
        return None
    draft, ends = load_default_draft(), end_token_ids(processor)
    asked = dataclasses.replace(clip, qa=(described,))
    prompt = model_inputs(to_inputs([asked], processor, model.config))
    rows = {}
    for name, patch, extra in (
        ("baseline", dict(enabled=False), {}),
        ("baseline + draft", dict(enabled=False), dict(aim_draft=draft)),
        ("AIM", dict(config=config), {}),
        ("AIM + draft", dict(config=config), dict(aim_draft=draft)),
    ):
        apply_aim(model, **patch)
        runs = [timed_greedy(model, prompt, ends, **extra) for _ in range(repeats)]
        stats = last_draft_stats(model) if extra else None
        out = runs[-1][0][0, prompt["input_ids"].shape[1]:]
        rows[name] = {
            "text": tokenizer.decode(out, skip_special_tokens=True).strip(), "ids": out.tolist(),
            "prefill_seconds": statistics.median(r[1] for r in runs),
            "decode_seconds": statistics.median(r[2] for r in runs),
            "tokens": len(out), "block_efficiency": stats.block_efficiency if stats else 1.0,
        }
    return {"question": asked.question, "truth": asked.answer, "draft_tokens": DEFAULT_DRAFT_TOKENS, "rows": rows,
            "draft_parameters": sum(p.numel() for p in draft.parameters())}


def _describe_report(described: dict) -> list[str]:
    rows = described["rows"]
    same = rows["baseline + draft"]["ids"] == rows["baseline"]["ids"] and rows["AIM + draft"]["ids"] == rows["AIM"]["ids"]
    lines = [
        f"description (a multi-token answer; greedy; text-only draft aim/default_model/draft, "
        f"{described['draft_parameters'] / 1e6:.2f}M parameters, {described['draft_tokens']} tokens drafted per round):",
        f"  {described['question']}  truth: {described['truth']}",
    ]
    lines += [f"  {name:<9s} {rows[name]['text']}" for name in ("baseline", "AIM")]
    lines.append(f"  {'':18s}{'prefill ms':>11s}{'decode ms':>11s}{'tokens':>8s}{'tokens/forward':>16s}")
    for name, r in rows.items():
        lines.append(f"  {name:18s}{r['prefill_seconds'] * 1e3:>11.1f}{r['decode_seconds'] * 1e3:>11.1f}"
                     f"{r['tokens']:>8d}{r['block_efficiency']:>16.2f}")
    ratio = rows["baseline"]["decode_seconds"] / max(rows["baseline + draft"]["decode_seconds"], 1e-9)
    why = ("" if ratio >= 1 else ": with a target this small a forward costs about as much as a draft round")
    lines.append(f"  Outputs with the draft are {'identical to' if same else 'DIFFERENT from'} those without it "
                 f"(the target verifies every drafted token). Decoding with the draft was {max(ratio, 1 / ratio):.2f}x "
                 f"{'faster' if ratio >= 1 else 'slower'} here{why}; benchmarks/speculative.py gives the speedup the "
                 "measured tokens/forward imply for memory-bound large models.")
    return lines


def run_demo(
    frames: int = data.NUM_FRAMES,
    repeats: int = 3,
    questions: int = 40,
    attn_implementation: str = "sdpa",
    as_json: bool = False,
    budgets: tuple[float, ...] = DEMO_BUDGETS,
    **aim_options,
) -> int:
    """Run the demo and print the comparison; returns a process exit code.

    Columns: the unchanged model, AIM with the given options (default: the paper's settings), and,
    where the default model's budget profile is present, the budgeted choice at each of `budgets`
    (fractions of the unchanged model's LLM prefill FLOPs).
    """
    for name, value in (("frames", frames), ("repeats", repeats), ("questions", questions)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model, processor = load_default_model(attn_implementation=attn_implementation)
    config = AIMConfig().replace(**aim_options)
    layers = model.config.text_config.num_hidden_layers
    config.check_depth(layers)  # bad options fail before measuring
    test = data.dataset("test", questions, kinds=data.VIDEO_KINDS, frames=frames)
    shown = test[: len(data.VIDEO_KINDS)]  # one question of each kind
    columns = {"baseline": dict(enabled=False), "AIM": dict(config=config)}
    profile = DEFAULT_MODEL_DIR / PROFILE_FILE
    if profile.is_file():
        columns.update({f"budget {b:.0%}": dict(budget=b, profile=profile) for b in budgets})
    results = {}
    for name, how in columns.items():
        apply_aim(model, **how)
        results[name] = _measure(model, processor, test[0], shown, test, repeats)
    described = _describe(model, processor, test[0], config, repeats)
    if as_json:
        report_dict = {"config": dataclasses.asdict(config), "setting": config.describe(layers),
                       "baseline": results["baseline"], "aim": results["AIM"],
                       "budgets": {name: r for name, r in results.items() if name.startswith("budget")},
                       "description": described}
        print(json.dumps(report_dict, indent=2))
        return 0
    text = report(model, frames, questions, repeats, attn_implementation, config, results, shown, profile.is_file())
    print(text + ("\n\n" + "\n".join(_describe_report(described)) if described else ""))
    return 0


def report(model, frames, questions, repeats, attn, config: AIMConfig, results: dict, shown, budgeted: bool) -> str:
    """The demo as a readable report: what ran, the side-by-side table, then what it means."""
    layers = model.config.text_config.num_hidden_layers
    params = sum(p.numel() for p in model.parameters()) / 1e6
    baseline, aim = results["baseline"], results["AIM"]
    visual, total = baseline["visual_tokens_entering_llm"], baseline["tokens_entering_llm"]
    names = list(results)
    lines = [
        "aim demo: the same model and inputs, baseline vs AIM" + (" vs budgets" if budgeted else ""),
        "",
        f"Model    aim/default_model: {type(model).__name__} trained on synthetic video QA, {params:.1f}M parameters, "
        f"{layers} LLM layers, {attn} attention",
        f"Input    one synthetic {frames}-frame test clip: {visual} visual + {total - visual} text tokens = {total} tokens; "
        f"accuracy over {questions} test questions",
        f"Setting  AIM: {config.describe(layers)}",
    ]
    if budgeted:
        lines.append("Budgets  the most faithful setting (calibrated, or a merge keep fraction between two calibrated ones) "
                     "whose predicted LLM prefill FLOPs for this input fit the budget (profile "
                     "aim/default_model/aim_profile.json, calibrated on validation clips)")
        for name in names[2:]:
            lines.append(f"  {name}: {results[name]['budget_point']}")
    lines += [
        f"Machine  {_device()}, {torch.get_num_threads()} torch threads; prefill = one forward over the prompt "
        f"(vision tower included), median of {repeats}",
        "",
        f"{'':34s}" + "".join(f"{n:>12s}" for n in names),
    ]
    rows = [
        ("visual tokens from the vision tower", "visual_tokens_before_merge", 1, "{:.0f}"),
        ("visual tokens entering the LLM", "visual_tokens_entering_llm", 1, "{:.0f}"),
        ("tokens entering the LLM", "tokens_entering_llm", 1, "{:.0f}"),
        ("tokens summed over LLM layers", "tokens_all_layers", 1, "{:.0f}"),
        ("KV-cache entries, all layers", "kv_cache_entries", 1, "{:.0f}"),
        ("KV-cache size (KiB)", "kv_cache_bytes", 2**-10, "{:.1f}"),
        ("prefill time (ms)", "prefill_seconds", 1000, "{:.1f}"),
    ]
    for label, key, scale, fmt in rows:
        lines.append(f"{label:34s}" + "".join(f"{fmt.format(results[n][key] * scale):>12s}" for n in names))
    lines.append(f"{'LLM prefill FLOPs, % of baseline':34s}"
                 + "".join(f"{results[n]['flops'] / baseline['flops']:>12.1%}" for n in names))
    lines.append(f"{f'accuracy ({questions} test questions)':34s}" + "".join(f"{results[n]['accuracy']:>12.1%}" for n in names))
    lines += ["", "answers (generate, greedy, one question of each kind):"]
    for i, example in enumerate(shown):
        lines.append(f"  {example.question:<50s} truth {example.answer:<10s} "
                     + " ".join(f"{n} {results[n]['answers'][i]:<8s}" for n in names))
    lines += ["", "tokens per LLM layer:", f"{'layer':>7s}" + "".join(f"{n:>12s}" for n in names)]
    for layer in range(layers):
        lines.append(f"{layer:>7d}" + "".join(f"{results[n]['tokens_per_layer'][layer]:>12d}" for n in names))
    compute = baseline["tokens_all_layers"] / aim["tokens_all_layers"]
    speed = baseline["prefill_seconds"] / aim["prefill_seconds"]
    change = aim["accuracy"] - baseline["accuracy"]
    lines += [
        "",
        f"In short: AIM ran the LLM layers on {compute:.1f}x fewer tokens with {baseline['kv_cache_bytes'] / aim['kv_cache_bytes']:.1f}x "
        f"less KV cache, and its prefill was {speed if speed >= 1 else 1 / speed:.2f}x {'faster' if speed >= 1 else 'slower'}; accuracy "
        f"{'fell' if change < 0 else 'rose' if change > 0 else 'stayed'} from {baseline['accuracy']:.1%} to {aim['accuracy']:.1%}"
        f"{f' ({change * 100:+.1f} points)' if change else ''}. At {total} tokens this model is so small that fixed per-layer "
        "overheads dominate prefill time, so the time ratio stays below the token ratio (benchmarks/prefill.py measures a "
        "realistic width).",
    ]
    for name in names[2:]:
        r = results[name]
        delta = r["accuracy"] - baseline["accuracy"]
        lines.append(
            f"With {name} of the FLOPs, aim chose '{r['budget_point']}': {r['flops'] / baseline['flops']:.0%} of the FLOPs, "
            f"accuracy {r['accuracy']:.1%} ({delta * 100:+.1f} points against the unchanged model)."
        )
    lines.append(
        f"The accuracy row counts {questions} questions: one standard error is about "
        f"{100 * standard_error(baseline['accuracy'], questions):.1f} points, so differences of up to about twice that between columns can be noise "
        "(benchmarks/accuracy_vs_flops.py and benchmarks/budget_accuracy.py measure on hundreds of questions)."
    )
    return "\n".join(lines)


def _device() -> str:
    return "CPU" if not torch.cuda.is_available() else f"CPU (a GPU is visible: {torch.cuda.get_device_name(0)}; the demo runs on the CPU)"
