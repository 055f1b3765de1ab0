"""Accuracy under both position rules for merged tokens, on the trained study model.

``merged_positions="destination"`` (aim's default) keeps each token's input position, so a merged
token takes its destination's; ``"contiguous"`` renumbers the tokens left without gaps, as the
official AIM code does and as vLLM must (it fixes positions before the encoder runs; aim's vLLM
plugin follows it). Methods that merge before the LLM (AIM, merging alone, temporal+merge) are set
to each LLM prefill FLOPs budget as in `accuracy_vs_flops.py` (the rule does not change the token
counts, so both rules run the same setting) and scored on the same test clips.

    python benchmarks/position_rules.py               # the README's run
    python benchmarks/position_rules.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_vs_flops as avf  # noqa: E402

from aim.study import data  # noqa: E402
from aim.study.model import load_default_model  # noqa: E402

BUDGETS = (0.5, 0.25, 0.15, 0.10)
METHODS = ("merge only", "AIM", "temporal+merge")
RULES = ("destination", "contiguous")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="study model folder (default: the shipped aim/default_model)")
    parser.add_argument("--examples", type=int, default=400, help="test-split video questions (default %(default)s)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="40 examples, budget 0.25: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.budgets = 40, [0.25]
    if any(not 0 < b < 1 for b in args.budgets):
        parser.error(f"budgets must be in (0, 1), got {args.budgets}")
    started = time.perf_counter()
    model, processor = load_default_model(args.model)
    examples = data.dataset("test", args.examples, kinds=data.VIDEO_KINDS)
    spec = avf.describe(model, processor, examples)
    baseline_flops = avf.analytic(model, spec, None).prefill_flops
    by_name = {m.name: m for m in avf.methods(model.config.text_config.num_hidden_layers)}
    baseline = avf.run(model, processor, examples, None, args.batch_size)
    rows = []
    for name in tqdm(METHODS, desc="methods"):
        for budget in args.budgets:
            config = avf.tune(by_name[name], model, spec, budget, baseline_flops)
            if config is None:
                rows.append((name, budget, None, None, None))
                continue
            results = [avf.run(model, processor, examples, config.replace(merged_positions=rule), args.batch_size)
                       for rule in RULES]
            assert results[0]["prefill_flops"] == results[1]["prefill_flops"]
            rows.append((name, budget, results[0]["prefill_flops"] / baseline["prefill_flops"],
                         results[0]["accuracy"], results[1]["accuracy"]))
    n = len(examples)
    print(f"Position rules for merged tokens: {n} test clips of the video tasks, {args.model or 'trained default model'}; "
          f"unchanged model {baseline['accuracy']:.1%} (standard error ~{avf.standard_error(baseline['accuracy'], n):.1%})")
    print(f"{'method':<16}{'budget':>8}{'LLM FLOPs':>11}{'destination':>13}{'contiguous':>12}{'difference':>12}")
    for name, budget, measured, destination, contiguous in rows:
        if measured is None:
            print(f"{name:<16}{budget:>8.0%}{'unreachable':>11}")
            continue
        print(f"{name:<16}{budget:>8.0%}{measured:>11.1%}{destination:>13.1%}{contiguous:>12.1%}"
              f"{(contiguous - destination) * 100:>+11.1f}pt")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
