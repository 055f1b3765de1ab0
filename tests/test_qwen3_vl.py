"""Qwen3-VL and Qwen3-VL-MoE (aim/families/qwen3_vl.py) on tiny random-weight models.

The matrix of tests/test_models.py (disabled equals unpatched bit for bit, physical removal equals
the masking reference, generate with cache equals recomputation, a padded batch equals each prompt
alone) runs here on both classes, with video prompts laid out as Qwen3-VL's processor writes them:
each temporal slice after its timestamp text. Then what is Qwen3's own: DeepStack features follow
merging and pruning (references built by hand on the unpatched decoder), the ranking reads the
q/k RMSNorm outputs, and the timestamps between frames are never merged or pruned.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers

import aim.merge
from aim import AIMConfig, apply_aim, last_stats, remove_aim
from aim.config import visual_tokens_kept
from aim.families import family_for_model_type
from aim.families.base import IMAGE_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID
from aim.families.qwen3_vl import TIMESTAMP_TOKENS, TINY_DEEPSTACK_LAYERS
from aim.merge import merge_tokens
from aim.patch import recording_positions
from aim.prune import pagerank_importance_reference, select_tokens
from aim.tiny import build_tiny_model, make_inputs as tiny_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_models as matrix  # noqa: E402  (its tests are called, not collected, from here)

FAMILIES = [
    pytest.param(name, marks=pytest.mark.skipif(not hasattr(transformers, cls), reason=f"transformers has no {cls}"))
    for name, cls in (("qwen3_vl", "Qwen3VLForConditionalGeneration"),
                      ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"))
]
KINDS = ["image", "video"]
QWEN3 = "qwen3_vl"
needs_qwen3 = FAMILIES[0].marks[0]


# --- prompts as the Qwen3-VL processor writes them (Family.tiny_visual_span) ---------------------
make_inputs = tiny_inputs


def test_tiny_video_prompts_carry_a_timestamp_before_each_slice():
    model = build_tiny_model(QWEN3, num_layers=2, seed=0)
    inputs = make_inputs(model, kind="video", batch_size=2, text_lengths=(3, 6), num_frames=4)
    for ids, mask, (slices, _, _) in zip(inputs["input_ids"], inputs["attention_mask"], inputs["video_grid_thw"].tolist()):
        seq = ids[mask.bool()].tolist()
        assert seq.count(VISION_START_ID) == slices == seq.count(VISION_END_ID)
        assert torch.equal(inputs["mm_token_type_ids"][0] == 2, inputs["input_ids"][0] == VIDEO_ID)


@pytest.fixture
def qwen3_prompts(monkeypatch):
    """The tests of tests/test_models.py build their prompts with `make_inputs` above."""
    monkeypatch.setattr(matrix, "make_inputs", make_inputs)


# --- the matrix of tests/test_models.py ------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_off_is_bit_identical_and_remove_restores(family, kind, qwen3_prompts):
    matrix.test_off_is_bit_identical_and_remove_restores(family, kind)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_physical_removal_matches_masking_reference(family, kind, attn, qwen3_prompts):
    matrix.test_physical_removal_matches_masking_reference(family, kind, attn)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_lengths_and_cache_follow_the_schedule(family, kind, qwen3_prompts):
    matrix.test_layer_lengths_and_cache_follow_the_schedule(family, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_recomputation(family, kind, qwen3_prompts, monkeypatch):
    """With the random ranking (a fixed priority per prompt position). The reference recomputes the
    prefill with the generated tokens appended, and PageRank over causal attention gives earlier
    tokens mass from later ones: its choice of visual tokens may change as tokens are appended, and
    on these tiny Qwen3 models it does (near-ties), while the cached generation keeps the prompt's
    choice. The cache and position mechanics under test do not depend on the ranking."""
    monkeypatch.setattr(matrix, "PRUNING", dict(matrix.PRUNING, prune_method="random"))
    matrix.test_generate_with_cache_equals_recomputation(family, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_each_prompt_alone(family, kind, qwen3_prompts):
    matrix.test_padded_batch_equals_each_prompt_alone(family, kind)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_decoding_step_runs_on_the_cache_it_was_given(family, qwen3_prompts, caplog):
    matrix.test_every_decoding_step_runs_on_the_cache_it_was_given(family, "video", caplog)


# --- references built by hand on the unpatched model -----------------------------------------
def unpatched_parts(model, inputs: dict):
    """What Qwen3VLModel.forward gives its text decoder, computed on the unpatched model (batch of
    one): inputs_embeds with the visual features placed, the visual mask, the DeepStack features
    per layer (rows in placeholder order) and the (3, 1, seq) M-RoPE positions."""
    mm = model.model
    ids = inputs["input_ids"]
    video = "pixel_values_videos" in inputs
    pixels = inputs["pixel_values_videos" if video else "pixel_values"]
    grid = inputs["video_grid_thw" if video else "image_grid_thw"]
    with torch.no_grad():
        features = mm.get_video_features(pixels, grid) if video else mm.get_image_features(pixels, grid)
        embeds = mm.get_input_embeddings()(ids)
        visual = ids == (VIDEO_ID if video else IMAGE_ID)
        embeds[visual] = torch.cat(features.pooler_output).to(embeds.dtype)
        deepstack = [torch.cat(f) for f in features.deepstack_features]
        positions, _ = mm.get_rope_index(
            ids, inputs["mm_token_type_ids"], image_grid_thw=None if video else grid,
            video_grid_thw=grid if video else None, attention_mask=inputs["attention_mask"],
        )
    return embeds, visual, deepstack, positions


def merged_with(hidden: torch.Tensor, carried: list[torch.Tensor], schedule) -> tuple[torch.Tensor, list, torch.Tensor]:
    """`aim.merge.merge_tokens` of one group's `hidden` ``(n, dim)``, the `carried` features
    ``(n, dim)`` each merged with the same matches and sizes (size-weighted means): the bipartite
    matching sees the hidden states only. Returns merged hidden, merged carried, survivors' indices."""
    dim = hidden.shape[-1]
    real = aim.merge.best_match
    with mock.patch.object(aim.merge, "best_match", lambda a, b: real(a[..., :dim], b[..., :dim])):
        merged = merge_tokens(torch.cat([hidden, *carried], dim=-1)[None], schedule)
    values = merged.features[0]
    return values[:, :dim], list(values[:, dim:].split(dim, dim=-1)), merged.index[0]


