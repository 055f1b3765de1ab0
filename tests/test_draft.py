"""The study's text-only draft (aim.study.draft): distilled from the target's own answers, trained on
exactly the text the draft sees at inference, and a valid draft for the target."""

from __future__ import annotations

import json

import pytest
import torch

from aim import apply_aim, remove_aim
from aim.speculative import last_draft_stats, visual_token_ids
from aim.study import data
from aim.study import draft as study_draft
from aim.study.model import build_model, build_tokenizer, model_inputs, to_inputs


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return build_model(num_layers=2, hidden_size=32, vision_hidden=32, vision_layers=1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_the_draft_sees_the_prompt_without_visual_tokens(target, tokenizer):
    example = data.dataset("test", 1, recipe="v2")[0]
    full = to_inputs([example], tokenizer, target.config)["input_ids"][0].tolist()
    text = study_draft.text_prompt(example, tokenizer, target.config)
    visual = set(visual_token_ids(target.config))
    assert not visual & set(text)
    assert text == [t for t in full if t not in visual] and len(text) < len(full)
    (asked,) = study_draft.description_questions([example])
    assert asked.qa == (data.description_of(example),) and asked.pixels is example.pixels


def test_target_answers_are_its_greedy_outputs_up_to_the_end_token(target, tokenizer):
    # videos and images, several lengths: batched with padding == each prompt alone
    examples = study_draft.description_questions(data.dataset("val", 8, recipe="v2"))
    answers = study_draft.target_answers(target, tokenizer, examples, batch_size=3)
    ends = study_draft.end_token_ids(tokenizer)
    for example, answer in zip(examples, answers):
        prompt = model_inputs(to_inputs([example], tokenizer, target.config))
        alone = study_draft.greedy(target, prompt, ends)[0, prompt["input_ids"].shape[1]:].tolist()
        stop = next((i for i, t in enumerate(alone) if t in ends), len(alone) - 1)
        assert answer == alone[: stop + 1]


def test_training_distils_the_target_and_the_draft_serves_it(target, tokenizer, tmp_path):
    threads = torch.get_num_threads()
    facts = study_draft.train_draft(target, tokenizer, tmp_path, examples=24, steps=60, batch_size=16, threads=1,
                                    val_examples=4)
    assert torch.get_num_threads() == threads  # restored
    saved = json.loads((tmp_path / "draft_training.json").read_text())
    assert saved["draft"]["parameters"] == facts["draft"]["parameters"] > 100_000
    draft = study_draft.load_default_draft(tmp_path)
    # the distilled draft predicts the target's answer tokens far better than an untrained one
    examples = study_draft.description_questions(data.dataset("val", 4, recipe="v2"))
    answers = study_draft.target_answers(target, tokenizer, examples)
    pairs = [(study_draft.text_prompt(e, tokenizer, target.config), a) for e, a in zip(examples, answers)]
    assert facts["val_token_agreement"] == pytest.approx(study_draft.draft_agreement(draft, pairs), abs=1e-4)
    assert study_draft.draft_agreement(draft, pairs) > study_draft.draft_agreement(study_draft.build_draft(seed=1), pairs) + 0.2
    # and it drafts for the target: the output is the target's greedy output, token for token
    ends = study_draft.end_token_ids(tokenizer)
    prompt = model_inputs(to_inputs([examples[0]], tokenizer, target.config))
    apply_aim(target, enabled=False)
    try:
        out = study_draft.greedy(target, prompt, ends, aim_draft=draft, aim_draft_tokens=4)
        assert torch.equal(out, study_draft.greedy(target, prompt, ends))
        assert last_draft_stats(target).rounds >= 1
    finally:
        remove_aim(target)


def test_a_missing_draft_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m aim.study.draft"):
        study_draft.load_default_draft(tmp_path)
