"""Budget-driven inference: the frontier, per-input cost prediction, per-call budgets, the load
correction (with an injected clock), and profile files."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from aim import AIMConfig, apply_aim, last_stats, remove_aim
from aim import flops as F
from aim.budget import Budget, Candidate, Fidelity, LatencyModel, LoadTracker, Point, Profile, Selector, calibrate, model_fingerprint, monotone_fidelity, pareto_frontier
from aim.budget.inputs import input_spec
from aim.tiny import build_tiny_model, make_inputs

CANDIDATES = [
    Candidate("merge 0.5", AIMConfig(merge_keep=0.5, prune=False)),
    Candidate("merge 0.25", AIMConfig(merge_keep=0.25, prune=False)),
    Candidate("merge 0.25, prune", AIMConfig(merge_keep=0.25, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0))),
    Candidate("temporal 0.5, merge 0.25", AIMConfig(temporal_keep=0.5, merge_keep=0.25, prune=False)),
    Candidate("prune", AIMConfig(merge_schedule=(), prune_keep_ratios=(1.0, 1.0, 0.5, 0.0))),
]


def _point(name, agreement, kl, fraction, config=None):
    config = config or AIMConfig(merge_keep=max(fraction, 0.01), prune=False)
    return Point(name, {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
                 agreement, kl, fraction, fraction)


def test_frontier_keeps_exactly_the_undominated_points():
    def point(name, agreement, kl, fraction, family):  # the seed is part of a setting: one family each
        return _point(name, agreement, kl, fraction, AIMConfig(merge_keep=max(fraction, 0.01), prune=False, seed=family))

    points = [
        point("a", 1.0, 0.0, 1.0, 0), point("b", 0.9, 0.1, 0.5, 1), point("c", 0.8, 0.2, 0.6, 2),  # c: dominated by b
        point("d", 0.9, 0.05, 0.5, 3),  # same cost as b, more faithful: replaces it
        point("e", 0.5, 0.9, 0.1, 4), point("f", 0.4, 1.0, 0.2, 5),  # f: dominated by e
    ]
    assert monotone_fidelity(points) == {p.name: p.fidelity for p in points}  # families of one: as measured
    assert [p.name for p in pareto_frontier(points)] == ["e", "d", "a"]
    # brute force: on the frontier iff no other point is at most as dear and more faithful
    undominated = [p.name for p in points
                   if not any(q.flops_fraction <= p.flops_fraction and q.fidelity > p.fidelity for q in points)]
    assert sorted(undominated) == ["a", "d", "e"]


def test_settings_rank_by_kl_first_then_agreement():
    """The ranking rule chosen on held-out validation data (benchmarks/fidelity_ranking.py): a dearer
    setting that agrees more often but moves the distribution more is not worth its cost; agreement
    decides between equal KLs."""
    def point(name, agreement, kl, fraction, family):
        return _point(name, agreement, kl, fraction, AIMConfig(merge_keep=fraction, prune=False, seed=family))

    points = [point("closer", 0.85, 0.10, 0.4, 0), point("agrees more", 0.95, 0.30, 0.5, 1),
              point("same KL, agrees less", 0.80, 0.10, 0.6, 2), point("same KL, agrees more", 0.90, 0.10, 0.7, 3)]
    assert [p.name for p in pareto_frontier(points)] == ["closer", "same KL, agrees more"]
    assert max(points, key=lambda p: p.fidelity).name == "same KL, agrees more"


def test_fidelity_is_monotone_in_the_keep_fraction_within_a_family_and_budgets_spend_ties():
    """Neighbouring keep fractions of one setting measured out of order (calibration noise) are
    pooled, so a budget that affords the dearer one runs it; another family is left as measured."""
    def merge(keep, agreement, kl, cost=None, **family):
        return _point(f"merge {keep}{family}", agreement, kl, cost or keep, AIMConfig(merge_keep=keep, prune=False, **family))

    family = [merge(0.1, 0.70, 0.30), merge(0.25, 0.85, 0.08), merge(0.5, 0.80, 0.12), merge(0.8, 0.95, 0.02)]
    other = [merge(0.5, 0.90, 0.05, 0.6, temporal_keep=0.5), merge(0.25, 0.60, 0.20, 0.3, temporal_keep=0.5)]
    fidelity = monotone_fidelity(family + other)
    assert [fidelity[p.name].agreement for p in family] == pytest.approx([0.70, 0.825, 0.825, 0.95])
    assert [fidelity[p.name].negative_kl for p in family] == pytest.approx([-0.30, -0.10, -0.10, -0.02])
    assert [fidelity[p.name] for p in other] == [Fidelity(negative_kl=-0.05, agreement=0.90),
                                                 Fidelity(negative_kl=-0.20, agreement=0.60)]  # already monotone
    for members in (family, other):  # pooling keeps each family's mean
        assert sum(fidelity[p.name].agreement for p in members) == pytest.approx(sum(p.agreement for p in members))
        assert sum(fidelity[p.name].negative_kl for p in members) == pytest.approx(-sum(p.kl for p in members))
    frontier = [p.name for p in pareto_frontier(family + other)]
    assert frontier == [family[0].name, family[1].name, family[2].name, other[0].name, family[3].name]
    # brute force on the pooled fidelity: on the frontier iff nothing at most as dear is strictly more faithful
    assert sorted(frontier) == sorted(p.name for p in family + other if not any(
        q.flops_fraction <= p.flops_fraction and fidelity[q.name] > fidelity[p.name] for q in family + other))
    profile = Profile({}, "test", family, LatencyModel(constant=1e-3))
    selector = Selector(profile, F.load_model(build_tiny_model("llava_onevision", num_layers=4, seed=0).config))
    spec = input_spec(20, [16] * 4, 1, [4])
    fraction = selector.predict(family[2], spec)[0]
    assert selector.choose(Budget(flops=fraction + 1e-6), [spec]).point == family[2].name  # the dearer of the tie


def test_families_are_the_settings_apart_from_the_merge_keep_fraction():
    """Temporal merging alone (keep 1.0) pools with temporal + merging; the unchanged model and the
    pooling baseline are families of their own."""
    points = [
        _point("temporal 0.5", 0.70, 0.4, 0.5, AIMConfig(temporal_keep=0.5, merge_schedule=(), prune=False)),
        _point("temporal 0.5, merge 0.5", 0.80, 0.3, 0.25, AIMConfig(temporal_keep=0.5, merge_keep=0.5, prune=False)),
        _point("off", 1.0, 0.0, 1.0, AIMConfig(enabled=False)),
        _point("merge 0.25 (pool)", 0.90, 0.1, 0.21, AIMConfig(merge_keep=0.25, merge_method="pool", prune=False)),
        _point("merge 0.25", 0.60, 0.2, 0.21, AIMConfig(merge_keep=0.25, prune=False)),
        _point("merge 0.5", 0.50, 0.3, 0.44, AIMConfig(merge_keep=0.5, prune=False)),
    ]
    fidelity = monotone_fidelity(points)
    assert fidelity["temporal 0.5"] == fidelity["temporal 0.5, merge 0.5"] == pytest.approx(Fidelity(-0.35, 0.75))
    assert fidelity["merge 0.25"] == fidelity["merge 0.5"] == pytest.approx(Fidelity(-0.25, 0.55))
    assert fidelity["off"] == Fidelity(negative_kl=0.0, agreement=1.0)
    assert fidelity["merge 0.25 (pool)"] == Fidelity(negative_kl=-0.1, agreement=0.90)


@pytest.fixture(scope="module")
def tiny_video():
    model = build_tiny_model("llava_onevision", num_layers=4, seed=0)
    inputs = [make_inputs(model, kind="video", num_frames=4, text_lengths=(6 + i,), seed=i) for i in range(4)]
    return model, inputs


@pytest.fixture(scope="module")
def profile(tiny_video):
    model, inputs = tiny_video
    return calibrate(model, inputs, candidates=CANDIDATES, description="tiny", progress=False)


def test_calibration_measures_every_candidate(profile, tiny_video):
    model, _ = tiny_video
    assert [p.name for p in profile.points] == [c.name for c in CANDIDATES]
    for point in profile.points:
        assert 0.0 <= point.agreement <= 1.0 and point.kl >= 0.0 and 0 < point.flops_fraction < 1.0
    assert profile.frontier and all(p in profile.points for p in profile.frontier)
    assert profile.model == model_fingerprint(model.config)
    assert all(c >= 0 for c in profile.latency.__dict__.values())


def test_latency_prediction_matches_each_setting_on_its_calibration_inputs(profile, tiny_video):
    """The per-setting scale makes the predicted time of each point, averaged over the calibration
    inputs, equal its measured mean there (the cost token counts do not show included)."""
    model, inputs = tiny_video
    selector = Selector(profile, F.load_model(model.config))
    for point in profile.points:
        assert point.latency_scale > 0
        predicted = [selector.predict(point, _described(model, x))[1] for x in inputs]
        assert sum(predicted) / len(predicted) == pytest.approx(point.seconds, rel=1e-6)


def test_predicted_cost_equals_what_the_engine_runs(profile, tiny_video):
    model, inputs = tiny_video
    spec = F.load_model(model.config)
    selector = Selector(profile, spec)
    apply_aim(model, profile=profile)
    try:
        for point in profile.frontier:
            with torch.no_grad():
                model(**inputs[1], aim_config=point.aim_config())
            stats = last_stats(model)
            described = _described(model, inputs[1])
            fraction, _ = selector.predict(point, described)
            base = F.prefill_flops(spec, [described.total_tokens] * 4)
            assert fraction == pytest.approx(F.prefill_flops(spec, stats.tokens_per_layer_of(0)) / base)
    finally:
        remove_aim(model)


def _described(model, inputs) -> F.InputSpec:
    n = inputs["input_ids"].shape[1]
    return input_spec(n - 65, [16] * 4, 1, [4])  # 4 frames of 4x4 pooled tokens + the video newline


def test_budgets_choose_per_input_and_per_call_overrides_the_model(profile, tiny_video):
    model, inputs = tiny_video
    apply_aim(model, budget=0.6, profile=profile)
    try:
        with torch.no_grad():
            model(**inputs[0])
            chosen = last_stats(model).budget
            assert chosen["predicted_flops_fraction"] <= 0.6 and chosen["measured_seconds"] > 0
            assert chosen["point"] in [p.name for p in profile.frontier]
            model(**inputs[0], aim_budget=1.0)
            loose = last_stats(model).budget
            assert loose["predicted_flops_fraction"] >= chosen["predicted_flops_fraction"]
            fidelity = monotone_fidelity(profile.points)
            most = max(fidelity[p.name] for p in profile.frontier)
            assert loose["point"] == [p.name for p in profile.frontier if fidelity[p.name] == most][-1]
            out = model.generate(**inputs[0], aim_budget=0.6, max_new_tokens=2, do_sample=False)
            assert out.shape[1] == inputs[0]["input_ids"].shape[1] + 2
            assert last_stats(model).budget["point"] == chosen["point"]
            with pytest.raises(ValueError, match="below the cheapest"):
                model(**inputs[0], aim_budget=0.001)
            with pytest.raises(ValueError, match="not both"):
                model.generate(**inputs[0], aim_budget=0.5, aim_config=dict(prune=False))
    finally:
        remove_aim(model)


def _cheap_and_dear(model, clock=None):
    """Two hand-made points (a cheap, unfaithful one; a dear, faithful one) with a latency model of
    0.1 ms per token the layers process, and a selector over them."""
    cheap = _point("cheap", 0.5, 1.0, 0.3, AIMConfig(merge_keep=0.05, prune_keep_ratios=(1.0, 0.0, 0.0, 0.0)))
    dear = _point("dear", 0.9, 0.1, 0.7, AIMConfig(merge_keep=0.5, prune=False))
    profile = Profile(model_fingerprint(model.config), "test", [cheap, dear], LatencyModel(constant=0.0, per_token=1e-4))
    return cheap, dear, Selector(profile, F.load_model(model.config), clock=clock)


def test_load_correction_moves_to_cheaper_points_and_back(tiny_video):
    model, inputs = tiny_video
    now = [0.0]
    cheap, dear, selector = _cheap_and_dear(model, clock=lambda: now[0])
    spec = _described(model, inputs[0])
    dear_ms = selector.predict(dear, spec)[1] * 1000
    # the dear point fits on a quiet machine (the band is 25%); the median, so that the spread of
    # times (tests/test_budget_quantile.py) does not enter
    budget = Budget(ms=dear_ms * 1.3, quantile=0.5)
    assert 3 * selector.predict(cheap, spec)[1] * 1000 <= budget.ms  # and the cheap one at 3x load
    assert selector.choose(budget, [spec]).point == "dear"
    for _ in range(6):  # the machine is shared: prefills take 3x the prediction
        choice = selector.choose(budget, [spec])
        selector.load.observe(3 * choice.predicted_seconds / choice.load_factor, choice.predicted_seconds / choice.load_factor)
    assert selector.choose(budget, [spec]).point == "cheap"
    # a little noise around the new level does not flap
    selector.load.observe(1.1 * 3 * 0.001, 0.001)
    assert selector.choose(budget, [spec]).point == "cheap"
    for _ in range(20):  # the load ends
        choice = selector.choose(budget, [spec])
        selector.load.observe(choice.predicted_seconds / choice.load_factor, choice.predicted_seconds / choice.load_factor)
    assert selector.choose(budget, [spec]).point == "dear"


def test_latency_budget_under_heavy_load_runs_the_cheapest_and_recovers(tiny_video, caplog):
    """A latency budget that fits when quiet but not under the load measured now: the cheapest
    point runs with a warning (never an error that would stop the load estimate from updating),
    and the choice comes back once the load ends; a budget too small even when quiet is refused."""
    model, inputs = tiny_video
    cheap, dear, selector = _cheap_and_dear(model)
    spec = _described(model, inputs[0])
    cheap_ms = selector.predict(cheap, spec)[1] * 1000
    budget = Budget(ms=cheap_ms * 1.1)
    selector.load.observe(1.0, 1.0)  # this machine runs as fast as the calibrating one
    with pytest.raises(ValueError, match="below the cheapest"):
        selector.choose(Budget(ms=cheap_ms * 0.9), [spec])
    for _ in range(6):  # prefills take 5x the prediction: nothing fits any more
        choice = selector.choose(budget, [spec])
        selector.load.observe(5 * choice.predicted_seconds / choice.load_factor, choice.predicted_seconds / choice.load_factor)
    assert selector.load.factor > 3
    with caplog.at_level("WARNING", logger="aim.budget.select"):
        assert selector.choose(budget, [spec]).point == "cheap"
    assert "best effort" in caplog.text
    for _ in range(20):  # the load ends
        choice = selector.choose(budget, [spec])
        selector.load.observe(choice.predicted_seconds / choice.load_factor, choice.predicted_seconds / choice.load_factor)
    assert selector.load.factor < 1.3


def test_latency_budget_on_a_faster_machine_under_load_is_best_effort_not_refused(tiny_video, caplog):
    """On a machine twice as fast as the calibrating one, a budget the cheapest point meets here when
    quiet (but would not on the calibrating machine) gets the cheapest point under load, not an error."""
    model, inputs = tiny_video
    cheap, dear, selector = _cheap_and_dear(model)
    spec = _described(model, inputs[0])
    cheap_s = selector.predict(cheap, spec)[1]
    budget = Budget(ms=0.7 * 1000 * cheap_s)  # fits 0.5x, not 1x
    selector.load.observe(0.5 * cheap_s, cheap_s)  # measured: twice as fast
    assert selector.choose(budget, [spec]).point == "cheap"
    for _ in range(6):  # then the machine is shared: prefills take 3x the prediction
        choice = selector.choose(budget, [spec])
        selector.load.observe(3 * choice.predicted_seconds / choice.load_factor, choice.predicted_seconds / choice.load_factor)
    assert selector.load.factor > 1.5 and selector.load.quietest == pytest.approx(0.5)
    with caplog.at_level("WARNING", logger="aim.budget.select"):
        assert selector.choose(budget, [spec]).point == "cheap"
    assert "best effort" in caplog.text
    with pytest.raises(ValueError, match="below the cheapest"):  # too small even at this machine's quiet speed
        selector.choose(Budget(ms=0.4 * 1000 * cheap_s), [spec])


def test_profile_from_a_slower_machine_adapts_after_the_first_call(tiny_video, caplog):
    """A profile calibrated on a machine eight times as slow: before any measurement, a budget below
    the cheapest point's prediction runs the cheapest with a warning (not a refusal); the first
    measured times are taken as this machine's speed, and the most faithful point that then fits runs."""
    model, inputs = tiny_video
    cheap, dear, selector = _cheap_and_dear(model)
    spec = _described(model, inputs[0])
    cheap_s, dear_s = selector.predict(cheap, spec)[1], selector.predict(dear, spec)[1]
    assert dear_s / 8 < 0.9 * cheap_s  # so the budget below fits the dear point at eight times the speed
    budget = Budget(ms=900 * cheap_s)
    with caplog.at_level("WARNING", logger="aim.budget.select"):
        choice = selector.choose(budget, [spec])
    assert choice.point == "cheap" and "until this machine's prefill times are measured" in caplog.text
    selector.load.observe(cheap_s / 8, cheap_s)  # measured: eight times as fast as predicted
    assert selector.load.factor == pytest.approx(1 / 8)
    assert selector.choose(budget, [spec]).point == "dear"
    with pytest.raises(ValueError, match="below the cheapest"):  # measured now: a budget too small is refused
        selector.choose(Budget(ms=0.1 * 1000 * cheap_s), [spec])


