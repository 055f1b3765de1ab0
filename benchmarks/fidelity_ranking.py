"""Which label-free fidelity should rank a budget's settings? Measured on validation data, not test.

A budget profile ranks its calibrated settings by a label-free fidelity (`aim.budget.profile.Fidelity`:
lower KL of the next-token distribution first, greedy agreement with the unchanged model second), as
measured on the validation clips `aim calibrate` ran (the first 96 of the validation split for the
shipped profile). This script
takes validation clips held out from that calibration (from clip 96 on) and measures, with their
labels, the accuracy of aim's budgeted choice (``apply_aim(model, budget=b)``: frontier, keeps
between calibrated ones, per-input costs) at each FLOPs budget under three ranking rules, each a
re-ranked copy of the profile:

    KL, then agreement          aim's rule (from this script's evidence; until 2026-12 it was the next)
    agreement, then KL
    agreement bins, then KL     agreement rounded down to bins one standard error wide (at 50%
                                agreement over the calibration's inputs: 5.1 points for 96), so
                                that differences the calibration cannot resolve go to KL

and, across calibrated settings spread over the cost range, the Spearman rank correlation of each
fidelity with this accuracy. It decides nothing by itself: it is the evidence a change of the rule
would rest on, kept apart from the test split that benchmarks/budget_accuracy.py reports.

    python benchmarks/fidelity_ranking.py            # the README's run
    python benchmarks/fidelity_ranking.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_vs_flops as avf  # noqa: E402
from budget_accuracy import BUDGETS, spearman  # noqa: E402

from aim.budget import PROFILE_FILE, Point, Profile  # noqa: E402
from aim.study import data  # noqa: E402
from aim.study.model import DEFAULT_MODEL_DIR, load_default_model  # noqa: E402

CALIBRATION_CLIPS = 96  # the shipped profile's: validation clips 0..95


RULES = ("KL, then agreement", "agreement, then KL", "agreement bins, then KL")


def rule_key(point: Point, rule: str, calibration_inputs: int) -> tuple[float, float]:
    """`point`'s sort key under `rule`, higher is better."""
    if rule == RULES[0]:
        return (-point.kl, point.agreement)
    if rule == RULES[1]:
        return (point.agreement, -point.kl)
    width = math.sqrt(0.25 / calibration_inputs)
    return (math.floor(point.agreement / width + 1e-9) * width, -point.kl)


def ranked(profile: Profile, rule: str, calibration_inputs: int) -> Profile:
    """A copy of `profile` whose points rank by `rule`; costs unchanged, the frontier recomputed.
    aim ranks by ``Point.fidelity`` = ``(-kl, agreement)``, so each point's two fields are
    overwritten with the rule's key (made monotone per family like the measured values)."""
    points = []
    for p in profile.points:
        first, second = rule_key(p, rule, calibration_inputs)
        points.append(dataclasses.replace(p, kl=-first, agreement=second))
        assert tuple(points[-1].fidelity) == (first, second), "aim's ranking changed: update rule_key / ranked"
    return Profile(model=profile.model, device=profile.device, points=points, latency=profile.latency,
                   inputs=profile.inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help=f"budget profile (default: the shipped {PROFILE_FILE})")
    parser.add_argument("--examples", type=int, default=400, help="held-out validation questions (default %(default)s)")
    parser.add_argument("--start", type=int, default=CALIBRATION_CLIPS,
                        help="first validation clip: after the calibration's (default %(default)s)")
    parser.add_argument("--calibration-inputs", type=int, default=None,
                        help="inputs the profile was calibrated on (default: read from the profile, else 96)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--correlation-settings", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="40 examples, budgets 0.5 and 0.1, 4 settings")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.budgets, args.correlation_settings = 40, [0.5, 0.1], 4
    started = time.perf_counter()
    model, processor = load_default_model()
    profile = Profile.load(args.profile or DEFAULT_MODEL_DIR / PROFILE_FILE)
    first_word = str(profile.inputs).split()[0] if profile.inputs else ""  # e.g. "96 validation clips of ..."
    calibration_inputs = args.calibration_inputs or (int(first_word) if first_word.isdigit() else CALIBRATION_CLIPS)
    examples = data.dataset("val", args.examples, start=args.start, kinds=data.VIDEO_KINDS)
    baseline = avf.run(model, processor, examples, None, args.batch_size)["accuracy"]

    budgeted = {}
    for budget in tqdm(args.budgets, desc="budgets"):
        for rule in RULES:
            result = avf.run(model, processor, examples, None, args.batch_size, budget=budget,
                             profile=ranked(profile, rule, calibration_inputs))
            top = max(result["points"].items(), key=lambda item: item[1])[0] if result.get("points") else "-"
            budgeted[(budget, rule)] = (result["accuracy"], top)
    points = sorted(profile.points, key=lambda p: p.flops_fraction)
    step = max(1, len(points) // max(1, args.correlation_settings))
    spread = points[::step][: args.correlation_settings]
    values = [avf.run(model, processor, examples, p.aim_config(), args.batch_size)["accuracy"]
              for p in tqdm(spread, desc="correlation")]

    n = len(examples)
    print(f"Profile  {profile.inputs} on {profile.device}; ranking rules judged on {n} held-out validation "
          f"questions (clips {args.start}..{args.start + n - 1}); unchanged model {baseline:.1%} "
          f"(+-{avf.standard_error(baseline, n):.1%} one standard error)\n")
    width = 38
    print("Budgeted choice's accuracy, and the setting it ran most often, per ranking rule")
    print(f"{'budget':>7}" + "".join(f" | {rule:<{width}}" for rule in RULES))
    for budget in args.budgets:
        cells = [f"{budgeted[(budget, rule)][0]:6.1%}  {budgeted[(budget, rule)][1]}"[:width] for rule in RULES]
        print(f"{budget:>7.0%}" + "".join(f" | {cell:<{width}}" for cell in cells))
    means = [sum(budgeted[(b, rule)][0] for b in args.budgets) / len(args.budgets) for rule in RULES]
    print("   mean" + "".join(f" | {m:6.1%}{'':<{width - 6}}" for m in means))
    print(f"\nSpearman rank correlation with held-out validation accuracy over {len(spread)} calibrated settings: "
          f"agreement {spearman([p.agreement for p in spread], values):.2f}, "
          f"-KL {spearman([-p.kl for p in spread], values):.2f}")
    print(f"(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
