"""Proportional attention (``proportional_attention=True``, ToMe's): a key that stands for ``s``
merged tokens gets ``log(s)`` added to its logits. Held to its definition (attention over ``s``
identical keys), to the unpatched model on an input with duplicated tokens, to the masking
reference, to recomputation when decoding from the cache, and a padded batch to each prompt."""

from __future__ import annotations

import pytest
import torch

from aim import AIMConfig, apply_aim, last_stats
from aim.cli_options import add_aim_options, aim_config
from aim.tiny import build_tiny_model, make_inputs
from aim.tokens import proportional_mask
from test_models import GREEDY, assert_padded_batch_equals_each_prompt_alone, logits, tiny

PROPORTIONAL = dict(merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0), prune_action="merge",
                    proportional_attention=True)
CASES = [("llava_onevision", "video"), ("qwen2_vl", "image"), ("qwen2_5_vl", "video")]


def test_mask_equals_attention_over_duplicated_keys():
    generator = torch.Generator().manual_seed(0)
    batch, heads, keys, dim = 2, 3, 6, 8
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    key = torch.randn(batch, heads, keys, dim, generator=generator)
    value = torch.randn(batch, heads, keys, dim, generator=generator)
    sizes = torch.tensor([[1, 3, 2, 1, 4, 1], [2, 1, 1, 5, 1, 2]])
    valid = torch.ones(batch, keys, dtype=torch.bool)
    valid[1, 0] = False  # a padding key stays hidden
    merged = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=proportional_mask(valid, sizes.float().log(), 1, torch.float32))
    for b in range(batch):  # each key repeated as often as it stands for tokens
        repeat = torch.where(valid[b], sizes[b], 0)
        expanded = torch.nn.functional.scaled_dot_product_attention(
            query[b:b + 1], key[b:b + 1].repeat_interleave(repeat, dim=2), value[b:b + 1].repeat_interleave(repeat, dim=2))
        torch.testing.assert_close(merged[b:b + 1], expanded, rtol=1e-5, atol=1e-6)


