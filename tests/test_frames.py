"""Fewer frames through the vision tower (``frame_keep``): which frames, the unpatched model on the
shorter video as the reference, physical == masking, generate == recomputation, analytic == counted
FLOPs (LLM and vision tower), and clear errors where it is not available."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aim import AIMConfig, apply_aim, last_stats, remove_aim
from aim import flops as F
from aim.counts import kept_frames
from aim.tiny import make_inputs
from test_flops import FLOP_MAP, _described, counted_decoder_flops, rel
from test_models import logits, tiny

FAMILIES = ["llava_onevision", "llava_next_video"]
ONLY_FRAMES = dict(frame_keep=0.5, merge_schedule=(), prune=False)
WITH_AIM = dict(frame_keep=0.5, merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0))


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 7, 8, 16, 32])
@pytest.mark.parametrize("keep", [0.05, 0.25, 0.5, 0.75, 1.0])
def test_kept_frames_are_evenly_spaced_from_first_to_last(frames, keep):
    kept = kept_frames(frames, keep)
    assert len(kept) == max(1, int(frames * keep + 0.5))  # round half up, at least one frame
    assert kept == sorted(set(kept)) and kept[0] == 0 and all(0 <= k < frames for k in kept)
    if len(kept) > 1:
        assert kept[-1] == frames - 1
        gaps = [b - a for a, b in zip(kept, kept[1:])]
        assert max(gaps) - min(gaps) <= 1  # as even as whole frames allow
    if keep == 1.0:
        assert kept == list(range(frames))


def _shorter_video(model, inputs, sample: int, keep: float) -> dict:
    """Sample `sample` of `inputs` with only its kept frames: fewer pixels and fewer placeholders,
    no padding; what a user would give the unpatched model."""
    valid = inputs["attention_mask"][sample].bool()
    ids = inputs["input_ids"][sample][valid]
    pixels = inputs["pixel_values_videos"][sample : sample + 1]
    frames = pixels.shape[1]
    kept = kept_frames(frames, keep)
    placeholders = (ids == model.config.video_token_id).nonzero().flatten()
    markers = 1 if model.config.model_type == "llava_onevision" else 0
    per_frame = (placeholders.numel() - markers) // frames
    stays = torch.ones_like(ids, dtype=torch.bool)
    for frame in set(range(frames)) - set(kept):
        stays[placeholders[frame * per_frame : (frame + 1) * per_frame]] = False
    return {"input_ids": ids[stays][None], "attention_mask": torch.ones_like(ids[stays])[None],
            "pixel_values_videos": pixels[:, kept]}


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_the_unpatched_model_on_the_shorter_video(family):
    """With contiguous positions and nothing else, the patched model on the full video is the
    unpatched model given only the kept frames (exact up to float summation order)."""
    model = tiny(family)
    inputs = make_inputs(model, kind="video", batch_size=2, text_lengths=(4, 9), num_frames=4)
    references = [logits(model, _shorter_video(model, inputs, i, 0.5))[0, -1] for i in range(2)]
    apply_aim(model, merged_positions="contiguous", **ONLY_FRAMES)
    patched = logits(model, inputs)[:, -1]
    torch.testing.assert_close(patched, torch.stack(references), rtol=1e-5, atol=1e-5)
    stats = last_stats(model)
    placeholders = [int(n) for n in (inputs["input_ids"] == model.config.video_token_id).sum(1)]
    frame_tokens = (placeholders[0] - (family == "llava_onevision")) // 4
    # the vision tower produced the tokens of 2 frames of 4; nothing was merged
    assert stats.visual_tokens_before_merge == placeholders
    assert stats.visual_tokens_encoded == stats.visual_tokens_after_merge == [n - 2 * frame_tokens for n in placeholders]
    # destination positions (the default): the kept frames keep their own positions, a different answer
    apply_aim(model, **ONLY_FRAMES)
    assert not torch.allclose(logits(model, inputs)[:, -1], patched)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vision_tower_encodes_only_the_kept_frames(family):
    model = tiny(family)
    inputs = make_inputs(model, kind="video", batch_size=2, num_frames=8)
    seen = []
    hook = model.model.vision_tower.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        apply_aim(model, frame_keep=0.25)
        logits(model, inputs)
        logits(model, inputs, aim_config=dict(frame_keep=1.0))
    finally:
        hook.remove()
    assert seen == [2 * len(kept_frames(8, 0.25)), 2 * 8]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_frames_or_disabled_is_bit_identical(family):
    model = tiny(family)
    inputs = make_inputs(model, kind="video", batch_size=2, text_lengths=(4, 9), num_frames=4)
    base = logits(model, inputs)
    apply_aim(model, frame_keep=1.0, merge_schedule=(), prune=False)
    assert torch.equal(logits(model, inputs), base)
    apply_aim(model, frame_keep=0.5, enabled=False)
    assert torch.equal(logits(model, inputs), base)
    # a call's own config decides, also for the frames encoded
    apply_aim(model, **ONLY_FRAMES)
    assert torch.equal(logits(model, inputs, aim_config=dict(enabled=False)), base)
    assert not torch.allclose(logits(model, inputs)[:, -1], base[:, -1])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_physical_removal_matches_masking_reference(family, attn):
    model = tiny(family, attn)
    inputs = make_inputs(model, kind="video", batch_size=2, text_lengths=(4, 9), num_frames=4)
    apply_aim(model, prune_mode="mask", temporal_keep=0.5, **WITH_AIM)
    masked = logits(model, inputs)
    masked_stats = last_stats(model)
    apply_aim(model, prune_mode="remove", temporal_keep=0.5, **WITH_AIM)
    removed = logits(model, inputs)
    stats = last_stats(model)
    torch.testing.assert_close(removed[:, -1], masked[:, -1], rtol=1e-4, atol=1e-4)
    assert stats.tokens_per_layer == masked_stats.tokens_per_layer
    assert stats.visual_tokens_after_merge[0] < stats.visual_tokens_before_merge[0] / 2  # half the frames, then merging


@pytest.mark.parametrize("per_call, batch", [(False, 1), (True, 1), (False, 2)])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_recomputation(family, per_call, batch):
    """generate() encodes the video before its first forward (transformers >= 5.24): the frames
    it encodes follow the generation's own config too; a padded batch as well."""
    model = tiny(family)
    inputs = make_inputs(model, kind="video", batch_size=batch, text_lengths=(5, 9)[:batch], num_frames=4)
    config = dict(WITH_AIM, prune_action="merge")
    if per_call:
        apply_aim(model, enabled=False)
        options = dict(aim_config=config)
    else:
        apply_aim(model, **config)
        options = {}
    special = list(range(8))
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                   suppress_tokens=special, **options)
    prompt_len = inputs["input_ids"].shape[1]
    steps = dict(inputs)
    for _ in range(6):  # no cache: the whole prompt again at every step
        with torch.no_grad():
            step = model(**steps, use_cache=False, **options).logits[:, -1]
        step[:, special] = float("-inf")
        steps["input_ids"] = torch.cat([steps["input_ids"], step.argmax(-1, keepdim=True)], 1)
        steps["attention_mask"] = torch.cat([steps["attention_mask"], torch.ones_like(steps["attention_mask"][:, :1])], 1)
    assert generated[:, prompt_len:].tolist() == steps["input_ids"][:, prompt_len:].tolist()


