"""Accuracy against prefill FLOPs: AIM and token-reduction baselines on the trained study model.

The embedded default model (``aim/default_model``, trained by ``python -m aim.study.train`` on
the synthetic video QA of ``aim.study.data``) answers test-split questions while each method
cuts its visual tokens to a FLOPs budget. Every method runs through the same engine
(``apply_aim`` with a config), so only the choice of tokens differs:

    AIM              bipartite merging per frame + PageRank pruning (default schedule), merge keep tuned
    merge only       AIM's merging alone (stage a)
    prune only       AIM's PageRank pruning alone (stage b), from layer 1, step tuned
    AIM, random ranks  AIM's merging and pruning schedule, but pruning drops random visual
                     tokens: the control for PageRank's ranking
    temporal merge   temporal merging alone: tokens repeating a token of the frame before merge
                     into it (FrameFusion-like), keep fraction of each later frame tuned
    temporal+merge   temporal merging, then per-frame merging, both at the tuned keep fraction
    AIM, merge pruned  AIM, but the tokens a pruning layer removes merge into the most similar
                     kept visual token (HoliTom-like) instead of being dropped
    temporal+AIM, merge pruned  all three
    random drop      random visual tokens per frame dropped before the LLM
    uniform pool     each frame's token grid average-pooled to a smaller rows x cols grid
    EVS              vLLM's video pruning (``--video-pruning-rate``): per video, the tokens least
                     like the same place of the previous frame stay (the first frame whole)
    FastV            one pruning step after layer K, ranked by attention from the last token
                     (K=2 of LLaVA's 32 layers in FastV; here the nearest relative depth, at least 1)

For each budget (fraction of the unchanged model's LLM prefill FLOPs) each method's knob is set
by bisection on the analytic FLOPs model to the cheapest setting that does not exceed it; the
FLOPs reported are then measured from the token counts each layer really processed
(``aim.last_stats`` -> ``aim.flops.prefill_flops``), averaged over the test examples. A method
whose cheapest setting is above a budget is reported as unreachable there; a setting that leaves
visual tokens in fewer than half of the LLM layers is marked (it answers from little or no
visual evidence).

Third part, more frames at equal compute (FlashVID's experiment): clips of 2x and 4x the frames
(the same question kinds, rendered with more frames) through AIM, temporal+merge and merging alone,
each tuned to the unchanged model's LLM prefill FLOPs on the standard clip length; the unchanged
model on the longer clips (at 2x / 4x the compute) is shown beside them.

Second part, the paper's equal-compute claim: the unchanged model on fewer frames (every 2nd /
4th frame) against AIM (and merging alone) on all frames at the same LLM prefill FLOPs; the
vision tower, which AIM does not change, is reported beside it, since it still encodes all frames.

    python benchmarks/accuracy_vs_flops.py                 # the README's run
    python benchmarks/accuracy_vs_flops.py --quick         # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aim import AIMConfig, apply_aim, last_stats, remove_aim  # noqa: E402
from aim import flops as F  # noqa: E402
from aim.config import default_prune_start_end  # noqa: E402
from aim.optional import MissingDependency, require  # noqa: E402
from aim.study import data  # noqa: E402
from aim.study.evaluate import evaluate, standard_error  # noqa: E402
from aim.study.model import load_default_model, to_inputs  # noqa: E402

logger = logging.getLogger("accuracy_vs_flops")

BUDGETS = (1.0, 0.5, 0.25, 0.15, 0.10)


def fastv_layer(num_layers: int) -> int:
    """FastV's K (layers 0..K-1 see every token): K=2 of LLaVA's 32 layers, at the same relative depth."""
    return max(1, round(2 * num_layers / 32))


@dataclasses.dataclass
class Method:
    name: str
    make: Callable[[float], AIMConfig]  # knob in [lo, hi] -> config
    lo: float
    hi: float
    cheaper_when: str  # "lower": a lower knob costs fewer FLOPs; "higher": a higher knob does


def methods(num_layers: int) -> list[Method]:
    start, end = default_prune_start_end(num_layers)
    k = fastv_layer(num_layers)
    aim_step = 1.0 / max(end - start + 1, 1)
    return [
        Method("AIM", lambda m: AIMConfig(merge_keep=m, prune_start=start, prune_step=aim_step), 1 / 64, 1.0, "lower"),
        Method("merge only", lambda m: AIMConfig(merge_keep=m, prune=False), 1 / 64, 1.0, "lower"),
        Method("prune only", lambda s: AIMConfig(merge_schedule=(), prune_start=1, prune_step=s), 1e-3, 1.0, "higher"),
        Method(
            "AIM, random ranks",
            lambda m: AIMConfig(merge_keep=m, prune_start=start, prune_step=aim_step, prune_method="random"),
            1 / 64, 1.0, "lower",
        ),
        Method("temporal merge", lambda m: AIMConfig(temporal_keep=m, merge_schedule=(), prune=False), 1 / 64, 1.0, "lower"),
        Method("temporal+merge", lambda m: AIMConfig(temporal_keep=m, merge_keep=max(m, 1 / 64), prune=False), 1 / 64, 1.0, "lower"),
        Method(
            "AIM, merge pruned",
            lambda m: AIMConfig(merge_keep=m, prune_start=start, prune_step=aim_step, prune_action="merge"),
            1 / 64, 1.0, "lower",
        ),
        Method(
            "temporal+AIM, merge pruned",
            lambda m: AIMConfig(temporal_keep=m, merge_keep=m, prune_start=start, prune_step=aim_step, prune_action="merge"),
            1 / 64, 1.0, "lower",
        ),
        Method("random drop", lambda m: AIMConfig(merge_keep=m, merge_method="random", prune=False), 1 / 64, 1.0, "lower"),
        Method("uniform pool", lambda m: AIMConfig(merge_keep=m, merge_method="pool", prune=False), 1 / 64, 1.0, "lower"),
        Method("EVS", lambda m: AIMConfig(merge_keep=m, merge_method="evs", prune=False), 1 / 64, 1.0, "lower"),
        Method(
            "FastV",
            lambda r: AIMConfig(
                merge_schedule=(), prune_method="last_token",
                prune_keep_ratios=(1.0,) * k + (r,) * (num_layers - k),
            ),
            0.0, 1.0, "lower",
        ),
    ]


def analytic(model, spec: F.InputSpec, config: AIMConfig | None) -> F.CostReport:
    """The FLOPs model's report of ``config`` (None: the unchanged model) on ``spec``, float32."""
    return F.estimate(model.config, spec, config, dtype="float32")


