"""Latency budgets and the vision tower: a budgeted prefill's measured time includes the encoding
generate() runs before its first forward, and when no calibrated setting fits whole videos under the
load measured now, fewer frames are encoded (and whole videos again once the load ends). Time comes
from an injected clock that the vision tower and the LLM advance: no sleeps, no timing."""

from __future__ import annotations

import pytest
import torch

from aim import AIMConfig, apply_aim, last_stats, remove_aim
from aim.budget import LatencyModel, Profile, model_fingerprint
from aim.budget.inputs import FRAME_KEEPS, video_prompt_specs
from aim.counts import kept_frames
from aim.patch import _controller_of
from aim.tiny import build_tiny_model, make_inputs
from test_budget import _point

FRAMES = 8
SECONDS_PER_FRAME = 0.01  # the fake vision tower's time per frame encoded
LLM_SECONDS = 0.002  # the fake LLM's time per prefill


@pytest.fixture()
def timed_model():
    """A tiny LLaVA-OneVision with a two-point profile whose latency model is mostly the vision tower
    (1 ms per visual token encoded: 16 tokens a frame) and a clock the model's own modules advance."""
    model = build_tiny_model("llava_onevision", num_layers=4, seed=0)
    cheap = _point("cheap", 0.5, 1.0, 0.3, AIMConfig(merge_keep=0.05, prune_keep_ratios=(1.0, 0.0, 0.0, 0.0)))
    dear = _point("dear", 0.9, 0.1, 0.7, AIMConfig(merge_keep=0.5, prune=False))
    latency = LatencyModel(constant=LLM_SECONDS, per_visual_token=SECONDS_PER_FRAME / 16)
    profile = Profile(model_fingerprint(model.config), "test", [cheap, dear], latency)
    now = [0.0]
    seen_frames = []

    def vision(module, args):
        seen_frames.append(args[0].shape[0])
        now[0] += SECONDS_PER_FRAME * args[0].shape[0]

    def llm(module, args, kwargs):
        now[0] += LLM_SECONDS

    hooks = [model.model.vision_tower.register_forward_pre_hook(vision),
             model.model.language_model.register_forward_pre_hook(llm, with_kwargs=True)]
    apply_aim(model, profile=profile)
    _controller_of(model).selector.clock = lambda: now[0]
    inputs = make_inputs(model, kind="video", num_frames=FRAMES, text_lengths=(6,))
    yield model, inputs, seen_frames
    for hook in hooks:
        hook.remove()
    remove_aim(model)


def _prefill(model, inputs, generate: bool, **budget):
    with torch.no_grad():
        if generate:
            model.generate(**inputs, max_new_tokens=1, do_sample=False, **budget)
        else:
            model(**inputs, **budget)
    return last_stats(model).budget


@pytest.mark.parametrize("generate", [False, True])
def test_measured_time_includes_the_vision_tower(timed_model, generate):
    """generate() encodes the video before the forward that places it (transformers >= 5.24): the
    prefill's measured time must still include it, as the latency model's prediction does."""
    model, inputs, _ = timed_model
    chosen = _prefill(model, inputs, generate, aim_budget_ms=10_000)
    assert chosen["measured_seconds"] == pytest.approx(FRAMES * SECONDS_PER_FRAME + LLM_SECONDS)
    assert chosen["point"] == "dear" and chosen["frame_keep"] == 1.0


@pytest.mark.parametrize("generate", [False, True])
def test_fewer_frames_under_load_and_whole_videos_after(timed_model, generate, caplog):
    model, inputs, seen = timed_model
    selector = _controller_of(model).selector
    specs = video_prompt_specs(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id,
                               model.config.video_token_id, 1, FRAMES, 1)
    cheap = next(p for p in selector.profile.points if p.name == "cheap")
    whole_ms = 1000 * selector.predict(cheap, specs[1.0][0])[1]
    half_ms = 1000 * selector.predict(cheap, specs[0.5][0])[1]
    assert half_ms < 0.6 * whole_ms  # the vision tower is most of it
    budget = dict(aim_budget_ms=1.3 * whole_ms, aim_budget_quantile=0.5)
    for _ in range(5):  # quiet: this machine runs at the profile's speed
        chosen = _prefill(model, inputs, generate, **budget)
        assert chosen["frame_keep"] == 1.0 and seen[-1] == FRAMES
    for _ in range(2):  # load: prefills take 2.2x the prediction; the cheap point no longer fits whole videos
        selector.load.observe(2.2, 1.0)
    assert 2.2 * whole_ms > budget["aim_budget_ms"] >= 2.2 * half_ms
    with caplog.at_level("WARNING", logger="aim.patch.wrappers"):
        chosen = _prefill(model, inputs, generate, **budget)
    assert "encoding 0.5 of each video's frames" in caplog.text
    assert seen[-1] == len(kept_frames(FRAMES, 0.5)) and chosen["frame_keep"] == 0.5
    # a profile point's name (frame_keep says how many frames ran): this latency model charges the
    # vision tower and a constant only, so on half the frames the most faithful point fits
    assert chosen["point"] == "dear"
    assert chosen["measured_seconds"] == pytest.approx(4 * SECONDS_PER_FRAME + LLM_SECONDS)
    assert last_stats(model).visual_tokens_after_merge[0] < 4 * 16 + 1
    for _ in range(20):  # the load ends
        selector.load.observe(1.0, 1.0)
    chosen = _prefill(model, inputs, generate, **budget)
    assert chosen["frame_keep"] == 1.0 and seen[-1] == FRAMES


