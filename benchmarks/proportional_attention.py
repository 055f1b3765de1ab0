"""Proportional attention to merged tokens (ToMe's), on and off, at matched LLM prefill FLOPs.

A token merged from ``s`` input tokens gets ``log(s)`` added to its attention logits
(``AIMConfig(proportional_attention=True)``), so it draws the attention its ``s`` tokens would
have drawn together. It changes no token count, so each method runs the same setting (tuned to
each budget as in `benchmarks/accuracy_vs_flops.py`) with and without it, on the same questions.

Whether it helps is decided on validation questions held out from the budget profile's
calibration (clips 96 on); the test split is reported beside it, once, and not used to decide.
The difference is paired (the same questions): its standard error counts the questions whose
answer changed.

    python benchmarks/proportional_attention.py            # the README's run
    python benchmarks/proportional_attention.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_vs_flops as avf  # noqa: E402
from aim import AIMConfig, apply_aim, remove_aim  # noqa: E402
from aim.study import data  # noqa: E402
from aim.study.evaluate import predict, standard_error  # noqa: E402
from aim.study.model import load_default_model  # noqa: E402
from fidelity_ranking import CALIBRATION_CLIPS  # noqa: E402  (the shipped profile's validation clips)

METHODS = ("merge only", "temporal+merge", "AIM, merge pruned")
BUDGETS = (0.5, 0.25, 0.15, 0.10)


def correct(model, processor, examples, config: AIMConfig | None, batch_size: int) -> list[bool]:
    """Per question, whether `config` (None: the unchanged model) answers it right."""
    apply_aim(model, config if config is not None else AIMConfig(enabled=False))
    try:
        answers = predict(model, processor, examples, batch_size=batch_size)
    finally:
        remove_aim(model)
    return [answer == example.answer for answer, example in zip(answers, examples)]


def paired(on: list[bool], off: list[bool]) -> tuple[float, float]:
    """Mean difference of two answer sets on the same questions, and its standard error."""
    diffs = [int(a) - int(b) for a, b in zip(on, off)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    return mean, math.sqrt(variance / n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="study model folder (default: the shipped aim/default_model)")
    parser.add_argument("--examples", type=int, default=800, help="questions per split (default %(default)s)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS),
                        help="fractions of the unchanged model's LLM prefill FLOPs (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="48 questions, budgets 0.25 and 0.1, merging only")
    args = parser.parse_args(argv)
    methods = METHODS
    if args.quick:
        args.examples, args.budgets, methods = 48, [0.25, 0.10], ("merge only",)
    if any(not 0 < b < 1 for b in args.budgets):
        parser.error(f"budgets must be in (0, 1), got {args.budgets}")
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()

    model, processor = load_default_model(args.model)
    splits = {
        "validation": data.dataset("val", args.examples, start=CALIBRATION_CLIPS, kinds=data.VIDEO_KINDS),
        "test": data.dataset("test", args.examples, kinds=data.VIDEO_KINDS),
    }
    spec = avf.describe(model, processor, splits["test"])
    baseline_flops = avf.analytic(model, spec, None).prefill_flops
    by_name = {method.name: method for method in avf.methods(model.config.text_config.num_hidden_layers)}
    unchanged = {split: correct(model, processor, examples, None, args.batch_size) for split, examples in splits.items()}

    rows = []
    todo = [(name, budget) for name in methods for budget in sorted(args.budgets, reverse=True)]
    for name, budget in tqdm(todo, desc="settings"):
        config = avf.tune(by_name[name], model, spec, budget, baseline_flops)
        if config is None:
            rows.append((name, budget, None, {}))
            continue
        flops = avf.analytic(model, spec, config).prefill_flops / baseline_flops
        figures = {}
        for split, examples in splits.items():
            off = correct(model, processor, examples, config, args.batch_size)
            on = correct(model, processor, examples, config.replace(proportional_attention=True), args.batch_size)
            figures[split] = (sum(off) / len(off), sum(on) / len(on), *paired(on, off))
        rows.append((name, budget, flops, figures))

    n = args.examples
    print(f"Proportional attention to merged tokens: {args.model or 'trained default model'}, {n} video questions per split "
          f"(validation clips {CALIBRATION_CLIPS}.. held out from the budget profile's calibration; test split)")
    for split in splits:
        accuracy = sum(unchanged[split]) / n
        print(f"unchanged model: {split} {accuracy:.1%} (+-{standard_error(accuracy, n):.1%} one standard error)")
    print(f"\n{'method':<19} {'budget':>6} {'LLM FLOPs':>9} | {'validation: off':>15} {'on':>6} {'difference':>16} | "
          f"{'test: off':>9} {'on':>6} {'difference':>16}")
    for name, budget, flops, figures in rows:
        if flops is None:
            print(f"{name:<19} {budget:>6.0%} {'unreachable':>9}")
            continue
        cells = [f"{off:>{w}.1%} {on:>6.1%} {diff * 100:>+7.1f} +-{se * 100:>3.1f}pt"
                 for w, (off, on, diff, se) in ((15, figures["validation"]), (9, figures["test"]))]
        print(f"{name:<19} {budget:>6.0%} {flops:>9.1%} | {cells[0]} | {cells[1]}")

    print("\nBest method per budget on test, without and with proportional attention (share of the unchanged model's accuracy):")
    test_unchanged = sum(unchanged["test"]) / n
    for budget in sorted(args.budgets, reverse=True):
        scored = [(figures["test"], name) for name, b, flops, figures in rows if b == budget and flops is not None]
        if scored:
            (off, _, _, _), off_name = max(scored, key=lambda s: s[0][0])
            (_, on, _, _), on_name = max(scored, key=lambda s: s[0][1])
            print(f"  {budget:>4.0%}: without {off:.1%} ({off_name}, {off / test_unchanged:.1%}), "
                  f"with {on:.1%} ({on_name}, {on / test_unchanged:.1%})")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