def describe(model, processor, examples) -> F.InputSpec:
    """The analytic description of an average test prompt (frames x tokens per frame + text)."""
    inputs = to_inputs(examples[:16], processor, model.config)
    lengths = inputs["attention_mask"].sum(1).float()
    frames = len(examples[0].pixels)
    visual = F.video_input(model.config, frames)
    text = int(round(float(lengths.mean()) - visual.visual_tokens))
    return F.video_input(model.config, frames, text_tokens=text)


def tune(method: Method, model, spec: F.InputSpec, budget: float, baseline_flops: int) -> AIMConfig | None:
    """The cheapest-to-budget setting: the knob value whose analytic FLOPs are the largest not
    above ``budget x baseline`` (None where even the cheapest setting is above it)."""
    target = budget * baseline_flops

    def cost(knob: float) -> int:
        return analytic(model, spec, method.make(knob)).prefill_flops

    cheap = method.lo if method.cheaper_when == "lower" else method.hi
    dear = method.hi if method.cheaper_when == "lower" else method.lo
    if cost(cheap) > target:
        return None
    if cost(dear) <= target:
        return method.make(dear)
    for _ in range(40):
        mid = (cheap + dear) / 2
        if cost(mid) <= target:
            cheap = mid
        else:
            dear = mid
    return method.make(cheap)


def few_visual_layers(model, spec: F.InputSpec, config: AIMConfig | None) -> bool:
    """Whether ``config`` leaves visual tokens in fewer than half of the LLM layers."""
    layers = analytic(model, spec, config).layers
    return 2 * sum(layer.visual_tokens > 0 for layer in layers) < len(layers)


