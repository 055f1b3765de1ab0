"""Latency budgets that hold for a share of prefills: the spread of measured / predicted times
(successive differences, so a change of load is not mistaken for noise) raises predictions to the
budget's quantile. Simulated with injected times, no sleeps."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

import pytest

import torch

from aim import AIMConfig, apply_aim, last_stats, remove_aim
from aim import flops as F
from aim.budget import Budget, LatencyModel, LoadTracker, Point, Profile, Selector, model_fingerprint
from aim.budget.inputs import input_spec
from aim.tiny import build_tiny_model, make_inputs

SPEC = input_spec(20, [16] * 4, 1, [4])


def test_spread_is_the_log_variance_of_independent_noise_and_ignores_a_change_of_load():
    rng = random.Random(0)
    tracker = LoadTracker(spread_alpha=0.02)
    for _ in range(3000):
        tracker.observe(math.exp(rng.gauss(0.0, 0.3)), 1.0)
    assert math.sqrt(tracker.spread) == pytest.approx(0.3, rel=0.15)
    # the prediction the margin makes (factor in use times margin) reaches the ratio's true 90th
    # percentile, exp(1.2816 * 0.3) for this noise, wherever in its dead band the factor sits
    p90 = math.exp(NormalDist().inv_cdf(0.9) * 0.3)
    assert 0.94 * p90 <= tracker.factor * tracker.margin(0.9) <= 1.3 * p90
    assert tracker.margin(0.5) == 1.0
    steady = LoadTracker()
    for ratio in [1.0] * 10 + [3.0] * 30:  # no noise, one change of load
        steady.observe(ratio, 1.0)
    assert 3.0 / 1.25 <= steady.factor <= 3.0 * (1 + 1e-9)  # moved to the new load (within the dead band)
    # one step, decayed: no lasting spread
    assert steady.spread == pytest.approx(0.1 * math.log(3.0) ** 2 / 2 * 0.9 ** 29)
    assert math.exp(NormalDist().inv_cdf(0.9) * math.sqrt(steady.spread)) < 1.1
    # and the margin lifts the lagging factor toward the new level, not far past it
    assert 0.95 * 3.0 <= steady.factor * steady.margin(0.9) <= 1.1 * 3.0


def test_after_the_load_ends_the_margin_is_the_noise_alone():
    """When the factor comes down, the typical ratio (a slower moving mean, still above it) comes
    down with it: the margin is then the noise quantile alone, not the lag read as a slowdown
    inside the band (which raised it by 1.2-1.6x over the 15 calls after such a load)."""
    rng = random.Random(0)
    tracker = LoadTracker()
    for ratio in [1.0] * 12 + [4.5] * 40:
        tracker.observe(ratio * math.exp(rng.gauss(0.0, 0.12)), 1.0)
    assert tracker.factor > 3.5
    for calls in range(1, 30):  # quiet again
        before = tracker.factor
        tracker.observe(math.exp(rng.gauss(0.0, 0.12)), 1.0)
        if tracker.factor < before:  # the factor came down
            assert tracker.level <= math.log(tracker.factor) + 1e-12
            assert tracker.margin(0.9) == pytest.approx(math.exp(NormalDist().inv_cdf(0.9) * math.sqrt(tracker.spread)))
    assert tracker.factor < 1.5


def _profile(model) -> Profile:
    """Merging alone at six keep fractions (one family, so keeps in between run too: costs close
    to continuous), fidelity rising with the keep, on a latency model of 0.1 ms per token."""
    points = []
    for i, keep in enumerate((0.1, 0.25, 0.4, 0.55, 0.7, 0.85)):
        config = AIMConfig(merge_keep=keep, prune=False)
        points.append(Point(f"merge {keep:g}", {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
                            0.5 + 0.08 * i, 1.0 - 0.15 * i, keep, keep))
    return Profile(model_fingerprint(model.config), "test", points, LatencyModel(per_token=1e-4))


_STREAMS: dict[float, tuple[float, float]] = {}


def _stream(quantile: float) -> tuple[float, float]:
    """A stream of prefills whose times scatter log-normally (sigma 0.25) around the prediction:
    ``(share within the budget, mean keep fraction run)`` after the first 100 requests."""
    if quantile not in _STREAMS:
        model = build_tiny_model("llava_onevision", num_layers=4, seed=0)
        selector = Selector(_profile(model), F.load_model(model.config))
        rng = random.Random(1)
        dearest = selector.predict(selector.profile.points[-1], SPEC)[1]
        budget = Budget(ms=1000 * dearest * 0.9, quantile=quantile)
        within, keeps = [], []
        for request in range(1100):
            choice = selector.choose(budget, [SPEC])
            base = choice.predicted_seconds / choice.load_factor
            measured = base * math.exp(rng.gauss(0.0, 0.25))
            selector.load.observe(measured, base)
            if request >= 100:  # after the spread is learned
                within.append(1000 * measured <= budget.ms)
                keeps.append(choice.config.merge_schedule[-1])
        _STREAMS[quantile] = (sum(within) / len(within), sum(keeps) / len(keeps))
    return _STREAMS[quantile]


@pytest.mark.parametrize("quantile", [0.5, 0.75, 0.9])
def test_a_stream_of_noisy_prefills_meets_the_budget_at_its_quantile(quantile):
    """The keep fraction is solved per request, so the cost is close to continuous: the share of
    prefills within the budget is close to the quantile asked for (a little above: the setting run
    is the dearest whose prediction is at most the budget)."""
    share, mean_keep = _stream(quantile)
    assert quantile - 0.04 <= share <= quantile + 0.08, share
    assert 0.1 < mean_keep < 0.85  # solved between the calibrated ends, never refused


def test_a_higher_quantile_runs_cheaper_settings():
    keeps = [_stream(q)[1] for q in (0.5, 0.75, 0.9)]
    assert keeps[0] > keeps[1] > keeps[2]


@pytest.mark.parametrize("kwargs, message", [(dict(ms=10, quantile=1.0), "quantile"), (dict(ms=10, quantile=0.3), "quantile"),
                                             (dict(flops=0.5, quantile=0.9), "latency budgets")])
def test_bad_quantiles_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def test_a_quantile_without_a_latency_budget_is_a_clear_error():
    from aim.patch.wrappers import budget_from

    with pytest.raises(ValueError, match="latency budget"):
        budget_from(0.5, None, 0.9)
    with pytest.raises(ValueError, match="missing"):
        budget_from(None, None, 0.9)
    assert budget_from(None, 20.0, None).share == 0.9 and budget_from(None, 20.0, 0.75).share == 0.75


def test_a_slowdown_inside_the_dead_band_raises_the_margin_at_once():
    """The factor in use waits for the average to leave the 25% band; a quantile's margin does
    not wait for a slowdown (it does for a speed-up), and the median keeps the band's hysteresis."""
    tracker = LoadTracker()
    for _ in range(5):
        tracker.observe(1.0, 1.0)
    for _ in range(20):
        tracker.observe(1.2, 1.0)  # 20% slower: inside the band
    assert tracker.factor == 1.0 and math.exp(tracker.level) == pytest.approx(1.2, rel=0.03)
    assert tracker.margin(0.9) == pytest.approx(
        math.exp(tracker.level) * math.exp(NormalDist().inv_cdf(0.9) * math.sqrt(tracker.spread)))
    assert tracker.margin(0.9) >= 1.16 and tracker.margin(0.5) == 1.0
    faster = LoadTracker()
    for ratio in [1.0] * 5 + [0.85] * 20:  # 15% faster: inside the band, no drift term
        faster.observe(ratio, 1.0)
    assert faster.factor == 1.0 and faster.margin(0.9) == pytest.approx(
        math.exp(NormalDist().inv_cdf(0.9) * math.sqrt(faster.spread)))


