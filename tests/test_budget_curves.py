"""Budgets between calibrated merge keep fractions (aim.budget.curves): the selector solves the
largest keep that fits, interpolates its fidelity, and is held to an exhaustive search; the engine
runs exactly the cost that was predicted."""

from __future__ import annotations

import random

import pytest
import torch

from aim import AIMConfig, apply_aim, last_stats, remove_aim
from aim import flops as F
from aim.budget import Budget, Fidelity, LatencyModel, Point, Profile, Selector, model_fingerprint, monotone_fidelity
from aim.budget.curves import KEEP_STEP, MAX_GAP, keep_curves
from aim.budget.inputs import input_spec
from aim.budget.space import setting_name
from aim.tiny import build_tiny_model, make_inputs

NUM_LAYERS = 4
SPEC = input_spec(20, [16] * 4, 1, [4])  # 4 frames of 16 tokens, a newline, 20 text tokens
OTHER = input_spec(300, [16] * 2, 1, [2])
PRUNE = dict(prune_keep_ratios=(1.0, 1.0, 0.5, 0.0))


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llava_onevision", num_layers=NUM_LAYERS, seed=0)


def _profile(model, settings: list[tuple[AIMConfig, float, float]], calibrated_on=SPEC) -> Profile:
    """A profile of `settings` ``(config, agreement, kl)`` whose FLOPs fractions are the FLOPs
    model's for `calibrated_on` (`SPEC`: the frontier and the per-input predictions agree)."""
    spec = F.load_model(model.config)
    probe = Selector(Profile({}, "probe", [], LatencyModel()), spec, interpolate=False)
    points = []
    for config, agreement, kl in settings:
        name = setting_name(config, NUM_LAYERS)
        stored = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()}
        fraction = probe._predict(name, lambda c=config: c, 1.0, calibrated_on)[0]
        points.append(Point(name, stored, agreement, kl, fraction, fraction))
    return Profile(model_fingerprint(model.config), "test", points, LatencyModel(per_token=1e-5))


def merge(keep: float, **knobs) -> AIMConfig:
    return AIMConfig(merge_keep=keep, **({"prune": False} | knobs))


def test_a_budget_between_two_calibrated_keeps_runs_the_largest_keep_that_fits(model):
    profile = _profile(model, [(merge(0.25), 0.70, 0.5), (merge(0.35), 0.80, 0.3), (merge(0.5), 0.90, 0.1)])
    selector = Selector(profile, F.load_model(model.config))
    low, high = (selector.predict(p, SPEC)[0] for p in profile.points[1:])
    budget = (low + high) / 2
    choice = selector.choose(Budget(flops=budget), [SPEC])
    keep = choice.config.merge_schedule[-1]
    assert 0.35 < keep < 0.5 and choice.point == f"merge {keep:g}"
    assert choice.predicted_flops_fraction <= budget
    # the largest on the grid: one step more does not fit
    over = selector._predict("over", lambda: merge(round(keep + KEEP_STEP, 6)), 1.0, SPEC)[0]
    assert over > budget
    # calibrated settings only: the cheaper neighbour
    grid = Selector(profile, F.load_model(model.config), interpolate=False)
    assert grid.choose(Budget(flops=budget), [SPEC]).point == "merge 0.35"
    # the interpolated fidelity lies between the neighbours'
    curve = keep_curves(profile, NUM_LAYERS)[0]
    fidelity, _ = curve.between(1, keep)
    assert 0.80 < fidelity.agreement < 0.90 and -0.3 < fidelity.negative_kl < -0.1
    assert fidelity == pytest.approx(Fidelity(negative_kl=-0.3 + 0.2 * (keep - 0.35) / 0.15,
                                              agreement=0.80 + 0.10 * (keep - 0.35) / 0.15))


