"""AIM on tiny random-weight models of every supported transformers class.

References: the unpatched model (bit-identical when AIM is off), the masking reference
(pruned tokens masked as keys, nothing removed), and generation without a cache.
"""

import pytest
import torch

from aim import AIMConfig, apply_aim, is_applied, last_stats, remove_aim
from aim.compat import cache_argument, output_cache
from aim.merge import merged_token_count
from aim.tiny import build_tiny_model, make_inputs

CASES = [
    ("llava", "image"),
    ("llava_next", "image"),
    ("llava_next_video", "video"),
    ("llava_next_video", "image"),
    ("llava_onevision", "image"),
    ("llava_onevision", "video"),
    ("qwen2_vl", "image"),
    ("qwen2_vl", "video"),
    ("qwen2_5_vl", "video"),
]
CASE_IDS = [f"{f}-{k}" for f, k in CASES]
NUM_LAYERS = 4
# merge to half, then keep 1, 1/2, 1/4, 0 of the visual tokens in layers 0..3
PRUNING = dict(merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0))

# random weights may emit placeholder / special ids; a generated placeholder would make the
# no-cache reference see one more image token than there are features
SPECIAL_IDS = list(range(8))
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, suppress_tokens=SPECIAL_IDS)

_models: dict = {}


def tiny(family: str, attn: str = "sdpa"):
    key = (family, attn)
    if key not in _models:
        _models[key] = build_tiny_model(family, attn_implementation=attn, num_layers=NUM_LAYERS, seed=0)
    model = _models[key]
    if is_applied(model):
        remove_aim(model)
    return model


def logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.mark.parametrize("family, kind", CASES, ids=CASE_IDS)
def test_off_is_bit_identical_and_remove_restores(family, kind):
    model = tiny(family)
    inputs = make_inputs(model, kind=kind, batch_size=2, text_lengths=(4, 9))
    base = logits(model, inputs)
    originals = {name: obj.__dict__.get("forward") for name, obj in model.named_modules()}
    apply_aim(model, enabled=False)
    assert torch.equal(logits(model, inputs), base)
    apply_aim(model, merge_keep=1.0, prune=False)  # identity config: re-configures, never double-patches
    assert torch.equal(logits(model, inputs), base)
    apply_aim(model, **PRUNING)
    assert not torch.allclose(logits(model, inputs)[:, -1], base[:, -1])  # AIM really acts
    remove_aim(model)
    assert torch.equal(logits(model, inputs), base)
    assert {name: obj.__dict__.get("forward") for name, obj in model.named_modules()} == originals
    assert not is_applied(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family, kind", CASES, ids=CASE_IDS)
def test_physical_removal_matches_masking_reference(family, kind, attn):
    model = tiny(family, attn)
    inputs = make_inputs(model, kind=kind, batch_size=2, text_lengths=(4, 9))
    apply_aim(model, prune_mode="mask", **PRUNING)
    masked = logits(model, inputs)
    masked_stats = last_stats(model)
    apply_aim(model, prune_mode="remove", **PRUNING)
    removed = logits(model, inputs)
    stats = last_stats(model)
    torch.testing.assert_close(removed[:, -1], masked[:, -1], rtol=1e-4, atol=1e-4)
    assert stats.tokens_per_layer == masked_stats.tokens_per_layer
    # removal really shortens what each layer runs on; masking never does
    assert stats.sequence_length_per_layer[-1] < stats.sequence_length_per_layer[0]
    assert len(set(masked_stats.sequence_length_per_layer)) == 1


@pytest.mark.parametrize("family, kind", CASES, ids=CASE_IDS)
def test_layer_lengths_and_cache_follow_the_schedule(family, kind):
    model = tiny(family)
    inputs = make_inputs(model, kind=kind, batch_size=1, text_lengths=(6,))
    apply_aim(model, **PRUNING)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    stats = last_stats(model)
    total = int(inputs["attention_mask"].sum())
    visual = stats.visual_tokens_before_merge[0]
    merged = stats.visual_tokens_after_merge[0]
    assert 0 < merged < visual
    text = total - visual
    assert stats.input_tokens == [total]
    expected_visual = [int(merged * r + 0.5) for r in (1.0, 0.5, 0.25, 0.0)]
    assert [v[0] for v in stats.visual_tokens_per_layer] == expected_visual
    assert [t[0] for t in stats.tokens_per_layer] == [text + v for v in expected_visual]
    cache = output_cache(out)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [text + v for v in expected_visual]
    assert stats.kv_cache_entries_per_layer == [text + v for v in expected_visual]


def test_merge_counts_per_frame_onevision_video():
    model = tiny("llava_onevision")
    inputs = make_inputs(model, kind="video", batch_size=1, text_lengths=(5,), num_frames=4)
    apply_aim(model, merge_keep=0.25, prune=False)
    logits(model, inputs)
    stats = last_stats(model)
    per_frame = (stats.visual_tokens_before_merge[0] - 1) // 4  # one image_newline closes the video
    assert stats.visual_tokens_after_merge == [4 * merged_token_count(per_frame, (0.5, 0.25)) + 1]


@pytest.mark.parametrize("family, kind", CASES, ids=CASE_IDS)
def test_generate_with_cache_equals_recomputation(family, kind):
    model = tiny(family)
    inputs = make_inputs(model, kind=kind, batch_size=1, text_lengths=(5,))
    apply_aim(model, **PRUNING)
    with torch.no_grad():
        generated = model.generate(**inputs, **GREEDY)
    prompt_len = inputs["input_ids"].shape[1]
    steps = dict(inputs)
    for _ in range(GREEDY["max_new_tokens"]):  # no cache: the whole prompt again at every step
        with torch.no_grad():
            step = model(**steps, use_cache=False).logits[:, -1]
        step[:, SPECIAL_IDS] = float("-inf")
        for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if name in steps:
                new = step.argmax(-1, keepdim=True) if name == "input_ids" else torch.full_like(steps[name][:, :1], name == "attention_mask")
                steps[name] = torch.cat([steps[name], new], 1)
    assert generated[:, prompt_len:].tolist() == steps["input_ids"][:, prompt_len:].tolist()


@pytest.mark.parametrize("family, kind", CASES, ids=CASE_IDS)
def test_every_decoding_step_runs_on_the_cache_it_was_given(family, kind, caplog):
    """Each decoder layer of every generate() step gets one and the same cache, and at a decoding
    step that layer's cache already holds the prompt and the tokens before it. transformers 5.24
    renamed the argument: passing the old name there decodes without the cache, silently."""
    model = tiny(family)
    apply_aim(model, **PRUNING)
    inputs = make_inputs(model, kind=kind, batch_size=1, text_lengths=(5,))
    layers = model.model.language_model.layers
    arg = cache_argument(type(layers[0]).forward)
    calls = []

    def record(layer_idx):
        def hook(module, args, kwargs):
            cache = kwargs.get(arg)
            cached = cache.layers[layer_idx].keys if cache is not None and len(cache.layers) > layer_idx else None
            width = (args[0] if args else kwargs["hidden_states"]).shape[1]
            calls.append((layer_idx, width, cache, 0 if cached is None or cached.numel() == 0 else cached.shape[-2]))
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad(), caplog.at_level("WARNING"):
            model.generate(**inputs, **GREEDY)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == len(layers) * GREEDY["max_new_tokens"]
    assert all(cache is not None for _, _, cache, _ in calls), "a decoder layer ran without a cache"
    assert len({id(cache) for _, _, cache, _ in calls}) == 1, "generate() steps ran on different caches"
    for idx in range(len(layers)):
        steps = [(width, held) for layer_idx, width, _, held in calls if layer_idx == idx]
        prefill_width, _ = steps[0]
        assert prefill_width > 1 and all(width == 1 for width, _ in steps[1:])
        held = [h for _, h in steps[1:]]
        assert held[0] > 0, f"layer {idx}: the first decoding step found an empty cache"
        assert held == list(range(held[0], held[0] + len(held))), f"layer {idx}: cache did not grow by one per step"
    assert "deprecated" not in caplog.text  # aim passes the cache under this release's own name


@pytest.mark.parametrize("family, kind", CASES, ids=CASE_IDS)
def test_padded_batch_equals_each_prompt_alone(family, kind):
    model = tiny(family)
    apply_aim(model, **PRUNING)
    assert_padded_batch_equals_each_prompt_alone(model, kind)


def assert_padded_batch_equals_each_prompt_alone(model, kind: str) -> None:
    """Logits and greedy tokens of a left-padded batch of two equal each prompt's alone."""
    batch = make_inputs(model, kind=kind, batch_size=2, text_lengths=(3, 11), seed=7)
    with torch.no_grad():
        together = model.generate(**batch, **GREEDY)[:, -8:]
        together_logits = model(**batch).logits[:, -1]
    for i, length in enumerate((3, 11)):
        alone = make_inputs(model, kind=kind, batch_size=1, text_lengths=(length,), seed=7, first_sample=i)
        with torch.no_grad():
            alone_ids = model.generate(**alone, **GREEDY)[:, -8:]
            alone_logits = model(**alone).logits[:, -1]
        torch.testing.assert_close(together_logits[i], alone_logits[0], rtol=1e-4, atol=1e-4)
        assert together[i].tolist() == alone_ids[0].tolist()


@pytest.mark.parametrize("family, kind", [("llava_onevision", "video"), ("qwen2_vl", "image")])
def test_beam_search_batch_equals_each_prompt_alone(family, kind):
    model = tiny(family)
    apply_aim(model, **PRUNING)
    beams = dict(GREEDY, num_beams=3, num_return_sequences=2)
    batch = make_inputs(model, kind=kind, batch_size=2, text_lengths=(3, 11), seed=3)
    with torch.no_grad():
        together = model.generate(**batch, **beams)[:, -8:]
    for i, length in enumerate((3, 11)):
        alone = make_inputs(model, kind=kind, batch_size=1, text_lengths=(length,), seed=3, first_sample=i)
        with torch.no_grad():
            alone_ids = model.generate(**alone, **beams)[:, -8:]
        assert together[2 * i : 2 * i + 2].tolist() == alone_ids.tolist()


def test_sampling_generates():
    model = tiny("llava_onevision")
    apply_aim(model)
    inputs = make_inputs(model, kind="video", batch_size=2, text_lengths=(3, 6))
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=20)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)