def test_one_layer_model_on_duplicated_tokens_equals_the_unpatched_model():
    """Every image token duplicated in place (even slot = the odd slot after it, at the same
    position): merging keeps each pair as one token of size 2 at that position, and with one
    decoder layer the last token's logits then equal the unpatched model's on the duplicated input
    exactly when the pair's attention is counted twice, i.e. with proportional attention."""
    model = build_tiny_model("llava", num_layers=1, seed=0)

    def duplicate_pairs(module, args, output):
        output = output.clone()
        output[:, 0::2] = output[:, 1::2]
        return output

    model.model.multi_modal_projector.register_forward_hook(duplicate_pairs)
    inputs = make_inputs(model, kind="image", batch_size=1, text_lengths=(6,))
    ids = inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().flatten()
    assert image.numel() % 2 == 0
    positions = torch.arange(ids.numel())
    positions[image[0::2]] = positions[image[1::2]]  # each copy at its partner's position
    inputs["position_ids"] = positions[None]
    reference = logits(model, inputs)[:, -1]

    apply_aim(model, merge_keep=0.5, prune=False, proportional_attention=True)
    proportional = logits(model, inputs)[:, -1]
    stats = last_stats(model)
    assert stats.visual_tokens_after_merge[0] == image.numel() // 2  # each pair merged into one
    plain = logits(model, inputs, aim_config=dict(proportional_attention=False))[:, -1]
    torch.testing.assert_close(proportional, reference, rtol=1e-5, atol=1e-5)
    assert (plain - reference).abs().max() > 1e-3  # without it the pairs count once


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family, kind", CASES)
def test_physical_removal_matches_masking_reference(family, kind, attn):
    model = tiny(family, attn)
    inputs = make_inputs(model, kind=kind, batch_size=2, text_lengths=(4, 9))
    apply_aim(model, prune_mode="mask", **PROPORTIONAL)
    masked = logits(model, inputs)
    apply_aim(model, prune_mode="remove", **PROPORTIONAL)
    removed = logits(model, inputs)
    torch.testing.assert_close(removed[:, -1], masked[:, -1], rtol=1e-4, atol=1e-4)
    plain = logits(model, inputs, aim_config=dict(PROPORTIONAL, proportional_attention=False))
    assert not torch.allclose(plain[:, -1], removed[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, kind", CASES)
def test_decoding_from_the_cache_equals_recomputation(family, kind):
    """Every decoding step attends to the prompt's merged keys with their sizes (kept in the
    cache's state), as a recomputation of the whole sequence does."""
    model = tiny(family)
    inputs = make_inputs(model, kind=kind, batch_size=1, text_lengths=(5,))
    apply_aim(model, **PROPORTIONAL)
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    steps = dict(inputs)
    prompt_len = inputs["input_ids"].shape[1]
    for step, cached in enumerate(out.logits):
        with torch.no_grad():
            recomputed = model(**steps, use_cache=False).logits[:, -1]
        torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-4)
        token = out.sequences[:, prompt_len + step: prompt_len + step + 1]
        for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if name in steps:
                new = token if name == "input_ids" else torch.full_like(steps[name][:, :1], name == "attention_mask")
                steps[name] = torch.cat([steps[name], new], 1)


@pytest.mark.parametrize("family, kind", CASES)
def test_padded_batch_equals_each_prompt_alone(family, kind):
    model = tiny(family)
    apply_aim(model, **PROPORTIONAL)
    assert_padded_batch_equals_each_prompt_alone(model, kind)


def test_option_is_validated_described_and_on_the_command_line():
    with pytest.raises(ValueError, match="proportional_attention must be True or False"):
        AIMConfig(proportional_attention="yes")
    assert "proportional attention" in AIMConfig(merge_keep=0.5, prune=False, proportional_attention=True).describe(4)
    assert "proportional" not in AIMConfig(merge_keep=0.5, prune=False).describe(4)
    import argparse

    parser = argparse.ArgumentParser()
    add_aim_options(parser)
    assert aim_config(parser.parse_args(["--proportional-attention"])).proportional_attention
    assert not aim_config(parser.parse_args([])).proportional_attention


def test_budget_space_offers_it_with_merging_alone():
    from aim.budget.space import config_space

    space = {c.name: c.config for c in config_space(12)}
    proportional = {name: config for name, config in space.items() if config.proportional_attention}
    assert "merge 0.1, proportional" in proportional and "temporal 0.25, merge 0.1, proportional" in proportional
    assert all(not config.prune and "proportional" in name for name, config in proportional.items())
    assert all(name.replace(", proportional", "") in space for name in proportional)  # beside its plain twin


def test_the_cache_decides_for_later_steps():
    """A cache filled with proportional attention keeps it for the steps that continue it, whatever
    their config says; one filled without it gets none (its entries count as single tokens)."""
    from aim.compat import cache_argument, output_cache

    model = tiny("llava_onevision")
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,))
    apply_aim(model, **PROPORTIONAL)
    next_token = torch.tensor([[9]])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], 1)
    key = cache_argument(type(model).forward)

    def step(fill: dict, follow: dict):
        with torch.no_grad():
            cache = output_cache(model(**inputs, use_cache=True, aim_config=fill))
            return model(input_ids=next_token, attention_mask=mask, use_cache=True, aim_config=follow,
                         **{key: cache}).logits[:, -1]

    with_sizes = dict(PROPORTIONAL)
    without = dict(PROPORTIONAL, proportional_attention=False)
    torch.testing.assert_close(step(with_sizes, without), step(with_sizes, with_sizes))
    torch.testing.assert_close(step(without, with_sizes), step(without, without))
    assert not torch.allclose(step(with_sizes, with_sizes), step(without, without), rtol=1e-4, atol=1e-4)
