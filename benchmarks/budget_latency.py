"""Latency budgets under contention: the adaptive choice vs a fixed setting chosen on a quiet machine.

A stream of single-clip requests (test split) with a prefill latency budget, in three phases:
quiet, then while a bounded background load (processes spinning on every core, which stop by
themselves after a fixed time) shares the CPU, then quiet again. Requests alternate between

    adaptive   apply_aim(model, budget_ms=B): each request runs the most faithful setting
               predicted to fit for nine prefills in ten (--quantile), with predictions corrected
               by the measured / predicted ratio of recent requests (aim.budget.LoadTracker)
    fixed      the setting the adaptive choice picks most often on the quiet machine, kept for
               every request

so both see the same load. Per phase and policy: fraction of requests within budget, p50 / p90
of latency / budget, accuracy. The budget covers the prefill (the forward over the prompt, vision
tower included: the time to the first token), not decoding.

On the default model the vision tower and fixed costs are most of the prefill, which no setting
changes. ``--llm-heavy`` runs the same stream on a random-weight LLaVA-OneVision whose LLM is most
of the prefill, as in real checkpoints (`aim.tiny`, 12 decoder layers of width 512, 4-frame
224 px videos: 809 tokens), calibrated here first (merging alone, on 4 inputs of its own); random
weights have no labels, so its accuracy column is agreement with the unchanged model's answer.

    python benchmarks/budget_latency.py               # the README's run
    python benchmarks/budget_latency.py --llm-heavy   # the LLM-heavy model
    python benchmarks/budget_latency.py --quick       # a smoke run
    python benchmarks/budget_latency.py --no-jump     # the load correction without its one-call jump
"""

from __future__ import annotations

import argparse
import json
import math
import os
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aim import apply_aim, last_stats, remove_aim  # noqa: E402
from aim import flops as F  # noqa: E402
from aim.budget import PROFILE_FILE, LoadTracker, Profile, Selector, calibrate, config_space  # noqa: E402
from aim.budget.inputs import FRAME_KEEPS, video_prompt_specs  # noqa: E402
from aim.study import data  # noqa: E402
from aim.study.model import answer_token_ids, load_default_model, model_inputs, study_model_dir, to_inputs  # noqa: E402
from aim.tiny import build_tiny_model, make_inputs  # noqa: E402


SHOWN = 4  # settings listed per phase and policy, most frequent first
# --llm-heavy: decoder layers, width, frame size (224 px: 196 tokens per frame), frames, text tokens
HEAVY_LAYERS, HEAVY_HIDDEN, HEAVY_IMAGE_SIZE, HEAVY_FRAMES, HEAVY_TEXT = 12, 512, 224, 4, 24
HEAVY_CALIBRATION_INPUTS = 4


class Result(NamedTuple):
    """One request's outcome: prefill seconds (inf when refused), whether it answered right, the
    setting it ran, and (budgeted requests) what the choice predicted: the typical load-corrected
    milliseconds, the load factor and the quantile's margin."""

    seconds: float
    correct: bool
    point: str
    predicted_ms: float | None = None
    load_factor: float | None = None
    margin: float | None = None


@dataclass
class Request:
    """One request of the stream: its model inputs (built outside the timed prefill) and whether
    the logits at its last position answer it."""

    inputs: Callable[[], dict]
    correct: Callable[[torch.Tensor], bool]


def study_requests(model, processor, examples: list) -> list[Request]:
    """The default model's requests: study clips, right when the answer word scores highest."""
    words = list(data.ANSWER_WORDS)
    answer_ids = answer_token_ids(processor, words)
    return [Request(inputs=lambda e=e: model_inputs(to_inputs([e], processor, model.config)),
                    correct=lambda logits, e=e: words[int(logits[answer_ids].argmax())] == e.answer)
            for e in examples]