def test_a_calibrated_point_more_faithful_than_the_interpolation_wins(model):
    """Another family's calibrated point that fits and beats the interpolated estimate runs."""
    profile = _profile(model, [(merge(0.25), 0.70, 0.5), (merge(0.35), 0.75, 0.3), (merge(0.5), 0.95, 0.1),
                               (merge(0.35, temporal_keep=0.5), 0.90, 0.2)])
    selector = Selector(profile, F.load_model(model.config))
    low, high = (selector.predict(profile.points[i], SPEC)[0] for i in (1, 2))
    assert selector.choose(Budget(flops=low + 0.2 * (high - low)), [SPEC]).point == "temporal 0.5, merge 0.35"


def test_merging_alone_runs_up_to_the_unchanged_model_and_wide_gaps_are_not_interpolated(model):
    profile = _profile(model, [(merge(0.8), 0.90, 0.1), (AIMConfig(enabled=False), 1.0, 0.0),
                               (merge(0.25, merge_method="pool"), 0.80, 0.2), (merge(0.5, merge_method="pool"), 0.85, 0.15)])
    profile.points[0].latency_scale, profile.points[1].latency_scale = 1.2, 0.8
    curves = keep_curves(profile, NUM_LAYERS)
    by_first = {c.members[0].point.name: [m.keep for m in c.members] for c in curves}
    assert by_first == {"merge 0.8": [0.8, 1.0], "merge 0.25 (pool)": [0.25, 0.5, 1.0]}
    # toward the unchanged model the merge stage still runs: merging's time scale, not a blend
    assert curves[0].between(0, 0.9) == (pytest.approx(Fidelity(negative_kl=-0.05, agreement=0.95)), 1.2)
    assert [curves[1].spans(i) for i in range(2)] == [0.25 <= MAX_GAP, 0.5 <= MAX_GAP] == [False, False]
    selector = Selector(profile, F.load_model(model.config))
    choice = selector.choose(Budget(flops=0.95), [SPEC])
    assert 0.8 < choice.config.merge_schedule[-1] < 1.0 and choice.config.merge_method == "bipartite"
    assert choice.predicted_flops_fraction <= 0.95
    # a budget between the two pooling points runs the calibrated cheaper one (gap 0.25 > MAX_GAP)
    low = selector.predict(profile.points[2], SPEC)[0]
    choice = Selector(profile, F.load_model(model.config)).choose(Budget(flops=low + 1e-4), [SPEC])
    assert choice.point == "merge 0.25 (pool)"


def test_a_setting_off_the_frontier_runs_when_this_input_makes_it_the_best_that_fits(model):
    """The frontier ranks settings by their mean cost on the calibration inputs; on an input that
    orders them otherwise, the dearest member of a curve that fits runs even when the frontier
    holds nothing between it and the cheapest point."""
    settings = [(merge(0.05, prune=True, **PRUNE), 0.1, 2.0), (merge(0.8, merge_method="pool"), 0.99, 0.01),
                (merge(0.1), 0.3, 1.0), (merge(0.25), 0.5, 0.8), (merge(0.5), 0.7, 0.5), (AIMConfig(enabled=False), 1.0, 0.0)]
    profile = _profile(model, settings)
    profile.points[0].flops_fraction = 0.01
    profile.points[1].flops_fraction = 0.02  # cheap on the calibration inputs, dear on this one
    profile.frontier_names = []
    profile.__post_init__()
    assert profile.frontier_names == ["merge 0.05, prune 2-3", "merge 0.8 (pool)", "off"]
    selector = Selector(profile, F.load_model(model.config))
    top, pooled = selector.predict(profile.points[4], SPEC)[0], selector.predict(profile.points[1], SPEC)[0]
    assert top < pooled
    assert selector.choose(Budget(flops=(top + pooled) / 2), [SPEC]).point == "merge 0.5"


