"""Per-call state: threads, per-call settings, copies, nested patches, and the call shapes that used
to go wrong (chunked prefill, right padding, prompts ending on a visual token, a cache continued
after remove_aim, dict configs). References: the same calls run one after another, each prompt
alone, or the unpatched model."""

import copy
import threading

import pytest
import torch

from aim import AIMConfig, apply_aim, is_applied, last_stats, remove_aim, settings
from aim.compat import cache_argument, output_cache
from aim.tiny import build_tiny_model, make_inputs

SPECIAL_IDS = list(range(8))
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=SPECIAL_IDS)
PRUNING = dict(merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0))
OTHER = AIMConfig(merge_keep=0.25, prune=False)


def tiny(family="llava_onevision"):
    return build_tiny_model(family, attn_implementation="sdpa", num_layers=4, seed=0)


def forwards(model):
    return {name: module.__dict__.get("forward") for name, module in model.named_modules()}


def hooks(model):
    return sum(len(module._forward_hooks) for module in model.modules())


@pytest.mark.parametrize("proportional", [False, True])
@pytest.mark.parametrize("family, kind", [("llava_onevision", "video"), ("qwen2_vl", "image")])
def test_threads_with_two_per_call_settings_equal_the_sequential_results(family, kind, proportional):
    """4 threads on one model: two use the model's config, one `settings(...)`, one `aim_config=`
    (with proportional attention: the log sizes one call keeps in its cache must not reach another)."""
    model = tiny(family)
    apply_aim(model, **PRUNING)
    other = OTHER.replace(proportional_attention=proportional)
    prompts = [make_inputs(model, kind=kind, batch_size=1, text_lengths=(4 + i,), seed=i) for i in range(4)]

    def call(i):
        with torch.no_grad():
            if i == 1:
                with settings(model, other):
                    out = model.generate(**prompts[i], **GREEDY)
            elif i == 3:
                out = model.generate(**prompts[i], **GREEDY, aim_config=other)
            else:
                out = model.generate(**prompts[i], **GREEDY)
        return out.tolist(), last_stats(model).visual_tokens_per_layer

    expected = [call(i) for i in range(4)]
    if proportional:  # it takes effect, so that a call losing it to another could not go unnoticed
        with torch.no_grad():
            plain = model(**prompts[3], aim_config=OTHER).logits
            weighted = model(**prompts[3], aim_config=other).logits
        assert not torch.allclose(plain, weighted, atol=1e-3)
    got: dict = {i: [] for i in range(4)}
    errors: list = []
    start = threading.Barrier(4)

    def worker(i):
        try:
            start.wait()
            for _ in range(3):
                got[i].append(call(i))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(4):
        assert got[i] == [expected[i]] * 3, f"thread {i}: other tokens or another call's stats"
    # the two settings really differ, so a mix-up could not go unnoticed
    assert expected[0][1][0] != expected[1][1][0] and expected[2][1][0] != expected[3][1][0]


def test_per_call_config_overrides_the_model_config_for_that_call_only():
    model = tiny()
    apply_aim(model, **PRUNING)
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,))
    with torch.no_grad():
        model(**inputs)
        default = last_stats(model)
        model(**inputs, aim_config={"merge_keep": 0.25, "prune": False})
        per_call = last_stats(model)
        with settings(model, prune=False):
            in_block = last_stats(model) and model(**inputs) and last_stats(model)
        model(**inputs)
        after = last_stats(model)
    assert per_call.visual_tokens_after_merge < default.visual_tokens_after_merge
    assert per_call.visual_tokens_per_layer[-1] == per_call.visual_tokens_after_merge  # no pruning
    assert in_block.visual_tokens_per_layer[-1] == default.visual_tokens_after_merge  # merge as the model, no pruning
    assert after == default
    with pytest.raises(ValueError, match="past the model's last layer"):
        model(**inputs, aim_config={"prune_start": 9})


def test_deepcopy_then_remove_on_both():
    model = tiny()
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,))
    with torch.no_grad():
        base = model(**inputs).logits
    originals, hooks_before = forwards(model), hooks(model)
    apply_aim(model, **PRUNING)
    with torch.no_grad():
        patched = model(**inputs).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, patched)
    assert last_stats(twin) is not None  # the copy's own patch recorded the copy's call
    remove_aim(twin)
    assert is_applied(model) and not is_applied(twin)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, base)
        assert torch.equal(model(**inputs).logits, patched)  # the original is still patched
    assert forwards(twin) == {name: None for name in forwards(twin)} and hooks(twin) == hooks_before
    remove_aim(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
    assert forwards(model) == originals and hooks(model) == hooks_before


@pytest.mark.parametrize("first, second", [("outer", "inner"), ("inner", "outer")])
def test_nested_apply_and_remove_in_every_order(first, second):
    model = tiny()
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,))
    with torch.no_grad():
        base = model(**inputs).logits
    originals, hooks_before = forwards(model), hooks(model)
    target = {"outer": model, "inner": model.model}
    apply_aim(target[first], **PRUNING)
    with pytest.raises(ValueError, match="AIM is applied to .* call apply_aim / remove_aim / settings on that one"):
        apply_aim(target[second])
    with pytest.raises(ValueError, match="AIM is applied to"):
        remove_aim(target[second])
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, base)  # still patched, once
    remove_aim(target[first])
    assert not is_applied(model) and not is_applied(model.model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
    assert forwards(model) == originals and hooks(model) == hooks_before
    apply_aim(target[second])  # free again
    remove_aim(target[second])
    assert forwards(model) == originals


def test_chunked_prefill_is_a_clear_error():
    model = tiny()
    apply_aim(model, **PRUNING)
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,))
    with pytest.raises(NotImplementedError, match="prefill_chunk_size=None"):
        model.generate(**inputs, **GREEDY, prefill_chunk_size=16)
    with torch.no_grad():  # and the model keeps working
        assert model.generate(**inputs, **GREEDY).shape[1] == inputs["input_ids"].shape[1] + 6