@pytest.mark.parametrize("step", [1.4, 1.45])
def test_a_step_of_load_is_followed_after_two_calls(step):
    """Two calls in a row beyond the band (and the noise) move the factor to the new load at once,
    also when the first of them already moved it part of the way; the moving average alone is
    still short of it after six calls. (Steps below the one-call jump's 1.5x.)"""
    tracker = LoadTracker()
    for _ in range(10):
        tracker.observe(1.0, 1.0)
    tracker.observe(step, 1.0)
    assert tracker.factor < 0.9 * step  # one call: at most the moving average's part of the way
    tracker.observe(step, 1.0)
    assert tracker.factor == pytest.approx(step)
    lagging = LoadTracker(confirm=0, jump=0)  # the moving average alone
    for ratio in [1.0] * 10 + [step] * 6:
        lagging.observe(ratio, 1.0)
    assert lagging.factor < 0.95 * step


@pytest.mark.parametrize("step", [1.7, 3.0, 5.0])
def test_a_large_step_of_load_is_followed_after_one_call(step):
    """One call 1.5 times slower than the factor (beyond the noise) moves it at once: the request
    after a load arrives is the one most likely to miss. Without the jump it takes two calls."""
    tracker = LoadTracker()
    for _ in range(10):
        tracker.observe(1.0, 1.0)
    tracker.observe(step, 1.0)
    assert tracker.factor == pytest.approx(step)
    waiting = LoadTracker(jump=0)
    for _ in range(10):
        waiting.observe(1.0, 1.0)
    waiting.observe(step, 1.0)
    assert waiting.factor < 0.8 * step
    waiting.observe(step, 1.0)
    assert waiting.factor == pytest.approx(step)


def test_slow_calls_not_in_a_row_leave_the_factor_to_the_average_and_a_speed_up_still_waits():
    tracker = LoadTracker(jump=0)  # 1.7x would move it in one call (the test above)
    for _ in range(10):
        tracker.observe(1.0, 1.0)
    average = 1.0
    for ratio in (1.7, 1.0, 1.7):  # two slow calls, not in a row: the moving average alone moves it
        tracker.observe(ratio, 1.0)
        average = 0.7 * average + 0.3 * ratio
    assert tracker.factor == pytest.approx(average) and average < 1.4
    steady = LoadTracker(jump=0)
    for ratio in [1.0] * 10 + [1.7] * 2:  # two in a row
        steady.observe(ratio, 1.0)
    assert steady.factor == pytest.approx(1.7)
    steady.observe(1.0, 1.0)  # load gone: average 1.49, inside the band around 1.7
    assert steady.factor == pytest.approx(1.7)