def test_flops_budgets_and_explicit_configs_encode_what_they_say(timed_model):
    model, inputs, seen = timed_model
    selector = _controller_of(model).selector
    for _ in range(7):
        selector.load.observe(5.0, 1.0)  # heavy load: irrelevant to FLOPs budgets
    with pytest.raises(ValueError, match="below the cheapest"):
        _prefill(model, inputs, False, aim_budget=0.01)  # LLM FLOPs: fewer frames are no way out
    assert seen[-1] == FRAMES
    assert _prefill(model, inputs, False, aim_budget=0.5)["frame_keep"] == 1.0 and seen[-1] == FRAMES
    with torch.no_grad():
        model(**inputs, aim_config=dict(frame_keep=0.25))
    assert seen[-1] == len(kept_frames(FRAMES, 0.25)) and last_stats(model).budget is None


def test_prompt_specs_before_the_vision_tower_match_the_layout_after(timed_model):
    """The counts the frames choice works from equal those the setting's choice reads from the
    layout once the frames are encoded (images aside)."""
    model, inputs, _ = timed_model
    for keep in FRAME_KEEPS:
        specs = video_prompt_specs(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id,
                                   model.config.video_token_id, 1, FRAMES, 1, keeps=(keep,))
        with torch.no_grad():
            model(**inputs, aim_config=dict(frame_keep=keep, merge_schedule=(), prune=False))
        stats = last_stats(model)
        assert specs[keep][0].visual_tokens == stats.visual_tokens_after_merge[0]
        assert specs[keep][0].total_tokens == stats.tokens_per_layer[0][0]
    assert video_prompt_specs(inputs["input_ids"], None, None, model.config.video_token_id, 1, 3, 1) is None  # 8 frames, not 3


def test_prompt_specs_count_images_as_mergeable_and_skip_keeps_that_drop_nothing():
    """An image beside the video counts as one merge group (its crops are not known before the
    tower: the estimate errs cheap, so frames drop only when even that does not fit); fractions
    keeping as many frames as a larger one are left out; padding is not text."""
    image, video, pad = 3, 4, 0
    row = [9] * 5 + [image] * 10 + [video] * (2 * 16 + 1) + [9] * 4
    ids = torch.tensor([[pad] * 3 + row, [pad] * (len(row) + 3 - 36) + [9] * 3 + [video] * 33])
    mask = (ids != pad).long()
    specs = video_prompt_specs(ids, mask, image, video, videos=2, frames=2, markers=1)
    assert sorted(specs) == [0.5, 1.0]  # 0.25 of 2 frames keeps 1 frame, as 0.5 does
    whole, half = specs[1.0], specs[0.5]
    assert whole[0].visual_groups == (16, 16, 10) and whole[0].videos == (2,) and whole[0].marker_tokens == 1
    assert whole[0].text_tokens == 9 and whole[1].text_tokens == 3
    assert half[0].visual_groups == (16, 10) and half[1].visual_groups == (16,) and half[1].videos == (1,)


def test_calibration_tells_the_vision_tower_from_the_constant(monkeypatch):
    """Every calibration input holds the same number of visual tokens, so the latency model can
    only learn the vision tower's time per visual token from timings with fewer frames, which
    calibration adds for families that can encode fewer frames. With a fake clock (vision tower
    10 ms a frame, LLM 2 ms whatever its tokens), the fitted model predicts 1 frame as well as 4."""
    import types

    from aim.budget import Candidate, calibrate
    from aim.budget import calibration

    model = build_tiny_model("llava_onevision", num_layers=4, seed=0)
    now = [0.0]
    hooks = [model.model.vision_tower.register_forward_pre_hook(
                 lambda module, args: now.__setitem__(0, now[0] + SECONDS_PER_FRAME * args[0].shape[0])),
             model.model.language_model.register_forward_pre_hook(
                 lambda module, args: now.__setitem__(0, now[0] + LLM_SECONDS))]
    monkeypatch.setattr(calibration, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    inputs = [make_inputs(model, kind="video", num_frames=4, text_lengths=(6 + i,), seed=i) for i in range(3)]
    try:
        profile = calibrate(model, inputs, candidates=[Candidate("merge 0.5", AIMConfig(merge_keep=0.5, prune=False))],
                            progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = [30] * 4  # the LLM's tokens do not matter to this clock
    for frames in (4, 2, 1):
        visual = 16 * frames + 1  # 4x4 pooled tokens a frame + the video newline
        assert profile.latency.predict(tokens, visual) == pytest.approx(frames * SECONDS_PER_FRAME + LLM_SECONDS, rel=0.02)