def test_unsupported_model_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=50))
    with pytest.raises(TypeError, match="does not support LlamaForCausalLM. Supported .*LlavaOnevisionForConditionalGeneration"):
        apply_aim(model)


def test_bad_configs_against_the_model():
    model = tiny("llava")
    with pytest.raises(ValueError, match="has 3 entries but the model has 4 decoder layers"):
        apply_aim(model, prune_keep_ratios=(1.0, 0.5, 0.0))
    with pytest.raises(ValueError, match="past the model's last layer"):
        apply_aim(model, prune_start=9)
    with pytest.raises(TypeError, match="unknown AIM option"):
        apply_aim(model, keep=0.3)
    assert not is_applied(model)
    apply_aim(model, config=AIMConfig(prune_start=2))
    with pytest.raises(ValueError, match="past the model's last layer"):  # re-configure checks too
        apply_aim(model, prune_start=4)
    assert last_stats(model) is None


def test_image_token_count_mismatch_is_an_error():
    model = tiny("llava")
    apply_aim(model)
    inputs = make_inputs(model, kind="image", batch_size=1, text_lengths=(4,))
    ids = inputs["input_ids"]
    image_token = model.config.image_token_id
    first = int((ids[0] == image_token).nonzero()[0])
    inputs["input_ids"] = ids.clone()
    inputs["input_ids"][0, first] = 5  # one placeholder too few
    with pytest.raises(ValueError, match="(?i)image features and image tokens do not match|image-token count mismatch"):
        logits(model, inputs)