@pytest.mark.parametrize("family, kind", [("llava_onevision", "video"), ("llava", "image")])
def test_last_token_ranking_with_right_padding_equals_each_prompt_alone(family, kind):
    model = tiny(family)
    apply_aim(model, merge_keep=1.0, prune_method="last_token", prune_keep_ratios=(1.0, 0.5, 0.25, 0.0),
              prune_mode="mask")
    batch = make_inputs(model, kind=kind, batch_size=2, text_lengths=(3, 11), seed=7, padding_side="right")
    lengths = batch["attention_mask"].sum(1).tolist()
    with torch.no_grad():
        together = model(**batch).logits
    for i, length in enumerate((3, 11)):
        alone = make_inputs(model, kind=kind, batch_size=1, text_lengths=(length,), seed=7, first_sample=i)
        with torch.no_grad():
            alone_logits = model(**alone).logits[0, -1]
        torch.testing.assert_close(together[i, lengths[i] - 1], alone_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, kind", [("llava_onevision", "video"), ("llava", "image"), ("qwen2_vl", "image")])
def test_prompt_ending_on_a_visual_token_is_a_clear_error(family, kind):
    model = tiny(family)
    inputs = make_inputs(model, kind=kind, batch_size=1, text_lengths=(5,))
    token = model.config.video_token_id if kind == "video" else model.config.image_token_id
    last = int((inputs["input_ids"][0] == token).nonzero().max())
    cut = {k: (v[:, : last + 1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v) for k, v in inputs.items()}
    apply_aim(model)
    with pytest.raises(ValueError, match="end with a visual token.*Put text after the image"):
        model(**cut)
    apply_aim(model, enabled=False)  # what the message offers: the unchanged model runs it
    with torch.no_grad():
        model(**cut)


def test_continuing_a_cache_after_remove_aim_is_a_clear_error():
    model = tiny()
    apply_aim(model, **PRUNING)
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,))
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    remove_aim(model)
    step = dict(input_ids=torch.tensor([[20]]), attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="cannot be continued by the model after remove_aim"):
        with torch.no_grad():
            model(**step, **{cache_argument(model.forward): cache})
    apply_aim(model, **PRUNING)  # re-applied, the conversation goes on
    with torch.no_grad():
        assert model(**step, **{cache_argument(model.forward): cache}).logits.shape[1] == 1


def test_dict_config():
    model = tiny()
    apply_aim(model, {"merge_keep": 0.5, "prune": False})
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,))
    with torch.no_grad():
        model(**inputs)
    by_dict = last_stats(model)
    apply_aim(model, AIMConfig(merge_keep=0.5, prune=False))
    with torch.no_grad():
        model(**inputs)
    assert last_stats(model) == by_dict
    with pytest.raises(TypeError, match="unknown AIM option"):
        apply_aim(model, {"keep": 0.5})
    with pytest.raises(TypeError, match="AIMConfig or a dict"):
        apply_aim(model, 0.5)


def test_beam_search_over_prompts_with_different_images_equals_each_prompt_alone():
    """generate() repeats each prompt's features for its beams ([A, B] -> [A, A, A, B, B, B]); each
    repeat must keep its own image's merge groups (the images differ in size here)."""
    model = tiny("llava_next")
    apply_aim(model, **PRUNING)
    sizes = [(48, 96), (96, 48)]
    beams = dict(GREEDY, num_beams=3, num_return_sequences=2)
    batch = make_inputs(model, kind="image", batch_size=2, text_lengths=(3, 11), seed=3, image_sizes=sizes)
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert counts[0] != counts[1]  # different feature counts: mixed-up groups could not pass
    with torch.no_grad():
        together = model.generate(**batch, **beams)[:, -6:]
    for i, length in enumerate((3, 11)):
        alone = make_inputs(model, kind="image", batch_size=1, text_lengths=(length,), seed=3, first_sample=i,
                            image_sizes=[sizes[i]])
        with torch.no_grad():
            alone_ids = model.generate(**alone, **beams)[:, -6:]
        assert together[2 * i : 2 * i + 2].tolist() == alone_ids.tolist()


def test_per_call_dicts_change_the_config_in_effect():
    model = tiny()
    apply_aim(model, merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0))
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,))
    with torch.no_grad():
        model(**inputs, aim_config={"merge_keep": 0.25})
        per_call = last_stats(model)
        with settings(model, prune=False):
            with settings(model, {"merge_keep": 0.25}):  # nested: builds on the outer block
                model(**inputs)
                nested = last_stats(model)
    assert per_call.visual_tokens_per_layer[-1] == [0]  # the model's pruning still applies
    assert nested.visual_tokens_per_layer[-1] == nested.visual_tokens_after_merge  # the outer prune=False holds
    assert nested.visual_tokens_after_merge == per_call.visual_tokens_after_merge  # the inner merge_keep


def test_a_reset_cache_is_a_plain_dynamic_cache_again():
    from transformers.cache_utils import DynamicCache

    model = tiny()
    apply_aim(model, **PRUNING)
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,))
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
        cache.reset()
        assert type(cache) is DynamicCache and not hasattr(cache, "aim_state")
        again = output_cache(model(**inputs, **{cache_argument(model.forward): cache}, use_cache=True))
    assert again is cache and cache.get_seq_length() == inputs["input_ids"].shape[1]