def llm_heavy_setup(count: int, layers: int = HEAVY_LAYERS):
    """The --llm-heavy model, its profile (calibrated here, on inputs outside the stream) and
    `count` requests whose 'answer' is the unchanged model's greedy next token."""
    model = build_tiny_model("llava_onevision", num_layers=layers, hidden_size=HEAVY_HIDDEN,
                             image_size=HEAVY_IMAGE_SIZE)

    def video(seed: int) -> dict:
        return make_inputs(model, "video", num_frames=HEAVY_FRAMES, text_lengths=(HEAVY_TEXT,), seed=seed)

    apply_aim(model, enabled=False)
    inputs = [video(seed) for seed in tqdm(range(count), desc="inputs")]
    answers = []
    with torch.no_grad():
        for x in tqdm(inputs, desc="unchanged answers"):
            answers.append(int(model(**x).logits[0, -1].argmax()))
    # merging alone (12 settings with "off"): the space's cheapest family to calibrate
    candidates = [c for c in config_space(layers) if c.name == "off" or (
        not c.config.prune and not c.config.temporal_merging and not c.config.proportional_attention
        and c.config.merge_method == "bipartite")]
    profile = calibrate(model, [video(count + i) for i in range(HEAVY_CALIBRATION_INPUTS)], candidates,
                        description=f"{HEAVY_CALIBRATION_INPUTS} random videos")
    requests = [Request(inputs=lambda x=x: x, correct=lambda logits, a=a: int(logits.argmax()) == a)
                for x, a in zip(inputs, answers)]
    return model, profile, requests


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