def run(model, processor, examples, config: AIMConfig | None, batch_size: int, **apply) -> dict:
    """Accuracy (overall and per kind) and mean measured LLM prefill FLOPs of one setting (`config`,
    or `apply_aim` keywords such as ``budget=0.3, profile=...``); for a budget, ``points`` counts
    the requests each setting served."""
    flops: list[int] = []
    points: dict[str, int] = {}

    def record(module, args, output):
        stats = last_stats(module)
        if stats is not None and stats is not record.seen:
            record.seen = stats
            for i in range(len(stats.input_tokens)):
                flops.append(F.prefill_flops(module.config, stats.tokens_per_layer_of(i)))
            if stats.budget is not None:
                points[stats.budget["point"]] = points.get(stats.budget["point"], 0) + len(stats.input_tokens)

    record.seen = None
    if apply:
        apply_aim(model, **apply)
    else:
        apply_aim(model, config if config is not None else AIMConfig(enabled=False))
    handle = model.register_forward_hook(record)
    try:
        result = evaluate(model, processor, examples, batch_size=batch_size)
    finally:
        handle.remove()
        remove_aim(model)
    if len(flops) != len(examples):
        raise RuntimeError(f"recorded {len(flops)} prefills for {len(examples)} examples")
    result["prefill_flops"] = sum(flops) / len(flops)
    result["points"] = points
    return result