def test_load_tracker_has_a_dead_band():
    tracker = LoadTracker(alpha=0.5, band=0.25, warmup=2)
    tracker.observe(1.3, 1.0)  # the first measurements set the factor to their mean
    assert tracker.factor == pytest.approx(1.3)
    tracker.observe(0.7, 1.0)
    assert tracker.factor == pytest.approx(1.0)
    tracker.observe(1.2, 1.0)  # average 1.1: inside the band, the factor stays
    assert tracker.factor == 1.0
    tracker.observe(2.0, 1.0)  # average 1.55: outside
    assert tracker.factor == pytest.approx(1.55)


def test_profile_round_trip_and_other_model(profile, tiny_video, tmp_path):
    model, _ = tiny_video
    path = profile.save(tmp_path / "p.json")
    loaded = Profile.load(path)
    assert loaded == profile
    # a version-1 profile (before per-point latency scales) reads with scale 1.0
    import json
    old = json.loads(path.read_text())
    old["version"] = 1
    for point in old["points"]:
        del point["latency_scale"]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert all(p.latency_scale == 1.0 for p in Profile.load(tmp_path / "v1.json").points)
    # a frontier stored by an older version (raw fidelity; agreement first) is recomputed; this version's is kept
    stale = json.loads(path.read_text())
    stale["frontier_names"] = [stale["points"][0]["name"]]
    assert [p.name for p in pareto_frontier(profile.points)] != stale["frontier_names"]
    recomputed = [p.name for p in pareto_frontier(profile.points)]
    for version, expected in ((2, recomputed), (3, recomputed), (4, stale["frontier_names"])):
        stale["version"] = version
        (tmp_path / "stale.json").write_text(json.dumps(stale))
        assert Profile.load(tmp_path / "stale.json").frontier_names == expected
    old["version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="version 99"):
        Profile.load(tmp_path / "v99.json")
    other = build_tiny_model("llava_onevision", num_layers=2, seed=0)
    with pytest.raises(ValueError, match="another model"):
        apply_aim(other, budget=0.5, profile=path)
    with pytest.raises(ValueError, match="aim calibrate"):
        apply_aim(other, budget=0.5)  # no profile beside an in-memory model
    assert not hasattr(other, "_aim") or other._aim is None
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        Profile.load(tmp_path / "bad.json")


def test_a_profile_fits_the_same_model_loaded_in_another_dtype(profile, tmp_path):
    """The fingerprint names the model, not how it was loaded: the same weights in bfloat16 (how
    GPUs and lmms-eval load checkpoints) use a profile calibrated in float32; a profile written
    before that rule (a sub-config's dtype hashed) is still read; another model is refused."""
    build_tiny_model("llava_onevision", num_layers=4, seed=0).save_pretrained(tmp_path / "model")
    loaded = {dtype: AutoModelForImageTextToText.from_pretrained(tmp_path / "model", dtype=dtype)
              for dtype in (torch.float32, torch.bfloat16)}
    assert loaded[torch.bfloat16].config.get_text_config().dtype == torch.bfloat16  # what the old hash counted
    fingerprints = {dtype: model_fingerprint(m.config) for dtype, m in loaded.items()}
    assert fingerprints[torch.float32] == fingerprints[torch.bfloat16]
    assert model_fingerprint(loaded[torch.bfloat16].config, legacy=True) != model_fingerprint(loaded[torch.float32].config, legacy=True)
    calibrated = Profile(fingerprints[torch.float32], "test", profile.points, profile.latency)
    written_before = Profile(model_fingerprint(loaded[torch.float32].config, legacy=True), "test", profile.points, profile.latency)
    from_disk = AutoConfig.from_pretrained(tmp_path / "model")  # before the weights load: sub-config dtypes None
    for config in (*(m.config for m in loaded.values()), from_disk):
        calibrated.check_model(config)
        written_before.check_model(config)
    # a model that differs only inside a sub-config, or in depth, is another model for both
    other_rope = AutoConfig.from_pretrained(tmp_path / "model")
    other_rope.text_config.rope_parameters = {**other_rope.text_config.rope_parameters, "rope_theta": 1234.0}
    other_depth = build_tiny_model("llava_onevision", num_layers=2, seed=0).config
    for other in (other_rope, other_depth):
        for made in (calibrated, written_before):
            with pytest.raises(ValueError, match="another model"):
                made.check_model(other)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(), "exactly one"), (dict(flops=0.0), "fraction"), (dict(flops=1.5), "fraction"),
     (dict(ms=-1), "milliseconds"), (dict(flops=0.5, ms=10), "exactly one")],
)
def test_bad_budgets_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def test_calibrate_command_on_a_saved_model(tmp_path, capsys):
    from aim.cli import main

    model = build_tiny_model("llava_onevision", num_layers=4, seed=0)
    model.save_pretrained(tmp_path / "m")
    inputs = [make_inputs(model, kind="video", num_frames=2, text_lengths=(5 + i,), seed=i) for i in range(4)]
    torch.save([dict(x) for x in inputs], tmp_path / "inputs.pt")
    assert main(["calibrate", str(tmp_path / "m"), "--data", str(tmp_path / "inputs.pt")]) == 0
    printed = capsys.readouterr().out
    assert "frontier setting" in printed and "Latency model" in printed
    profile = Profile.load(tmp_path / "m" / "aim_profile.json")
    assert len(profile.points) > 10 and profile.frontier
    loaded = type(model).from_pretrained(tmp_path / "m")
    apply_aim(loaded, budget=0.5)  # finds the profile beside the weights
    with torch.no_grad():
        loaded(**inputs[0])
    assert last_stats(loaded).budget["predicted_flops_fraction"] <= 0.5
    with pytest.raises(SystemExit):  # not a study model, no --data: a usage error
        main(["calibrate", str(tmp_path / "m")])
    assert "--data" in capsys.readouterr().err
    # --show prints the saved profile's frontier, in its order, and calibrates nothing
    (tmp_path / "m" / "aim_profile.json").rename(tmp_path / "elsewhere.json")
    assert main(["calibrate", str(tmp_path / "m"), "--show", str(tmp_path / "elsewhere.json")]) == 0
    rows = capsys.readouterr().out.split("frontier setting")[1].split("Latency model")[0].split("\n")[1:]
    assert [row.rsplit("%", 4)[0].rsplit(None, 1)[0].strip() for row in rows if row.strip()] == profile.frontier_names
    assert not (tmp_path / "m" / "aim_profile.json").exists()
    with pytest.raises(SystemExit):
        main(["calibrate", str(tmp_path / "m"), "--show"])
    assert "no AIM profile" in capsys.readouterr().err