def test_unsupported_runtime_options_are_errors():
    model = tiny("llava")
    apply_aim(model)
    inputs = make_inputs(model, kind="image", batch_size=1, text_lengths=(4,))
    with pytest.raises(NotImplementedError, match="output_hidden_states=True is not available"):
        logits(model, inputs, output_hidden_states=True)
    remove_aim(model)
    model.model.language_model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(NotImplementedError, match="supports attn_implementation 'eager' and 'sdpa'"):
            apply_aim(model)
    finally:
        model.model.language_model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("proportional", [False, True])
def test_cache_edits_keep_the_per_layer_masks_in_step(proportional):
    model = tiny("llava_onevision")
    apply_aim(model, **PRUNING, prune_action="merge", proportional_attention=proportional)
    inputs = make_inputs(model, kind="video", batch_size=2, text_lengths=(3, 8))
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    state = cache.aim_state
    prompt = inputs["input_ids"].shape[1]
    assert cache.get_seq_length() == prompt  # original positions, not layer 0's entry count
    # with proportional attention, the log of each entry's size follows its validity
    sizes = state.layer_log_sizes
    assert (sizes is not None) == proportional and (not proportional or max(float(v.max()) for v in sizes) > 0)

    def in_step():
        masks = [tuple(v.shape) for v in state.layer_valid]
        same = masks == [tuple(v.shape) for v in state.layer_log_sizes] if proportional else True
        return same and masks == [(layer.keys.shape[0], layer.keys.shape[2]) for layer in cache.layers]

    assert in_step()
    rows = [[v[1].clone() for v in kept] for kept in (state.layer_valid, state.layer_log_sizes or [])]
    cache.batch_select_indices(torch.tensor([1]))
    for kept, row in zip((state.layer_valid, state.layer_log_sizes or []), rows):
        assert all(torch.equal(v[0], r) for v, r in zip(kept, row))
    assert in_step()
    cache.batch_repeat_interleave(2)
    assert state.layer_valid[0].shape[0] == 2 and in_step()
    cache.crop(-3)
    assert cache.get_seq_length() == prompt - 3 and in_step()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_text_chunk_after_a_cache_filled_before_aim(attn):
    # a cache AIM did not fill, continued by a multi-token chunk without attention_mask: the
    # chunk must attend to every cached entry (sdpa's is_causal would attend to the wrong keys)
    model = tiny("llava", attn)
    ids = torch.randint(SPECIAL_IDS[-1] + 1, model.config.text_config.vocab_size, (1, 10),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = output_cache(model(input_ids=ids[:, :7], use_cache=True))
        apply_aim(model, **PRUNING)
        chunk = model(input_ids=ids[:, 7:], **{cache_argument(model.forward): cache}).logits
    torch.testing.assert_close(chunk, full[:, 7:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["remove", "mask"])
@pytest.mark.parametrize("family, kind", [("llava_onevision", "video"), ("qwen2_vl", "image")])
def test_per_prompt_kv_cache_entries_of_a_padded_batch_equal_each_prompt_alone(family, kind, mode):
    """The per-prompt KV figures of a padded batch are those of the prompt run alone (whose cache has
    no padding), and the summary reports them, not the padded tensor's length."""
    model = tiny(family)
    apply_aim(model, prune_mode=mode, **PRUNING)
    batch = make_inputs(model, kind=kind, batch_size=2, text_lengths=(3, 11), seed=7)
    with torch.no_grad():
        model(**batch, use_cache=True)
    stats = last_stats(model)
    for i, length in enumerate((3, 11)):
        alone = make_inputs(model, kind=kind, batch_size=1, text_lengths=(length,), seed=7, first_sample=i)
        with torch.no_grad():
            cache = output_cache(model(**alone, use_cache=True))
        entries = [layer.keys.shape[-2] for layer in cache.layers]
        assert stats.kv_cache_entries_of(i) == entries
        assert f"KV-cache entries per layer {' '.join(map(str, entries))}" in stats.summary()
    assert stats.kv_cache_entries_of(0) != stats.kv_cache_entries_per_layer  # the padded tensor differs
