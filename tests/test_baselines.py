"""The token-reduction baselines (random dropping, uniform pooling, EVS, FastV ranking, random
ranking): hand-checked small cases, a dense reference, and the engine running them with the
same bookkeeping as AIM (counts equal the FLOPs model's, removal equals masking)."""

import pytest
import torch

from aim import AIMConfig, apply_aim, last_stats, remove_aim
from aim import flops as F
from aim.baselines import evs_kept_tokens, evs_retention, group_size_after_merge, last_token_importance, reduce_groups
from aim.tiny import build_tiny_model, make_inputs
from aim.visualize import record_kept_tokens


def test_pool_averages_square_regions_hand_checked():
    grid = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # 4x4 grid, value = position
    pooled = reduce_groups(grid, (0.5, 0.25), "pool")
    # 2x2 regions of a 4x4 grid: means of {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
    assert pooled.features.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pooled.index.tolist() == [[0, 2, 8, 10]]  # each region's top-left token
    assert pooled.sizes.tolist() == [[4.0, 4.0, 4.0, 4.0]]
    assert group_size_after_merge(16, (0.5, 0.25), "pool") == 4
    assert group_size_after_merge(64, (0.5,), "pool") == 30  # 6 x 5, the grid closest to 32
    assert group_size_after_merge(64, (0.3,), "pool") == 20  # 19.2 tokens: 4 x 5
    pooled = reduce_groups(grid, (0.375,), "pool")  # 6 of 16: 2 x 3, regions of 2 rows x 1-2 columns
    assert pooled.index.tolist() == [[0, 1, 2, 8, 9, 10]]
    assert pooled.sizes.tolist() == [[4.0, 4.0, 4.0, 4.0, 4.0, 4.0]]
    assert pooled.features.flatten().tolist() == [2.5, 3.5, 4.5, 10.5, 11.5, 12.5]


def test_pool_refuses_non_square_groups():
    with pytest.raises(ValueError, match="square per-frame token grids"):
        reduce_groups(torch.randn(1, 12, 4), (0.5,), "pool")


def test_random_drop_keeps_original_tokens_in_order_and_is_seeded():
    features = torch.randn(3, 10, 4)
    first = reduce_groups(features, (0.5, 0.3), "random", torch.Generator().manual_seed(1))
    again = reduce_groups(features, (0.5, 0.3), "random", torch.Generator().manual_seed(1))
    other = reduce_groups(features, (0.5, 0.3), "random", torch.Generator().manual_seed(2))
    assert first.index.shape == (3, 3) and group_size_after_merge(10, (0.5, 0.3), "random") == 3
    assert torch.equal(first.index, again.index) and not torch.equal(first.index, other.index)
    assert bool((first.index.diff(dim=1) > 0).all())  # original order
    torch.testing.assert_close(first.features, features.gather(1, first.index.unsqueeze(-1).expand(-1, -1, 4)))


def test_evs_keeps_the_first_frame_and_the_tokens_that_changed():
    torch.manual_seed(0)
    frames = torch.randn(4, 6, 8)
    frames[1] = frames[0]  # frame 1 repeats frame 0 exactly
    frames[2, :3] = frames[1, :3] * 2.0  # same direction: cosine 1, nothing new
    frames[3, 5] = -frames[2, 5]  # the most changed token there is
    stays = evs_retention(frames, 0.5)
    assert int(stays.sum()) == evs_kept_tokens(6, 4, 0.5) == 12
    assert bool(stays[0].all())  # the first frame whole
    assert not bool(stays[1].any()) and not bool(stays[2, :3].any())
    assert bool(stays[3, 5])
    # at least one whole frame, whatever the rate; everything at keep 1.0
    assert int(evs_retention(frames, 0.01).sum()) == 6 == evs_kept_tokens(6, 4, 0.01)
    assert bool(evs_retention(frames, 1.0).all())


def test_evs_in_the_engine_equals_the_unpatched_model_on_the_pruned_prompt(onevision):
    """EVS drops a video's repeated tokens before the LLM and the rest keep their positions: the
    unpatched model on the prompt without the dropped tokens (its own position ids) gives the same
    logits."""
    model, inputs = onevision
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"])
        features = getattr(out, "pooler_output", out)[0].reshape(-1, model.config.text_config.hidden_size)
        frames = inputs["pixel_values_videos"].shape[1]
        per_frame = (features.shape[0] - 1) // frames  # LLaVA-OneVision closes a video with a newline token
        stays = evs_retention(features[:-1].view(frames, per_frame, -1), 0.25).flatten()
        embeds = model.get_input_embeddings()(ids[None])
        placeholder = ids == model.config.video_token_index
        embeds[0, placeholder] = features.to(embeds.dtype)
        kept = torch.ones_like(ids, dtype=torch.bool)
        kept[placeholder] = torch.cat([stays, torch.ones(1, dtype=torch.bool)])
        positions = torch.arange(ids.shape[0])[kept][None]
        reference = model(inputs_embeds=embeds[:, kept], position_ids=positions,
                          attention_mask=torch.ones_like(positions)).logits[0, -1]
        apply_aim(model, merge_method="evs", merge_keep=0.25, prune=False)
        try:
            patched = model(**inputs).logits[0, -1]
            assert last_stats(model).visual_tokens_after_merge == [int(stays.sum()) + 1]
        finally:
            remove_aim(model)
    torch.testing.assert_close(patched, reference, rtol=1e-4, atol=1e-4)