def background_load(seconds: float, processes: int) -> list[mp.Process]:
    """Processes that keep `processes` cores busy for `seconds`, then exit by themselves."""
    procs = [mp.Process(target=_spin, args=(seconds,), daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    return procs


def request(model, req: Request, **call) -> Result:
    """One request: the prefill with its answer read from the logits. A request aim refuses (its
    budget below the cheapest setting even at this machine's quiet speed) counts as a miss without
    an answer: ``Result(inf, False, "refused")``."""
    inputs = req.inputs()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            logits = model(**inputs, **call).logits[0, -1]
    except ValueError as error:
        if "below the cheapest" not in str(error):
            raise
        return Result(math.inf, False, "refused")
    seconds = time.perf_counter() - start
    stats = last_stats(model)
    budget = stats.budget if stats is not None and stats.budget else None
    if budget is None:
        return Result(seconds, req.correct(logits), "fixed")
    point = budget["point"] + (f", frames {budget['frame_keep']:g}" if budget["frame_keep"] < 1.0 else "")
    return Result(seconds, req.correct(logits), point, 1000 * budget["predicted_seconds"], budget["load_factor"],
                  budget["margin"])


def quiet_choice(model, requests: list[Request], budget_ms: float, profile: Profile, quantile: float):
    """The fixed policy's setting: what the adaptive choice runs most often on the quiet machine
    (name, config). When the budget is refused on every one of these requests (a machine much
    slower than the budget assumed), the fastest frontier point, so the comparison still runs."""
    runs: dict[str, tuple[int, object]] = {}
    for req in requests:
        point = request(model, req, aim_budget_ms=budget_ms, aim_budget_quantile=quantile).point
        stats = last_stats(model)
        if point != "refused" and stats is not None and stats.budget:
            count, _ = runs.get(point, (0, None))
            runs[point] = (count + 1, stats.budget["config"])
    if not runs:
        fastest = min(profile.frontier, key=lambda p: p.seconds)
        print(f"(every quiet request under the budget was refused; the fixed policy runs the fastest "
              f"frontier point, {fastest.name})")
        return f"{fastest.name} (the fastest: every quiet request was refused)", fastest.aim_config()
    name = max(runs, key=lambda n: runs[n][0])
    return name, runs[name][1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--requests", type=int, default=60, help="requests per phase and policy (default %(default)s)")
    parser.add_argument("--budget-fraction", type=float, default=1.0,
                        help="latency budget as a fraction of the unchanged model's quiet prefill time (default %(default)s)")
    parser.add_argument("--load-processes", type=int, default=1,
                        help="background processes spinning (default %(default)s: one core of the machine busy)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--quantile", type=float, default=0.9,
                        help="share of prefills the adaptive budget should hold for (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="8 requests per phase (and 4 layers with --llm-heavy)")
    parser.add_argument("--llm-heavy", action="store_true",
                        help="a random-weight model whose LLM is most of the prefill, calibrated here (see above)")
    parser.add_argument("--no-jump", action="store_true",
                        help="the load correction without its one-call jump (a slowdown is followed after two slow "
                             "prefills in a row, as before the jump was added): for comparison")
    parser.add_argument("--trace", default=None,
                        help="also write every request of the three phases to this JSON file (phase, policy, order, "
                             "prefill ms, budget ms, setting, correct; for adaptive requests the predicted ms, load "
                             "factor and margin of the choice): where the misses fall")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = 8
    if args.llm_heavy and (args.model or args.profile):
        parser.error("--llm-heavy builds and calibrates its own model: give neither --model nor --profile")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.llm_heavy:
        layers = 4 if args.quick else HEAVY_LAYERS
        model, profile, requests = llm_heavy_setup(3 * args.requests, layers)
        described = (f"random-weight LLaVA-OneVision (aim.tiny), {layers} decoder layers of width "
                     f"{HEAVY_HIDDEN}, {HEAVY_FRAMES} frames x 196 tokens (+1 newline) + {HEAVY_TEXT} text tokens; accuracy = "
                     "agreement with the unchanged model's answer")
    else:
        model, processor = load_default_model(args.model)
        folder = study_model_dir(args.model)
        profile = Profile.load(args.profile or folder / PROFILE_FILE)
        examples = data.dataset("test", 3 * args.requests, kinds=data.VIDEO_KINDS)
        requests = study_requests(model, processor, examples)
        described = f"{args.model or 'aim/default_model'} (trained study model), test clips"

    # the unchanged model's quiet prefill time sets the budget
    apply_aim(model, enabled=False)
    for req in requests[:3]:
        request(model, req)
    base = statistics.median(request(model, req).seconds for req in requests[:9])
    budget_ms = 1000 * base * args.budget_fraction
    apply_aim(model, profile=profile)
    if args.no_jump:
        # the model's own selector (one per patched model); a fresh tracker, as apply_aim made it
        model._aim.selector.load = LoadTracker(jump=0)
    # the profile's latency model was fitted on the machine that calibrated it; a few quiet requests
    # under a generous budget let the load correction learn this machine's speed first (without them a
    # faster machine would see the budget refused as below the cheapest setting's predicted time)
    for req in requests[:12]:
        request(model, req, aim_budget_ms=10 * budget_ms)
    fixed_name, fixed = quiet_choice(model, requests[:5], budget_ms, profile, args.quantile)

    phases = []
    cores = args.load_processes
    chunks = [requests[i * args.requests:(i + 1) * args.requests] for i in range(3)]
    for phase, chunk in zip(("quiet", "loaded", "quiet again"), chunks):
        procs = []
        if phase == "loaded":
            # long enough for this phase at the loaded pace; it ends by itself
            procs = background_load(seconds=2 * len(chunk) * 2 * base * 3 + 5, processes=cores)
            time.sleep(0.5)
        rows = {"adaptive": [], "fixed": []}
        for req in tqdm(chunk, desc=phase):
            rows["adaptive"].append(request(model, req, aim_budget_ms=budget_ms, aim_budget_quantile=args.quantile))
            rows["fixed"].append(request(model, req, aim_config=fixed))
        for p in procs:
            p.terminate()
            p.join()
        phases.append((phase, rows))
    remove_aim(model)
    print(f"Model    {described}")
    share = cheapest_share(profile)
    print(f"Floor    the cheapest frontier setting took {share:.0%} of the unchanged model's prefill time in "
          f"calibration: with a budget of {args.budget_fraction:.0%} of the unchanged time, a slowdown beyond "
          f"{args.budget_fraction / share:.1f}x cannot be absorbed with whole videos")
    frames_share = fewest_frames_share(model, profile, requests[0].inputs())
    if frames_share is not None:
        print(f"         with {min(FRAME_KEEPS):g} of the frames (what a latency budget encodes when nothing fits whole "
              f"videos), the latency model predicts {frames_share:.0%}: a slowdown beyond "
              f"{args.budget_fraction / frames_share:.1f}x")
    report(base, budget_ms, fixed_name, phases, cores, args.quantile, torch.get_num_threads())
    if args.trace:
        write_trace(args.trace, phases, budget_ms)
    return 0


def write_trace(path: str, phases, budget_ms: float) -> None:
    """Every request in stream order (adaptive and fixed alternate within a phase); an adaptive
    request also with what its choice predicted (typical ms, load factor, margin)."""
    rows = [{"phase": phase, "policy": policy, "order": i,
             "prefill_ms": 1000 * r.seconds if math.isfinite(r.seconds) else None, "budget_ms": budget_ms,
             "setting": r.point, "correct": r.correct, "predicted_ms": r.predicted_ms, "load_factor": r.load_factor,
             "margin": r.margin}
            for phase, by_policy in phases for policy, results in by_policy.items()
            for i, r in enumerate(results)]
    Path(path).write_text(json.dumps(rows, indent=1))
    print(f"(trace of {len(rows)} requests: {path})")


def fewest_frames_share(model, profile: Profile, inputs: dict) -> float | None:
    """The fastest frontier setting's predicted prefill time on the fewest frames a latency budget
    encodes (`aim.budget.select.FRAME_KEEPS`) over the unchanged model's on the whole video, by the
    profile's latency model; None where the model cannot encode fewer frames."""
    pixels = inputs.get("pixel_values_videos")
    if pixels is None or model.config.model_type not in ("llava_onevision", "llava_next_video"):
        return None
    markers = 1 if model.config.model_type == "llava_onevision" else 0
    specs = video_prompt_specs(inputs["input_ids"], inputs.get("attention_mask"), model.config.image_token_id,
                               model.config.video_token_id, pixels.shape[0], pixels.shape[1], markers,
                               keeps=(1.0, min(FRAME_KEEPS)))
    if specs is None:
        return None
    selector = Selector(profile, F.load_model(model.config))
    off = next(p for p in profile.points if p.name == "off")
    fewest = min(selector.predict(p, specs[min(FRAME_KEEPS)][0])[1] for p in profile.frontier)
    return fewest / selector.predict(off, specs[1.0][0])[1]


def cheapest_share(profile: Profile) -> float:
    """The fastest frontier setting's calibrated prefill time over the unchanged model's."""
    off = next(p for p in profile.points if p.name == "off")
    return min(p.seconds for p in profile.frontier) / off.seconds


def report(base: float, budget_ms: float, fixed_name: str, phases, cores: int, quantile: float, threads: int) -> None:
    print(f"Budget   {budget_ms:.1f} ms prefill ({budget_ms / 1000 / base:.0%} of the unchanged model's quiet "
          f"{base * 1000:.1f} ms), held for a quantile of {quantile:g} of prefills; fixed setting: {fixed_name} "
          f"(the adaptive choice most often on the quiet machine)")
    print(f"Load     {cores} background processes spinning during the 'loaded' phase; torch runs {threads} "
          f"thread(s) on {os.cpu_count()} cores\n")
    print(f"{'phase':<12} {'policy':<9} {'within budget':>14} {'p50 / budget':>13} {'p90 / budget':>13} {'accuracy':>9}  settings run")
    for phase, rows in phases:
        for policy, results in rows.items():
            ratios = sorted(1000 * r.seconds / budget_ms for r in results)
            within = sum(r <= 1.0 for r in ratios) / len(ratios)
            p50 = ratios[len(ratios) // 2]
            p90 = ratios[min(len(ratios) - 1, int(0.9 * len(ratios)))]
            accuracy = sum(r.correct for r in results) / len(results)
            counts: dict[str, int] = {}
            for r in results:
                counts[r.point] = counts.get(r.point, 0) + 1
            common = sorted(counts.items(), key=lambda kv: -kv[1])
            shown = "; ".join(f"{k} x{v}" for k, v in common[:SHOWN])
            if len(common) > SHOWN:  # keep fractions solved per request vary with the load estimate
                shown += f"; {len(common) - SHOWN} other settings x{sum(v for _, v in common[SHOWN:])}"
            print(f"{phase:<12} {policy:<9} {within:>14.0%} {p50:>13.2f} {p90:>13.2f} {accuracy:>9.1%}  {shown}")
    loaded = dict(phases[1][1])
    adaptive_within = sum(1000 * r.seconds <= budget_ms for r in loaded["adaptive"]) / len(loaded["adaptive"])
    fixed_within = sum(1000 * r.seconds <= budget_ms for r in loaded["fixed"]) / len(loaded["fixed"])
    print(f"\nGoal: >= 90% of requests within budget under load: adaptive {adaptive_within:.0%} "
          f"({'met' if adaptive_within >= 0.9 else 'NOT met'}), fixed {fixed_within:.0%}")


if __name__ == "__main__":
    sys.exit(main())