def slice_positions(visual: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
    """Sequence positions of each temporal slice's placeholders (one merge group each), batch of one."""
    placeholders = visual[0].nonzero().flatten()
    slices = int(grid[0, 0])
    return list(placeholders.chunk(slices))


def decoder_logits(model, embeds, positions, visual, deepstack, key_valid=None) -> torch.Tensor:
    """The unpatched Qwen3-VL text decoder, layer by layer as Qwen3VLTextModel.forward runs it
    (DeepStack features added at `visual` after the first layers), except that layer ``l`` attends
    only to the keys ``key_valid[l]`` (the masking reference of pruning); logits of every position."""
    text = model.model.language_model
    n = embeds.shape[1]
    with torch.no_grad():
        cos, sin = text.rotary_emb(embeds, positions)
        hidden = embeds
        for idx, layer in enumerate(text.layers):
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
            if key_valid is not None:
                allowed &= key_valid[idx][None, :]
            mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
            hidden = out[0] if isinstance(out, tuple) else out
            if idx < len(deepstack):
                hidden = hidden.clone()
                hidden[visual] += deepstack[idx]
        return model.lm_head(text.norm(hidden))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_deepstack_features_follow_merging(family, kind):
    """Merging only: the patched model equals the unpatched text decoder fed the merged sequence:
    merged inputs_embeds AND merged DeepStack features (the same matches, size-weighted means),
    at the survivors' own M-RoPE positions. Feeding the survivors' unmerged DeepStack features
    instead gives other logits: the check sees how they are merged."""
    model = matrix.tiny(family)
    inputs = make_inputs(model, kind=kind, batch_size=1, text_lengths=(5,))
    grid = inputs["video_grid_thw" if kind == "video" else "image_grid_thw"]
    embeds, visual, deepstack, positions = unpatched_parts(model, inputs)
    assert len(deepstack) == TINY_DEEPSTACK_LAYERS
    config = AIMConfig(merge_keep=0.5, prune=False)

    keep = torch.ones_like(visual)
    merged_embeds = embeds.clone()
    merged_deepstack, plain_deepstack = [d.clone() for d in deepstack], [d.clone() for d in deepstack]
    row_of = torch.full(visual.shape[1:], -1, dtype=torch.long)
    row_of[visual[0]] = torch.arange(int(visual.sum()))  # DeepStack row of each visual position
    for group in slice_positions(visual, grid):
        rows = row_of[group]
        hidden, carried, index = merged_with(embeds[0, group], [d[rows] for d in deepstack], config.merge_schedule)
        survivors = group[index]
        keep[0, group] = False
        keep[0, survivors] = True
        merged_embeds[0, survivors] = hidden
        for layer, values in enumerate(carried):
            merged_deepstack[layer][row_of[survivors]] = values
    kept_rows = keep[0][visual[0]]  # DeepStack rows of the visual tokens that stay, in order

    def reference(features: list[torch.Tensor]) -> torch.Tensor:
        short = [f[kept_rows] for f in features]
        return decoder_logits(model, merged_embeds[:, keep[0]], positions[:, :, keep[0]], visual[:, keep[0]], short)

    expected, unmerged = reference(merged_deepstack), reference(plain_deepstack)
    text_short = ~visual[:, keep[0]]
    with torch.no_grad():  # the unpatched decoder itself: decoder_logits is Qwen3VLTextModel's loop
        direct = model.model.language_model(
            inputs_embeds=merged_embeds[:, keep[0]], position_ids=positions[:, :, keep[0]],
            visual_pos_masks=visual[:, keep[0]], deepstack_visual_embeds=[f[kept_rows] for f in merged_deepstack],
        ).last_hidden_state
    torch.testing.assert_close(model.lm_head(direct), expected, rtol=1e-5, atol=1e-5)

    apply_aim(model, config=config)
    with torch.no_grad():
        patched = model(**inputs).logits
    stats = last_stats(model)
    remove_aim(model)
    assert stats.visual_tokens_after_merge == [int(keep[0][visual[0]].sum())]
    got = patched[:, ~visual[0]]
    torch.testing.assert_close(got, expected[text_short][None], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, unmerged[text_short][None], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["mask", "remove"])
@pytest.mark.parametrize("family", FAMILIES)
def test_deepstack_features_follow_pruning(family, mode):
    """Pruning before layer 1, the layer after which the last DeepStack features are added: the
    patched model equals the unpatched decoder run with each layer's keys restricted to the tokens
    it kept (features added at every visual position, as the model does: pruned tokens are no
    keys any more, so their additions change nothing). Leaving out layer 1's features differs."""
    model = matrix.tiny(family)
    inputs = make_inputs(model, kind="image", batch_size=1, text_lengths=(5,))
    embeds, visual, deepstack, positions = unpatched_parts(model, inputs)
    apply_aim(model, prune_mode=mode, merge_keep=1.0, prune_keep_ratios=(1.0, 0.5, 0.5, 0.25))
    with torch.no_grad(), recording_positions(model):
        patched = model(**inputs).logits
    stats = last_stats(model)
    remove_aim(model)
    stages = dict(stats.kept_visual_positions[1:])  # pruning layer -> visual positions kept
    key_valid, current = [], torch.ones_like(visual[0])
    for layer in range(len(model.model.language_model.layers)):
        if layer in stages:
            current = ~visual[0]
            current[stages[layer][0]] = True
        key_valid.append(current)
    assert key_valid[1].sum() < key_valid[0].sum()  # layer 1 really runs on fewer tokens
    expected = decoder_logits(model, embeds, positions, visual, deepstack, key_valid)
    torch.testing.assert_close(patched[:, -1], expected[:, -1], rtol=1e-4, atol=1e-4)
    without_layer_1 = decoder_logits(model, embeds, positions, visual, deepstack[:1], key_valid)
    assert not torch.allclose(patched[:, -1], without_layer_1[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_ranks_the_normalised_queries_and_keys(family):
    """The tokens layer 1 keeps are those PageRank ranks highest from layer 0's q_norm / k_norm
    outputs with M-RoPE applied (the states attention uses), not from the raw q / k projections."""
    model = matrix.tiny(family)
    attention = model.model.language_model.layers[0].self_attn
    assert family_for_model_type(family).qk_modules(attention) == (attention.q_norm, attention.k_norm)
    inputs = make_inputs(model, kind="image", batch_size=1, text_lengths=(5,))
    _, visual, _, positions = unpatched_parts(model, inputs)
    config = AIMConfig(merge_keep=1.0, prune_keep_ratios=(1.0, 0.5, 0.5, 0.5))
    seen: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, out))
             for name, module in (("q", attention.q_norm), ("k", attention.k_norm),
                                  ("q_proj", attention.q_proj), ("k_proj", attention.k_proj))]
    apply_aim(model, config=config)
    try:
        with torch.no_grad(), recording_positions(model):
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    stats = last_stats(model)
    remove_aim(model)
    kept = dict(stats.kept_visual_positions)[1][0]

    cos, sin = model.model.language_model.rotary_emb(seen["q"], positions)
    head_dim = attention.head_dim

    def ranked_keep(query: torch.Tensor, key: torch.Tensor) -> list[int]:
        def rope(states):  # (batch, seq, heads, dim) -> rotated (batch, heads, seq, dim)
            x = states.transpose(1, 2)
            half = x.shape[-1] // 2
            return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]

        valid = torch.ones_like(visual)
        importance = pagerank_importance_reference(rope(query), rope(key), valid, tau=config.tau,
                                                   iterations=config.pagerank_iterations)
        target = torch.tensor([visual_tokens_kept(int(visual.sum()), 0.5)])
        return (select_tokens(importance, valid, visual, target) & visual)[0].nonzero().flatten().tolist()

    def heads(states):
        return states.view(*states.shape[:2], -1, head_dim)

    assert kept == ranked_keep(seen["q"], seen["k"])
    assert kept != ranked_keep(heads(seen["q_proj"]), heads(seen["k_proj"]))  # the norms matter here


