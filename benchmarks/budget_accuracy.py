"""Accuracy against a FLOPs budget: aim's budgeted choice vs fixed methods scaled to the same budget.

On the trained study model's held-out test clips, for each budget (a fraction of the unchanged
model's LLM prefill FLOPs):

    budgeted choice    apply_aim(model, budget=b): per request, the most faithful setting whose
                       predicted FLOPs for that input fit (profile: the shipped one, made by
                       `aim calibrate` on validation clips, never the test split), merge keep
                       fractions between calibrated ones included (`aim.budget.curves`)
    calibrated keeps only   the same with interpolate_keeps=False: calibrated settings only
    AIM (paper)        the paper's schedule with the merge keep fraction tuned to the budget
    merge only / random drop / uniform pool   as in benchmarks/accuracy_vs_flops.py

Then, across every calibrated setting, the Spearman rank correlation between the label-free
fidelity the profile holds (greedy agreement with the unchanged model, and -KL) and the labelled
test accuracy: whether calibration without labels can be trusted on this model.

    python benchmarks/budget_accuracy.py            # the README's run
    python benchmarks/budget_accuracy.py --quick    # a smoke run
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

from aim.budget import PROFILE_FILE, Profile  # noqa: E402
from aim.study import data  # noqa: E402
from aim.study.model import load_default_model, study_model_dir  # noqa: E402

BUDGETS = (0.75, 0.5, 0.25, 0.15, 0.10)
FIXED = ("AIM", "merge only", "random drop", "uniform pool")
CALIBRATED = "calibrated keeps only"  # the budgeted choice without keep fractions between calibrated ones


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="study model folder (default: the shipped aim/default_model)")
    parser.add_argument("--profile", default=None, help=f"budget profile (default: MODEL/{PROFILE_FILE})")
    parser.add_argument("--examples", type=int, default=400, help="test-split video questions (default %(default)s)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--correlation-settings", type=int, default=24,
                        help="calibrated settings whose test accuracy enters the rank correlation (spread over cost)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="40 examples, budgets 0.5 and 0.25, 6 settings")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.budgets, args.correlation_settings = 40, [0.5, 0.25], 6
    started = time.perf_counter()
    model, processor = load_default_model(args.model)
    folder = study_model_dir(args.model)
    profile = Profile.load(args.profile or folder / PROFILE_FILE)
    examples = data.dataset("test", args.examples, kinds=data.VIDEO_KINDS)
    spec = avf.describe(model, processor, examples)
    num_layers = model.config.text_config.num_hidden_layers
    baseline_flops = avf.analytic(model, spec, None).prefill_flops
    methods = {m.name: m for m in avf.methods(num_layers)}
    baseline = avf.run(model, processor, examples, None, args.batch_size)

    rows = []
    for budget in tqdm(sorted(args.budgets, reverse=True), desc="budgets"):
        row = {"budget": budget,
               "budgeted": avf.run(model, processor, examples, None, args.batch_size, budget=budget, profile=profile),
               CALIBRATED: avf.run(model, processor, examples, None, args.batch_size, budget=budget, profile=profile,
                                   interpolate_keeps=False)}
        for name in FIXED:
            config = avf.tune(methods[name], model, spec, budget, baseline_flops)
            row[name] = None if config is None else avf.run(model, processor, examples, config, args.batch_size)
        rows.append(row)

    # rank correlation: settings spread over the cost range (every k-th by FLOPs)
    points = sorted(profile.points, key=lambda p: p.flops_fraction)
    step = max(1, len(points) // max(1, args.correlation_settings))
    chosen = points[::step][: args.correlation_settings]
    accuracy = [avf.run(model, processor, examples, p.aim_config(), args.batch_size)["accuracy"]
                for p in tqdm(chosen, desc="correlation")]
    rho_agree = spearman([p.agreement for p in chosen], accuracy)
    rho_kl = spearman([-p.kl for p in chosen], accuracy)

    report(args, profile, examples, baseline, rows, chosen, accuracy, rho_agree, rho_kl)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


def report(args, profile, examples, baseline, rows, chosen, accuracy, rho_agree, rho_kl) -> None:
    base = baseline["accuracy"]
    print(f"Model    {args.model or 'aim/default_model'}; profile from {profile.inputs} on {profile.device}")
    print(f"Test     {len(examples)} test-split video questions; the unchanged model: {base:.1%} "
          f"(+-{avf.standard_error(base, len(examples)):.1%} one standard error)\n")
    names = ["budgeted", CALIBRATED] + list(FIXED)
    header = f"{'budget':>7}" + "".join(f" | {n:>22}" for n in names)
    print("Accuracy (LLM prefill FLOPs actually used, % of the unchanged model)")
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for name in names:
            res = row[name]
            if res is None:
                cells.append(f"{'unreachable':>22}")
            else:
                used = res["prefill_flops"] / baseline["prefill_flops"]
                cells.append(f"{res['accuracy']:>12.1%} ({used:>6.1%})")
        print(f"{row['budget']:>7.0%}" + "".join(f" | {c}" for c in cells))
    for name in ("budgeted", CALIBRATED):
        label = "budgeted choice" if name == "budgeted" else f"budgeted choice, {name},"
        print(f"\nSettings the {label} ran (requests):")
        for row in rows:
            print(f"  {row['budget']:>4.0%}: " + "; ".join(f"{k} x{v}" for k, v in row[name]["points"].items()))
    print("\nGoal: the budgeted choice at least as accurate as the best fixed method at every budget:")
    for row in rows:
        fixed = [(row[n]["accuracy"], n) for n in FIXED if row[n] is not None]
        best = max(fixed) if fixed else (float("nan"), "-")
        mine = row["budgeted"]["accuracy"]
        verdict = "met" if mine >= best[0] else f"missed by {100 * (best[0] - mine):.1f} points"
        print(f"  {row['budget']:>4.0%}: budgeted {mine:.1%} vs best fixed {best[0]:.1%} ({best[1]}): {verdict}; "
              f"{mine / base:.1%} of the unchanged model's accuracy")
    print(f"\nLabel-free fidelity vs labelled accuracy over {len(chosen)} calibrated settings "
          f"(FLOPs {chosen[0].flops_fraction:.0%}-{chosen[-1].flops_fraction:.0%}): Spearman rho "
          f"{rho_agree:.2f} for greedy agreement, {rho_kl:.2f} for -KL")


if __name__ == "__main__":
    sys.exit(main())