@pytest.mark.parametrize("temporal_keep", [1.0, 0.5])
def test_analytic_llm_and_vision_flops_match_the_counted(temporal_keep):
    family = "llava_onevision"
    model = tiny(family)
    inputs = make_inputs(model, kind="video", num_frames=4, text_lengths=(10,))
    described = _described(family, model, inputs)
    config = AIMConfig(frame_keep=0.5, temporal_keep=temporal_keep, merge_keep=0.5, prune_start=1, prune_step=0.25)
    apply_aim(model, config)
    try:
        counted_llm = counted_decoder_flops(model, inputs)
        stats = last_stats(model)
        counter = FlopCounterMode(display=False, custom_mapping=FLOP_MAP)
        with torch.no_grad(), counter:
            model(**inputs)
    finally:
        remove_aim(model)
    report = F.estimate(model.config, described, config, dtype="float32")
    assert stats.visual_tokens_after_merge == [report.visual_tokens_in_llm]
    assert [row[0] for row in stats.tokens_per_layer] == report.tokens_per_layer
    assert rel(report.prefill_flops, counted_llm) < 0.02
    tower = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                if re.search(r"\.model\.(vision_tower|multi_modal_projector)$", name))
    assert rel(report.vision_flops, tower) < 0.02
    assert report.vision_flops < 0.6 * F.vision_flops(model.config, described)  # 2 of 4 frames


def test_not_available_where_frames_are_encoded_in_pairs():
    model = tiny("qwen2_vl")
    with pytest.raises(ValueError, match=r"frame_keep=0.5 .*llava_next_video.*llava_onevision.*not 'qwen2_vl'"):
        apply_aim(model, frame_keep=0.5)
    apply_aim(model, enabled=True)
    inputs = make_inputs(model, kind="video", num_frames=4)
    with pytest.raises(ValueError, match="frame_keep"):
        logits(model, inputs, aim_config=dict(frame_keep=0.5))
    with pytest.raises(ValueError, match="frame_keep"):
        F.estimate(model.config, _described("qwen2_vl", model, inputs), AIMConfig(frame_keep=0.5))


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_bad_frame_keep_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"frame_keep .* in \(0, 1\]"):
        AIMConfig(frame_keep=value)


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_function_called_on_its_own_encodes_every_frame(family):
    """Outside a forward or a generation no engine removes the frames not encoded, so a direct
    call (feature extraction, features given later as mm_encoder_outputs) encodes them all."""
    model = tiny(family)
    inputs = make_inputs(model, kind="video", batch_size=1, num_frames=4)
    config = model.config
    args = dict(pixel_values_videos=inputs["pixel_values_videos"], vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy)
    with torch.no_grad():
        full = model.model.get_video_features(**args).pooler_output
        apply_aim(model, frame_keep=0.5)
        patched = model.model.get_video_features(**args).pooler_output
    assert torch.equal(patched, full)


def test_features_without_pooler_output_are_a_clear_error():
    model = tiny("llava_onevision")
    inputs = make_inputs(model, kind="video", batch_size=1, num_frames=4)
    apply_aim(model, frame_keep=0.5)
    original = model.model.get_video_features.original
    with pytest.raises(ValueError, match="pooler_output"):
        from aim.frames import encode_kept_frames
        import inspect
        call = inspect.signature(original).bind_partial(pixel_values_videos=inputs["pixel_values_videos"])
        encode_kept_frames(lambda **kw: (original(**kw).pooler_output,), (), dict(call.arguments), call, 0.5, 1)