@pytest.mark.parametrize("mode", ["remove", "mask"])
@pytest.mark.parametrize("family", FAMILIES)
def test_video_timestamps_between_frames_are_never_merged_or_pruned(family, mode):
    """A two-slice video: the timestamp text between its frames is in no merge group, no stage
    keeps or drops it, and every layer runs all text tokens; the groups are the slices."""
    model = matrix.tiny(family)
    inputs = make_inputs(model, kind="video", batch_size=2, text_lengths=(3, 8), num_frames=4)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    placeholder = ids == VIDEO_ID
    slices = int(inputs["video_grid_thw"][0, 0])
    assert slices == 2
    apply_aim(model, prune_mode=mode, **matrix.PRUNING)
    with torch.no_grad(), recording_positions(model):
        model(**inputs)
    stats = last_stats(model)
    remove_aim(model)
    for row in range(2):
        seq = ids[row].tolist()
        timestamps = [i for i, t in enumerate(seq) if t == VISION_START_ID]
        timestamp_positions = {p - k for p in timestamps for k in range(1, TIMESTAMP_TOKENS + 1)}
        groups = stats.visual_groups[row]
        assert len(groups) == slices
        assert all(placeholder[row, g].all() for g in groups)
        assert timestamp_positions.isdisjoint(p for g in groups for p in g)
        text = int((valid[row] & ~placeholder[row]).sum())
        for stage, kept in stats.kept_visual_positions:
            assert placeholder[row, kept[row]].all(), f"stage {stage} kept a text token"
        assert [t[row] - v[row] for t, v in zip(stats.tokens_per_layer, stats.visual_tokens_per_layer)] == [text] * 4
        assert stats.visual_tokens_per_layer[-1][row] == 0 and stats.tokens_per_layer[-1][row] == text


