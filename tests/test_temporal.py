"""Temporal merging (before the LLM) and merge-instead-of-drop (inside it): sizes, order,
positions, identity settings, and the physical == masking reference on the real model classes."""

from __future__ import annotations

import pytest
import torch

from aim import AIMConfig, apply_aim, last_stats
from aim.counts import group_size_after_merge, temporal_frame_sizes
from aim.layout import VisualLayout
from aim.reduce import merge_before_llm, merge_pruned
from aim.temporal import merge_into, temporal_destinations, temporal_matches
from aim.tiny import make_inputs
from aim.tokens import TokenSet
from test_models import logits, tiny  # the shared tiny models (4 layers, seed 0)

VIDEO_FAMILIES = ["llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
TEMPORAL = dict(temporal_keep=0.5, merge_keep=0.5, prune=False)
BOTH = dict(temporal_keep=0.5, merge_keep=0.5, prune=True, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0), prune_action="merge")

def _video(frames: int, n: int, dim: int, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """A video whose frames repeat the first with noise, plus one token per frame that is new."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dim, generator=g)
    video = base.expand(frames, n, dim) + noise * torch.randn(frames, n, dim, generator=g)
    video[:, 0] = torch.randn(frames, dim, generator=g)  # an object that changes every frame
    return video


def _brute_force_matches(frames: torch.Tensor, window: int):
    count, n, _ = frames.shape
    unit = torch.nn.functional.normalize(frames.flatten(0, 1).float(), dim=-1)
    sim = unit @ unit.T
    frame = torch.arange(count).repeat_interleave(n)
    score, target = torch.full((count * n,), float("-inf")), torch.arange(count * n)
    for i in range(n, count * n):
        allowed = (frame < frame[i]) & (frame >= frame[i] - window)
        # nearer frames win ties: search from the nearest earlier frame back
        best = None
        for offset in range(1, window + 1):
            cand = (frame == frame[i] - offset).nonzero().flatten()
            if cand.numel() == 0:
                continue
            j = cand[sim[i, cand].argmax()]
            if best is None or sim[i, j] > sim[i, best]:
                best = j
        assert allowed[best]
        score[i], target[i] = sim[i, best], best
    return score.view(count, n), target.view(count, n)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_matches_equal_brute_force(window):
    frames = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(window))
    score, target = temporal_matches(frames, window)
    ref_score, ref_target = _brute_force_matches(frames, window)
    torch.testing.assert_close(score[1:], ref_score[1:])
    assert torch.equal(target, ref_target)


@pytest.mark.parametrize("keep, threshold", [(0.5, None), (0.25, None), (1.0, 0.9)])
def test_destinations_are_roots_in_earlier_frames_and_sizes_add_up(keep, threshold):
    frames = _video(6, 9, 8)
    dest = temporal_destinations(frames, keep=keep, threshold=threshold, window=2)
    count, n = 6, 9
    position = torch.arange(count * n)
    roots = dest == position
    assert bool(roots[:n].all())  # the first frame keeps everything
    assert bool((dest <= position).all())  # a token joins an earlier one (or itself)
    assert bool(roots[dest].all())  # every destination is a root: chains are resolved
    kept_per_frame = roots.view(count, n).sum(1).tolist()
    if threshold is None:
        assert kept_per_frame == temporal_frame_sizes([n] * count, keep)
    else:
        assert kept_per_frame[1:] == [1] * (count - 1)  # only the changing token is new in each frame
    values = frames.flatten(0, 1)
    merged, sizes = merge_into(values, torch.ones(count * n), dest)
    assert float(sizes[roots].sum()) == count * n
    for r in position[roots].tolist():  # a root holds the mean of its tree
        torch.testing.assert_close(merged[r], values[dest == r].mean(0))


def test_identity_settings_change_nothing():
    frames = _video(4, 5, 6)
    assert torch.equal(temporal_destinations(frames, keep=1.0), torch.arange(20))
    assert torch.equal(temporal_destinations(frames[:1], keep=0.1), torch.arange(5))
    assert AIMConfig(merge_schedule=(), prune=False, temporal_keep=1.0).is_identity(4)
    assert not AIMConfig(merge_schedule=(), prune=False, temporal_keep=0.5).is_identity(4)


def _token_set(video: torch.Tensor, text: int = 3, extras: bool = False):
    count, n, dim = video.shape
    hidden = torch.cat([torch.randn(1, text, dim), video.reshape(1, count * n, dim), torch.randn(1, text, dim)], 1)
    length = hidden.shape[1]
    visual = torch.zeros(1, length, dtype=torch.bool)
    visual[0, text : text + count * n] = True
    cos = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(1, length, 4)
    carry = torch.randn(1, length, 2 * dim) * visual.unsqueeze(-1) if extras else None
    tokens = TokenSet(hidden, cos, cos.clone(), torch.ones(1, length, dtype=torch.bool), visual, remove=True, extras=carry)
    groups = [torch.arange(text + t * n, text + (t + 1) * n) for t in range(count)]
    return tokens, VisualLayout(visual, [groups], [[list(range(count))]])


@pytest.mark.parametrize("method", ["bipartite", "random"])
def test_temporal_then_spatial_keeps_order_positions_and_sizes(method):
    video = _video(4, 16, 8)
    tokens, layout = _token_set(video, extras=True)
    before_hidden, before_extras = tokens.hidden.clone(), tokens.extras.clone()
    config = AIMConfig(temporal_keep=0.5, merge_keep=0.5, merge_method=method, prune=False)
    merge_before_llm(tokens, layout, config, torch.Generator().manual_seed(0))
    origin = tokens.origin[0]
    assert bool((origin[1:] > origin[:-1]).all())  # order kept
    torch.testing.assert_close(tokens.cos[0, :, 0], origin.float())  # each token keeps its own position
    visual = tokens.visual[0]
    expected = sum(group_size_after_merge(k, config.merge_schedule, method) for k in temporal_frame_sizes([16] * 4, 0.5))
    assert int(visual.sum()) == expected
    if method == "bipartite":  # merging loses no token: sizes add up to the video
        assert float(tokens.sizes[0, visual].sum()) == 4 * 16
    text = ~visual
    assert torch.equal(tokens.hidden[0, text], before_hidden[0, origin[text]])  # text untouched
    # the carried features (DeepStack) follow the same weights as the hidden states: their
    # relation to the hidden states is linear, so a carry equal to 2 x hidden stays 2 x hidden
    tokens2, layout2 = _token_set(video)
    tokens2.extras = torch.cat([2 * tokens2.hidden, tokens2.hidden], -1)
    merge_before_llm(tokens2, layout2, config, torch.Generator().manual_seed(0))
    torch.testing.assert_close(tokens2.extras[..., :8], 2 * tokens2.hidden)
    del before_extras


def test_merge_pruned_keeps_means_and_sizes():
    torch.manual_seed(0)
    tokens, _ = _token_set(torch.randn(1, 10, 6), text=2)
    tokens.sizes[0, 2:12] = torch.arange(1, 11, dtype=torch.float32)
    keep = tokens.valid.clone()
    keep[0, [3, 5, 6, 9, 10]] = False
    before, sizes = tokens.hidden.clone(), tokens.sizes.clone()
    merge_pruned(tokens, keep)
    stays = [2, 4, 7, 8, 11]
    total = sizes[0, 2:12].sum()
    assert float(tokens.sizes[0, stays].sum()) == float(total)
    unit = torch.nn.functional.normalize(before[0], dim=-1)
    for slot in stays:  # brute force: the members that chose this slot
        members = [slot] + [r for r in (3, 5, 6, 9, 10) if stays[int((unit[r] @ unit[stays].T).argmax())] == slot]
        w = sizes[0, members]
        torch.testing.assert_close(tokens.hidden[0, slot], (before[0, members] * w[:, None]).sum(0) / w.sum())
    tokens.keep(keep)
    assert tokens.visual.sum() == 5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_physical_removal_matches_masking_reference(family, attn):
    model = tiny(family, attn)
    inputs = make_inputs(model, kind="video", batch_size=2, text_lengths=(4, 9), num_frames=4)
    apply_aim(model, prune_mode="mask", **BOTH)
    masked = logits(model, inputs)
    masked_stats = last_stats(model)
    apply_aim(model, prune_mode="remove", **BOTH)
    removed = logits(model, inputs)
    stats = last_stats(model)
    torch.testing.assert_close(removed[:, -1], masked[:, -1], rtol=1e-4, atol=1e-4)
    assert stats.tokens_per_layer == masked_stats.tokens_per_layer
    assert stats.visual_tokens_after_merge[0] < stats.visual_tokens_before_merge[0]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_new_options_act_and_disabled_is_bit_identical(family):
    model = tiny(family)
    inputs = make_inputs(model, kind="video", batch_size=2, text_lengths=(4, 9), num_frames=4)
    base = logits(model, inputs)
    apply_aim(model, temporal_keep=1.0, merge_schedule=(), prune=False, prune_action="merge")
    assert torch.equal(logits(model, inputs), base)
    spatial_only = logits(model, inputs, aim_config=dict(merge_keep=0.5, prune=False))
    temporal = logits(model, inputs, aim_config=TEMPORAL)
    assert not torch.allclose(temporal[:, -1], spatial_only[:, -1])
    drop = logits(model, inputs, aim_config=dict(BOTH, prune_action="drop"))
    merged = logits(model, inputs, aim_config=BOTH)
    assert not torch.allclose(drop[:, -1], merged[:, -1])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_generate_with_cache_equals_recomputation(family):
    model = tiny(family)
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,), num_frames=4)
    apply_aim(model, **BOTH)
    special = list(range(8))
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=special)
    prompt_len = inputs["input_ids"].shape[1]
    steps = dict(inputs)
    for _ in range(6):  # no cache: the whole prompt again at every step
        with torch.no_grad():
            step = model(**steps, use_cache=False).logits[:, -1]
        step[:, special] = float("-inf")
        for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if name in steps:
                new = step.argmax(-1, keepdim=True) if name == "input_ids" else torch.full_like(steps[name][:, :1], name == "attention_mask")
                steps[name] = torch.cat([steps[name], new], 1)
    assert generated[:, prompt_len:].tolist() == steps["input_ids"][:, prompt_len:].tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temporal_keep=0.0), "temporal_keep"),
        (dict(temporal_keep=1.5), "temporal_keep"),
        (dict(temporal_threshold=2.0), "temporal_threshold"),
        (dict(temporal_threshold=0.9, temporal_keep=0.5), "not both"),
        (dict(temporal_window=0), "temporal_window"),
        (dict(temporal_keep=0.5, merge_method="pool"), "pooling"),
        (dict(prune_action="keep"), "prune_action"),
    ],
)
def test_bad_temporal_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AIMConfig(**kwargs)