def test_evs_is_refused_with_temporal_merging():
    with pytest.raises(ValueError, match="EVS prunes whole videos itself"):
        AIMConfig(merge_method="evs", temporal_keep=0.5)


def test_last_token_importance_matches_the_dense_formula():
    torch.manual_seed(0)
    batch, heads, kv_heads, n, dim = 2, 6, 2, 7, 8
    query, key = torch.randn(batch, heads, n, dim), torch.randn(batch, kv_heads, n, dim)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    got = last_token_importance(query, key, valid)
    for b in range(batch):
        rows = []
        for h in range(heads):
            k = key[b, h // (heads // kv_heads)][valid[b]]
            rows.append(torch.softmax(query[b, h, -1] @ k.T / dim**0.5, dim=-1))
        expected = torch.zeros(n)
        expected[valid[b]] = torch.stack(rows).mean(0)
        torch.testing.assert_close(got[b], expected)


BASELINES = [
    dict(merge_method="random", merge_keep=0.25, prune=False),
    dict(merge_method="pool", merge_keep=0.25, prune=False),
    dict(merge_schedule=(), prune_keep_ratios=(1.0, 1.0, 0.25, 0.25), prune_method="last_token"),
    dict(merge_schedule=(), prune_keep_ratios=(1.0, 0.5, 0.25, 0.25), prune_method="random"),
    dict(merge_method="pool", merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.5, 0.0), prune_method="last_token"),
    dict(merge_method="evs", merge_keep=0.25, prune=False),
    dict(merge_method="evs", merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.5, 0.0)),
]


@pytest.fixture(scope="module")
def onevision():
    model = build_tiny_model("llava_onevision", "sdpa", num_layers=4, seed=0)
    inputs = make_inputs(model, kind="video", num_frames=4, text_lengths=(10,))
    return model, inputs


@pytest.mark.parametrize("overrides", BASELINES, ids=lambda o: f"{o.get('merge_method', '-')}/{o.get('prune_method', '-')}")
def test_engine_runs_baselines_with_the_flops_models_counts(onevision, overrides):
    model, inputs = onevision
    config = AIMConfig(**overrides)
    spec = F.video_input(model.config, 4)
    described = F.video_input(model.config, 4, text_tokens=inputs["input_ids"].shape[1] - spec.visual_tokens)
    apply_aim(model, config)
    try:
        with torch.no_grad():
            removed = model(**inputs).logits[:, -1]
        stats = last_stats(model)
        apply_aim(model, config.replace(prune_mode="mask"))
        with torch.no_grad():
            masked = model(**inputs).logits[:, -1]
    finally:
        remove_aim(model)
    report = F.estimate(model.config, described, config)
    assert stats.visual_tokens_after_merge == [report.visual_tokens_in_llm]
    assert [row[0] for row in stats.tokens_per_layer] == report.tokens_per_layer
    # the same tokens are chosen whether removed or masked (seeded random choices included)
    torch.testing.assert_close(removed, masked, rtol=1e-4, atol=1e-4)


def test_seed_changes_random_choices(onevision):
    model, inputs = onevision
    outputs = []
    for seed in (0, 0, 1):
        apply_aim(model, merge_method="random", merge_keep=0.25, prune=False, seed=seed)
        try:
            with torch.no_grad(), record_kept_tokens(model):
                model(**inputs)
            outputs.append(last_stats(model).kept_visual_positions[0][1])
        finally:
            remove_aim(model)
    assert outputs[0] == outputs[1] != outputs[2]


@pytest.mark.parametrize("bad", [dict(merge_method="tome"), dict(prune_method="fastv"), dict(seed=1.5)])
def test_bad_baseline_names_are_clear_errors(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        AIMConfig(**bad)


def test_recorded_positions_follow_the_stages(onevision, tmp_path):
    model, inputs = onevision
    apply_aim(model, merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0))
    try:
        with torch.no_grad(), record_kept_tokens(model):
            model(**inputs)
        stats = last_stats(model)
        with torch.no_grad():
            model(**inputs)
        assert last_stats(model).kept_visual_positions is None  # recording ends with the block
    finally:
        remove_aim(model)
    stages = stats.kept_visual_positions
    assert [stage for stage, _ in stages] == ["merge", 1, 2, 3]
    counts = [len(positions[0]) for _, positions in stages]
    assert counts == [stats.visual_tokens_after_merge[0]] + [v[0] for v in stats.visual_tokens_per_layer[1:]]
    for (_, before), (_, after) in zip(stages, stages[1:]):
        assert set(after[0]) <= set(before[0])  # pruning only removes
    in_frames = {p for group in stats.visual_groups[0] for p in group}
    assert len(stats.visual_groups[0]) == 4 and set(stages[0][1][0]) - in_frames == {max(set(stages[0][1][0]) - in_frames)}

    from aim.visualize import kept_grids, render_kept_tokens

    labels, kept = kept_grids(stats)
    assert labels == ["input", "merged", "layer 1", "layer 2", "layer 3"]
    assert kept.shape[:2] == (5, 4) and kept[0].all() and not kept[-1].any()
    # the video newline is a visual token in no frame: drawn nowhere
    assert [int(k.sum()) for k in kept[1:]] == [len(set(p[0]) & in_frames) for _, p in stages]
    side = kept.shape[2]
    frames = torch.rand(4, side * 4, side * 4, 3).numpy()
    out = render_kept_tokens(stats, frames, tmp_path / "kept.png", max_stages=4)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