def test_take_visual_additions_pops_the_deepstack_inputs():
    family = family_for_model_type(QWEN3)
    masks = torch.tensor([[False, True, True, False]])
    embeds = [torch.randn(2, 8), torch.randn(2, 8)]
    kwargs = {"visual_pos_masks": masks, "deepstack_visual_embeds": embeds, "other": 1}
    taken = family.take_visual_additions(kwargs)
    assert kwargs == {"other": 1} and len(taken) == 2 and all(a is b for a, b in zip(taken, embeds))
    kwargs = {"visual_pos_masks": None, "deepstack_visual_embeds": None}
    assert family.take_visual_additions(kwargs) is None and kwargs == {}  # text chunks, decoding steps
    with pytest.raises(ValueError, match="without visual_pos_masks"):
        family.take_visual_additions({"deepstack_visual_embeds": embeds})


@needs_qwen3
def test_rope_takes_the_three_mrope_rows():
    """generate() passes 4-row ids (text row first), a plain forward 3-row ones: the rotary
    embedding gets the t / h / w rows either way, as Qwen3VLTextModel.forward gives it."""
    model = matrix.tiny(QWEN3)
    family = family_for_model_type(QWEN3)
    rotary = model.model.language_model.rotary_emb
    ids = torch.randint(0, 50, (4, 1, 6))
    x = torch.randn(1, 6, 8)
    for given in (ids, ids[1:]):
        torch.testing.assert_close(rotary(x, family.rope_position_ids(given)), rotary(x, ids[1:]), rtol=0, atol=0)
    text_row = ids[0]
    assert family.rope_position_ids(text_row) is text_row  # 2-D: the rotary embedding broadcasts it