def fewer_frames(examples, step: int):
    return [dataclasses.replace(e, pixels=e.pixels[::step]) for e in examples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="study model folder (default: the shipped aim/default_model)")
    parser.add_argument("--examples", type=int, default=1000, help="test-split video questions (default %(default)s)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS),
                        help="fractions of the unchanged model's prefill FLOPs (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--plot", default=None, help="also draw the curves into this PNG (needs matplotlib)")
    parser.add_argument("--json", default=None, help="also write every figure as JSON here")
    parser.add_argument("--quick", action="store_true", help="40 examples, budgets 1 and 0.25: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.budgets = 40, [1.0, 0.25]
    if any(not 0 < b <= 1 for b in args.budgets):
        parser.error(f"budgets must be in (0, 1], got {args.budgets}")
    logging.basicConfig(level=logging.WARNING)
    if args.plot:
        try:  # before minutes of work, not after
            require("matplotlib.pyplot", "--plot")
        except MissingDependency as error:
            parser.exit(2, f"error: {error}\n")
    started = time.perf_counter()

    model, processor = load_default_model(args.model)
    examples = data.dataset("test", args.examples, kinds=data.VIDEO_KINDS)
    spec = describe(model, processor, examples)
    num_layers = model.config.text_config.num_hidden_layers
    baseline_flops = analytic(model, spec, None).prefill_flops
    chance = sum(1 / len(data.ANSWERS[k]) for k in data.VIDEO_KINDS) / len(data.VIDEO_KINDS)

    runs = []
    by_name = {method.name: method for method in methods(num_layers)}
    todo = [(m, b) for m in by_name.values() for b in sorted(args.budgets, reverse=True)]
    baseline = run(model, processor, examples, None, args.batch_size)
    for method, budget in tqdm(todo, desc="settings"):
        config, result = None, baseline
        if budget < 1.0:
            config = tune(method, model, spec, budget, baseline_flops)
            result = None if config is None else run(model, processor, examples, config, args.batch_size)
            if result is not None:
                result["few_visual_layers"] = few_visual_layers(model, spec, config)
        runs.append(dict(method=method.name, budget=budget, config=dataclasses.asdict(config) if config else None,
                         result=result))

    frames = len(examples[0].pixels)
    frame_rows = []
    vision_all = F.vision_flops(model.config, spec) or 0
    for step in (2, 4):
        few = fewer_frames(examples, step)
        few_result = run(model, processor, few, None, args.batch_size)
        few_spec = F.video_input(model.config, len(few[0].pixels), text_tokens=spec.text_tokens)
        # the budget from the analytic model on both sides, as tune() compares analytic costs
        budget = analytic(model, few_spec, None).prefill_flops / baseline_flops
        row = dict(frames=len(few[0].pixels), baseline=few_result, budget=budget,
                   vision_flops=F.vision_flops(model.config, few_spec) or 0, vision_flops_all_frames=vision_all)
        # AIM and its merging stage alone, each tuned to the fewer-frames run's FLOPs
        for key, name in (("aim", "AIM"), ("merge_only", "merge only")):
            config = tune(by_name[name], model, spec, budget, baseline_flops)
            row[key] = run(model, processor, examples, config, args.batch_size) if config else None
        frame_rows.append(row)

    more_rows = []
    for factor in (2, 4):
        longer = data.dataset("test", args.examples, kinds=data.VIDEO_KINDS, frames=frames * factor)
        long_spec = F.video_input(model.config, frames * factor, text_tokens=spec.text_tokens)
        long_base = analytic(model, long_spec, None).prefill_flops
        budget = baseline_flops / long_base  # the standard clip's compute, as a fraction of the longer clip's
        row = dict(frames=frames * factor, budget=budget,
                   unchanged=run(model, processor, longer, None, args.batch_size))
        for name in ("AIM", "temporal+merge", "merge only"):
            config = tune(by_name[name], model, long_spec, budget, long_base)
            result = run(model, processor, longer, config, args.batch_size) if config else None
            if result is not None:  # FLOPs relative to the unchanged model on the standard clips
                result["flops_vs_standard"] = result["prefill_flops"] / baseline["prefill_flops"]
            row[name] = result
        more_rows.append(row)

    if args.json:
        Path(args.json).write_text(json.dumps(dict(baseline=baseline, runs=runs, frames=frame_rows, more_frames=more_rows), indent=1))
    report(args, spec, examples, baseline, runs, frame_rows, chance, frames)
    report_more_frames(baseline, more_rows, frames)
    if args.plot:
        plot(args.plot, runs, baseline, chance)
    print(f"\n(total {time.perf_counter() - started:.0f} s{f'; plot: {args.plot}' if args.plot else ''})")
    return 0


def report(args, spec, examples, baseline, runs, frame_rows, chance, frames) -> None:
    n = len(examples)
    base_acc = baseline["accuracy"]
    print(f"Model   {args.model or 'aim/default_model'} (trained study model), {spec.description}")
    print(f"Test    {n} questions of the test split ({', '.join(data.VIDEO_KINDS)}), chance {chance:.1%}; "
          f"+-{standard_error(base_acc, n):.1%} is one standard error at the baseline's accuracy")
    print(f"FLOPs   LLM prefill, measured from the tokens each layer processed; the unchanged model: "
          f"{baseline['prefill_flops'] / 1e9:.3f} GFLOPs per question\n")
    budgets = sorted({r["budget"] for r in runs}, reverse=True)
    names = list(dict.fromkeys(r["method"] for r in runs))
    w = max(17, *(len(name) for name in names))  # the method column
    header = f"{'method':<{w}}" + "".join(f" | {f'{b:.0%} budget':>17}" for b in budgets)
    print("Accuracy (FLOPs actually used, % of the unchanged model)")
    print(header)
    print("-" * len(header))
    for name in names:
        cells = []
        for b in budgets:
            row = next(r for r in runs if r["method"] == name and r["budget"] == b)
            res = row["result"]
            if res is None:
                cells.append(f"{'unreachable':>17}")
            else:
                used = res["prefill_flops"] / baseline["prefill_flops"]
                mark = "*" if res.get("few_visual_layers") else " "
                cells.append(f"{res['accuracy']:>7.1%}{mark} ({used:>5.1%})")
        print(f"{name:<{w}}" + "".join(f" | {c}" for c in cells))
    print("* visual tokens in fewer than half of the LLM layers")
    print("\nPer question kind at the lowest budget each method reaches:")
    kinds = list(baseline["per_kind"])
    print(f"{'method':<{w}} {'FLOPs':>6}" + "".join(f" {k[:15]:>15}" for k in kinds))
    print(f"{'unchanged':<{w}} {'100%':>6}" + "".join(f" {baseline['per_kind'][k]['accuracy']:>15.1%}" for k in kinds))
    for name in names:
        done = [r for r in runs if r["method"] == name and r["result"] is not None]
        if not done:
            continue
        row = min(done, key=lambda r: r["budget"])
        used = row["result"]["prefill_flops"] / baseline["prefill_flops"]
        print(f"{name:<{w}} {used:>6.1%}" + "".join(f" {row['result']['per_kind'][k]['accuracy']:>15.1%}" for k in kinds))
    print(f"\nEqual compute: fewer frames without AIM vs all {frames} frames with AIM (or its merging alone) "
          f"at the same LLM prefill FLOPs (% of the unchanged model on {frames} frames)")

    def cell(result) -> str:
        if result is None:
            return f"{'unreachable':>20}"
        return f"{result['accuracy']:>6.1%} ({result['prefill_flops'] / baseline['prefill_flops']:>5.1%} FLOPs)"

    print(f"  {'frames':<8} {'unchanged model':>20}   {f'{frames} frames, AIM':>20}   {f'{frames} frames, merge only':>24}")
    for row in frame_rows:
        print(f"  {row['frames']:<8} {cell(row['baseline'])}   {cell(row['aim'])}   {cell(row['merge_only']):>24}")
    if frame_rows and frame_rows[0]["vision_flops_all_frames"]:
        vision_all = frame_rows[0]["vision_flops_all_frames"]
        full = baseline["prefill_flops"] + vision_all
        print(f"  The vision tower, which AIM does not change, still encodes all {frames} frames. End to end "
              f"(LLM prefill + vision tower, % of the unchanged model on {frames} frames):")
        for row in frame_rows:
            few = (row["baseline"]["prefill_flops"] + row["vision_flops"]) / full
            aim = f"{(row['aim']['prefill_flops'] + vision_all) / full:.1%}" if row["aim"] else "-"
            merge = f"{(row['merge_only']['prefill_flops'] + vision_all) / full:.1%}" if row["merge_only"] else "-"
            print(f"  {row['frames']:<8} {few:>20.1%}   {aim:>20}   {merge:>24}")


def report_more_frames(baseline, rows, frames: int) -> None:
    print(f"\nMore frames at equal compute: {frames}-frame clips through the unchanged model vs longer clips "
          f"through each method tuned to the same LLM prefill FLOPs")
    names = ("AIM", "temporal+merge", "merge only")
    print(f"  {'frames':<7} {'unchanged (FLOPs)':>22}" + "".join(f"   {n + ' (FLOPs)':>24}" for n in names))
    print(f"  {frames:<7} {baseline['accuracy']:>12.1%} ({1:>6.0%})")
    for row in rows:
        unchanged = row["unchanged"]
        cells = []
        for name in names:
            result = row[name]
            cells.append(f"{'unreachable':>24}" if result is None
                         else f"{result['accuracy']:>14.1%} ({result['flops_vs_standard']:>6.1%})")
        used = unchanged["prefill_flops"] / baseline["prefill_flops"]
        print(f"  {row['frames']:<7} {unchanged['accuracy']:>12.1%} ({used:>6.0%})" + "".join(f"   {c}" for c in cells))


def plot(path: str, runs, baseline, chance) -> None:
    plt = require("matplotlib.pyplot", "--plot")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    # more methods than the 10 colours of matplotlib's cycle: past the tenth, another marker and
    # a dashed line, so no two methods draw alike
    for i, name in enumerate(dict.fromkeys(r["method"] for r in runs)):
        points = sorted(
            (r["result"]["prefill_flops"] / baseline["prefill_flops"], r["result"]["accuracy"])
            for r in runs if r["method"] == name and r["result"] is not None
        )
        ax.plot([p[0] * 100 for p in points], [p[1] * 100 for p in points], color=f"C{i % 10}",
                marker="osD^"[i // 10 % 4], linestyle="-" if i < 10 else "--",
                linewidth=2.2 if name == "AIM" else 1.2, label=name)
    ax.axhline(chance * 100, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("LLM prefill FLOPs, % of the unchanged model (log scale)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("Synthetic video QA, trained study model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