def _exhaustive(selector: Selector, budget: float) -> tuple[float, float]:
    """The highest fidelity of anything the selector may run within `budget` on `SPEC`: every
    calibrated point, and every grid keep between two neighbours of a curve."""
    fidelity = monotone_fidelity(selector.profile.points)
    best = max((fidelity[p.name] for p in selector.profile.points if selector.predict(p, SPEC)[0] <= budget + 1e-12),
               default=None)
    for curve in selector.curves:
        for lower in range(len(curve.members) - 1):
            if not curve.spans(lower):
                continue
            lo, hi = curve.members[lower].keep, curve.members[lower + 1].keep
            for step in range(1, round(1 / KEEP_STEP)):  # the whole grid, filtered (not the selector's bounds)
                keep = round(step * KEEP_STEP, 6)
                if not lo < keep < hi:
                    continue
                config = curve.config(keep)
                if selector._predict(setting_name(config, NUM_LAYERS), lambda c=config: c, 1.0, SPEC)[0] <= budget + 1e-12:
                    best = max(best, curve.between(lower, keep)[0]) if best is not None else curve.between(lower, keep)[0]
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("calibrated_on", [SPEC, OTHER], ids=["same layout", "other layout"])
def test_the_choice_is_as_faithful_as_an_exhaustive_search(model, seed, calibrated_on):
    """Random fidelities on three families (merging alone ending at the unchanged model, with
    pruning, with temporal merging): the chosen setting's fidelity equals the best an exhaustive
    search finds over calibrated points and every grid keep between calibrated neighbours, also
    when the profile's frontier was ranked by the costs of another layout (long text, two frames),
    which order the settings differently from this input's."""
    rng = random.Random(seed)
    keeps = (0.1, 0.15, 0.25, 1 / 3, 0.5, 0.65, 0.8)  # 1/3: a calibrated keep off the 0.001 grid
    settings = [(AIMConfig(enabled=False), 1.0, 0.0)]
    for knobs in (dict(), dict(PRUNE, prune=True), dict(temporal_keep=0.5)):
        for keep in keeps:
            settings.append((merge(keep, **knobs), rng.random() * 0.9, rng.random()))
    profile = _profile(model, settings, calibrated_on)
    selector = Selector(profile, F.load_model(model.config))
    fidelity = monotone_fidelity(profile.points)
    cheapest = min(selector.predict(p, SPEC)[0] for p in profile.frontier)
    for budget in [cheapest + (1 - cheapest) * i / 9 for i in range(10)]:
        choice = selector.choose(Budget(flops=budget), [SPEC])
        assert choice.predicted_flops_fraction <= budget + 1e-12
        found = fidelity.get(choice.point)
        if found is None:  # interpolated: its curve and bracket
            keep = choice.config.merge_schedule[-1]
            curve = next(c for c in selector.curves if c.config(keep) == choice.config)
            lower = max(i for i, m in enumerate(curve.members) if m.keep < keep)
            found = curve.between(lower, keep)[0]
        assert found == pytest.approx(_exhaustive(selector, budget), abs=1e-12)


def test_the_engine_runs_the_interpolated_setting_at_its_predicted_cost(model):
    profile = _profile(model, [(merge(0.35), 0.80, 0.3), (merge(0.5), 0.90, 0.1)])
    inputs = make_inputs(model, kind="video", num_frames=4, text_lengths=(20,), seed=0)
    spec = F.load_model(model.config)
    selector = Selector(profile, spec)
    low, high = (selector.predict(p, SPEC)[0] for p in profile.points)
    apply_aim(model, budget=(low + high) / 2, profile=profile)
    try:
        with torch.no_grad():
            model(**inputs)
        stats = last_stats(model)
        assert stats.budget["point"] not in ("merge 0.35", "merge 0.5")
        n = inputs["input_ids"].shape[1]
        assert n == SPEC.total_tokens
        measured = F.prefill_flops(spec, stats.tokens_per_layer_of(0)) / F.prefill_flops(spec, [n] * NUM_LAYERS)
        assert measured == pytest.approx(stats.budget["predicted_flops_fraction"])
        apply_aim(model, budget=(low + high) / 2, profile=profile, interpolate_keeps=False)
        with torch.no_grad():
            model(**inputs)
        assert last_stats(model).budget["point"] == "merge 0.35"
    finally:
        remove_aim(model)
