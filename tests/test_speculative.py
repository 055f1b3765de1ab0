"""Speculative decoding with a text-only draft: the target's own output, the draft never sees
visual inputs, with and without AIM."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from aim import apply_aim, last_stats, remove_aim
from aim.speculative import last_draft_stats, visual_token_ids
from aim.tiny import build_tiny_model, make_inputs

PRUNING = dict(merge_keep=0.5, prune_keep_ratios=(1.0, 0.5, 0.25, 0.0))
GREEDY = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, suppress_tokens=list(range(8)))


def tiny_draft(model, seed: int = 0):
    torch.manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    config = tf.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
    return tf.Qwen2ForCausalLM(config).eval()


class DraftSpy:
    """Forward pre-hook: every call the draft receives, for checking what it saw."""

    def __init__(self, draft):
        self.calls = []
        draft.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(kwargs)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("aim_on", [False, True], ids=["draft-only", "aim+draft"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_is_the_targets_and_the_draft_sees_text_only(family, aim_on, k):
    model = build_tiny_model(family, num_layers=4, seed=0)
    inputs = make_inputs(model, kind="video", num_frames=4, text_lengths=(6,))
    draft = tiny_draft(model)
    spy = DraftSpy(draft)
    chunks = []  # the sequence length of every forward of the target's text decoder
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: chunks.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    apply_aim(model, **(PRUNING if aim_on else dict(enabled=False)))
    try:
        with torch.no_grad():
            reference = model.generate(**inputs, **GREEDY)
            chunks.clear()
            drafted = model.generate(**inputs, **GREEDY, aim_draft=draft, aim_draft_tokens=k)
        assert torch.equal(drafted, reference)  # token for token the target's greedy output
        # the prefill is the prompt alone (AIM ranks its visual tokens without drafted text); each
        # verify carries the last token and k drafted ones (fewer only where the length limit cuts)
        assert chunks[0] == inputs["input_ids"].shape[1]
        assert max(chunks[1:]) == k + 1
        stats = last_draft_stats(model)
        assert stats.new_tokens == 9 and stats.rounds + stats.accepted == stats.new_tokens
        assert stats.drafted <= stats.rounds * k and stats.block_efficiency >= 1.0
        assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
        visual = torch.tensor(visual_token_ids(model.config))
        assert spy.calls
        for call in spy.calls:
            assert not torch.isin(call["input_ids"], visual).any()
            assert not any(k.startswith(("pixel", "image_", "video_", "mm_")) for k in call)
    finally:
        remove_aim(model)


def test_sampling_runs_and_bad_drafts_are_clear_errors():
    model = build_tiny_model("llava_onevision", num_layers=2, seed=0)
    inputs = make_inputs(model, kind="video", num_frames=2, text_lengths=(5,))
    apply_aim(model)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=True, aim_draft=tiny_draft(model))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    other = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**inputs, max_new_tokens=2, aim_draft=other)
    with pytest.raises(ValueError, match="aim_draft_tokens"):
        model.generate(**inputs, max_new_tokens=2, aim_draft=tiny_draft(model), aim_draft_tokens=0)
    with pytest.raises(ValueError, match="constant"):
        model.generate(**inputs, max_new_tokens=2, aim_draft=tiny_draft(model), num_assistant_tokens_schedule="heuristic")
    with pytest.raises(ValueError, match="give aim_draft too"):
        model.generate(**inputs, max_new_tokens=2, aim_draft_tokens=3)
    remove_aim(model)
    assert "_get_candidate_generator" not in model.__dict__


def test_rejected_tokens_are_cropped_from_every_layer_in_step_with_aims_lengths():
    model = build_tiny_model("qwen2_vl", num_layers=4, seed=0)
    inputs = make_inputs(model, kind="video", num_frames=4, text_lengths=(6,))
    draft = tiny_draft(model)  # untrained: most drafted tokens are rejected
    apply_aim(model, **PRUNING)
    try:
        with torch.no_grad():
            plain = model.generate(**inputs, **GREEDY, return_dict_in_generate=True)
            prefill = last_stats(model).tokens_per_layer_of(0)
            drafted = model.generate(**inputs, **GREEDY, aim_draft=draft, aim_draft_tokens=4,
                                     return_dict_in_generate=True)
        stats = last_draft_stats(model)
        assert stats.drafted > stats.accepted  # some drafted tokens were rejected and cropped
        assert torch.equal(drafted.sequences, plain.sequences)

        def lengths(cache):
            return [layer.keys.shape[-2] for layer in cache.layers]

        # every layer holds what AIM kept of the prompt there plus the generated tokens fed back
        # (the last one never is), after rejections exactly as without a draft
        expected = [n + GREEDY["max_new_tokens"] - 1 for n in prefill]
        assert lengths(drafted.past_key_values) == lengths(plain.past_key_values) == expected
        assert len(set(expected)) > 1  # the schedule really pruned: lengths differ across layers
    finally:
        remove_aim(model)