@needs_qwen3
def test_flops_facts():
    from aim.flops.inputs import video_input
    from aim.flops.model_spec import load_model

    config = matrix.tiny(QWEN3).config
    spec = load_model(config)
    assert spec.vision is None  # no vision estimate: the DeepStack mergers are not expressible
    assert spec.supports_video and spec.frames_per_group == 2
    assert spec.llm.head_dim == config.text_config.head_dim
    assert video_input(config, frames=8, tokens_per_frame=64, text_tokens=20).visual_groups == (64,) * 4


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_moe_router_logits_are_refused_while_aim_removes_tokens(family):
    """output_router_logits=True (the auxiliary load-balancing loss) needs every layer's router
    logits over the whole sequence, which AIM's layers do not see: a clear error, as for
    output_hidden_states, not a silent aux_loss of 0. AIM off: the model's own."""
    model = matrix.tiny(family)
    inputs = make_inputs(model, kind="image", batch_size=1, text_lengths=(4,))
    apply_aim(model, enabled=False)
    with torch.no_grad():
        assert model(**inputs, output_router_logits=True).aux_loss > 0
    apply_aim(model, **matrix.PRUNING)
    try:
        with torch.no_grad(), pytest.raises(NotImplementedError, match="output_router_logits=True is not available"):
            model(**inputs, output_router_logits=True)
        with torch.no_grad():
            model(**inputs)  # the MoE model passes output_router_logits=False on every call: no error
    finally:
        remove_aim(model)