def test_a_far_call_after_a_milder_slow_one_moves_the_factor_to_its_own_ratio():
    """A slow call beyond the band before a far one must not pull the jump down to their mean."""
    tracker = LoadTracker()
    for ratio in [1.0] * 10 + [1.4, 5.0]:
        tracker.observe(ratio, 1.0)
    assert tracker.factor == pytest.approx(5.0)
    alone = LoadTracker(confirm=0)  # the jump works without the two-in-a-row rule
    for ratio in [1.0] * 10 + [5.0]:
        alone.observe(ratio, 1.0)
    assert alone.factor == pytest.approx(5.0)


def test_warmup_calls_set_the_factor_by_their_mean_not_by_a_jump():
    tracker = LoadTracker(warmup=5)
    for ratio in (1.0, 4.0):  # a slow second call while warming up
        tracker.observe(ratio, 1.0)
    assert tracker.factor == pytest.approx(2.5)


@pytest.mark.parametrize("jump", [1.2, 1.25, float("nan")])
def test_a_jump_not_beyond_the_dead_band_is_a_clear_error(jump):
    with pytest.raises(ValueError, match="dead band"):
        LoadTracker(jump=jump)


@pytest.mark.parametrize("quantile", [0.5, 1.0])
def test_a_jump_quantile_outside_its_range_is_a_clear_error(quantile):
    with pytest.raises(ValueError, match="jump_quantile"):
        LoadTracker(jump_quantile=quantile)


def test_measurements_that_are_not_finite_are_ignored():
    tracker = LoadTracker()
    for _ in range(10):
        tracker.observe(1.0, 1.0)
    for measured in (float("inf"), float("nan")):
        tracker.observe(measured, 1.0)
    assert tracker.factor == pytest.approx(1.0) and tracker.observations == 10


def test_a_noisy_machine_needs_a_larger_slowdown_to_move_the_factor_at_once():
    rng = random.Random(1)
    tracker = LoadTracker()
    for _ in range(300):
        tracker.observe(math.exp(rng.gauss(0.0, 0.3)), 1.0)
    before = tracker.factor
    tracker.observe(2.5 * before, 1.0)  # 2.5x: beyond the one-call jump's 1.5x, not this noise's 99% quantile on top
    assert tracker.factor < 1.6 * before
    tracker = LoadTracker()
    for _ in range(300):
        tracker.observe(math.exp(rng.gauss(0.0, 0.3)), 1.0)
    before = tracker.factor
    for _ in range(2):  # 1.5x: beyond the band, not beyond this noise's 90% quantile on top of it
        tracker.observe(1.5 * before, 1.0)
    assert tracker.factor < 1.4 * before
    quiet = LoadTracker()
    for _ in range(300):
        quiet.observe(math.exp(rng.gauss(0.0, 0.02)), 1.0)
    before = quiet.factor
    for _ in range(2):
        quiet.observe(1.5 * before, 1.0)
    assert quiet.factor == pytest.approx(1.5 * before)


def test_a_tracker_without_warmup_learns_the_spread_from_the_second_call():
    tracker = LoadTracker(warmup=0)
    tracker.observe(1.0, 1.0)
    assert tracker.spread == 0.0 and tracker.factor == 1.0
    tracker.observe(2.0, 1.0)
    assert tracker.spread == pytest.approx(0.1 * math.log(2.0) ** 2 / 2)


def test_the_quantile_reaches_the_call_from_apply_aim_and_per_request():
    """budget_quantile (model level) and aim_budget_quantile (per call) set the margin the
    choice reports; the median has none."""
    model = build_tiny_model("llava_onevision", num_layers=4, seed=0)
    inputs = make_inputs(model, kind="video", num_frames=4, text_lengths=(20,), seed=0)
    profile = _profile(model)
    apply_aim(model, budget_ms=1e6, budget_quantile=0.75, profile=profile)
    try:
        tracker = model._aim.selector.load
        for ratio in (1.0, 1.5, 1.0, 1.5, 1.0):  # a measured spread
            tracker.observe(ratio, 1.0)
        with torch.no_grad():
            model(**inputs)
            at_75 = last_stats(model).budget
            model(**inputs, aim_budget_ms=1e6, aim_budget_quantile=0.5)
            at_50 = last_stats(model).budget
            out = model.generate(**inputs, aim_budget_ms=1e6, aim_budget_quantile=0.95, max_new_tokens=1, do_sample=False)
            at_95 = last_stats(model).budget
        assert out.shape[1] == inputs["input_ids"].shape[1] + 1
        assert at_50["margin"] == 1.0 < at_75["margin"] < at_95["margin"]
        assert at_75["budget"].endswith("(p75)") and at_95["budget"].endswith("(p95)")
        with pytest.raises(ValueError, match="latency budgets"):
            model(**inputs, aim_budget=0.5, aim_budget_quantile=0.9)
    finally:
        remove_aim(model)
