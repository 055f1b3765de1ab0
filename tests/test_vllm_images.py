"""aim's vLLM plugin on LLaVA-OneVision images (any-resolution: a base view, then the unpadded
high-resolution grid with a newline closing each row) with the trained default model, against aim's
transformers path fed by the same Hugging Face processor vLLM runs. See test_vllm.py for how vLLM
runs (its own virtualenv, ``AIM_VLLM_PYTHON``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vllm import MAX_TOKENS, MERGE_KEEP, VLLM_PYTHON, needs_vllm

from aim import AIMConfig, apply_aim, is_applied, last_stats, remove_aim
from aim.counts import merged_anyres_tokens
from aim.study import data
from aim.study import model as study

IMAGE_KINDS = tuple(k for k in data.KINDS if k not in data.VIDEO_KINDS)
ONE_WORD = 24  # test images of the study (96x96: base view + one tile), one-word answers
# (height, width) of further images, resized from test images, answered freely for MAX_TOKENS: wide,
# tall and larger, so the grids are unpadded to rows of various lengths (the default model's
# pinpoints never reach the anyres_max_9 shrinking of very large grids)
RESIZED = [(80, 150), (160, 96), (120, 200), (190, 190)]


@pytest.fixture(scope="module")
def served_images(tmp_path_factory):
    """The default model, the image requests (pixels, prompt ids, allowed ids), and vLLM's results
    without the plugin, with it and merging off, and with merging on."""
    from PIL import Image

    from aim.integrations.vllm.harness import run_offline, study_requests
    from aim.integrations.vllm.offline import prepare_checkpoint

    workdir = tmp_path_factory.mktemp("vllm_images")
    model_dir = prepare_checkpoint(Path(study.__file__).parents[1] / "default_model", workdir / "model")
    model, processor = study.load_default_model()
    clips = data.dataset("test", ONE_WORD + len(RESIZED), kinds=IMAGE_KINDS)
    requests = study_requests(workdir, clips, processor, one_word=ONE_WORD)
    for request, (height, width) in zip(requests[ONE_WORD:], RESIZED):
        pixels = np.asarray(Image.fromarray(np.load(request["image"])).resize((width, height), Image.BICUBIC))
        np.save(request["image"], pixels)

    def serve(merge_keep, plugin=True):
        return run_offline(VLLM_PYTHON, model_dir, workdir, requests, merge_keep, plugin, MAX_TOKENS)["results"]

    results = {"no plugin": serve(None, plugin=False), "merging off": serve(None), "merging on": serve(MERGE_KEEP)}
    return model, processor, clips, requests, results


def _inputs(processor, clip, request) -> dict:
    from PIL import Image

    image = Image.fromarray(np.load(request["image"]))
    return processor(images=image, text=study.prompt_text(clip.qa[0].question, False), return_tensors="pt")


def transformers_image_answers(model, processor, clips, requests, config: AIMConfig | None):
    """Per request, on aim's transformers path with the processor's inputs: the greedy tokens (one of
    the allowed ids where the request restricts them, else up to MAX_TOKENS) and the tokens
    entering the LLM."""
    if is_applied(model):
        remove_aim(model)
    if config is not None:
        apply_aim(model, config)
    tokens, lengths = [], []
    try:
        for clip, request in zip(clips, requests):
            inputs = _inputs(processor, clip, request)
            with torch.no_grad():
                if "allowed_token_ids" in request:
                    logits = model(**inputs).logits[0, -1]
                    allowed = torch.tensor(request["allowed_token_ids"])
                    tokens.append([int(allowed[logits[allowed].argmax()])])
                else:
                    out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
                    tokens.append(out[0, inputs["input_ids"].shape[1]:].tolist())
            lengths.append(last_stats(model).tokens_per_layer[0][0] if config is not None else inputs["input_ids"].shape[1])
        return tokens, lengths
    finally:
        if config is not None:
            remove_aim(model)


def image_parts(model, inputs) -> tuple[int, int, int]:
    """(base view, grid, newline) token counts of the one image in `inputs`, from the unpatched
    model's own packing (`pack_image_features`), independently of the plugin's reading of vLLM's
    count."""
    assert not is_applied(model)
    vision = model.config.vision_config
    base = (vision.image_size // vision.patch_size) ** 2
    with torch.no_grad():
        packed = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-1,
            vision_feature_select_strategy="full", batch_num_images=inputs["batch_num_images"],
        ).pooler_output
    packed = packed[0] if isinstance(packed, (list, tuple)) else packed
    assert packed.shape[0] == int((inputs["input_ids"] == model.config.image_token_index).sum())
    newlines = int((packed == model.model.image_newline).all(dim=-1).sum())
    return base, packed.shape[0] - base - newlines, newlines


@needs_vllm
def test_image_plugin_with_merging_off_serves_as_vllm_does(served_images):
    *_, results = served_images
    assert results["merging off"] == results["no plugin"]


@needs_vllm
def test_image_baseline_served_equals_the_transformers_path(served_images):
    model, processor, clips, requests, results = served_images
    tokens, lengths = transformers_image_answers(model, processor, clips, requests, None)
    assert [r["prompt_tokens"] for r in results["no plugin"]] == lengths
    for ours, theirs in zip(tokens, results["no plugin"]):
        assert ours[: len(theirs["token_ids"])] == theirs["token_ids"]


@needs_vllm
def test_merged_images_served_equal_aim_in_transformers(served_images):
    """Prompt counts (== aim's LLM tokens == the base view and the grid merged as two groups, the
    newlines kept) and greedy answers of the plugin's merged images equal aim's transformers path
    with contiguous positions; the study's image accuracy is printed for the log."""
    model, processor, clips, requests, results = served_images
    config = AIMConfig(merge_keep=MERGE_KEEP, prune=False, merged_positions="contiguous")
    if is_applied(model):
        remove_aim(model)
    parts = [image_parts(model, _inputs(processor, c, r)) for c, r in zip(clips, requests)]
    tokens, lengths = transformers_image_answers(model, processor, clips, requests, config)
    served = results["merging on"]
    assert [r["prompt_tokens"] for r in served] == lengths
    for result, baseline, (base, grid, newlines) in zip(served, results["no plugin"], parts):
        assert newlines > 0 and grid > 0
        merged = merged_anyres_tokens(base, grid, newlines, config.merge_schedule)
        assert result["prompt_tokens"] == baseline["prompt_tokens"] - (base + grid + newlines) + merged
    for ours, theirs in zip(tokens, served):
        assert ours[: len(theirs["token_ids"])] == theirs["token_ids"]
    assert [r["prompt_tokens"] for r in served[ONE_WORD:]] != [served[0]["prompt_tokens"]] * len(RESIZED)
    tokenizer = processor.tokenizer

    def accuracy(rows):
        words = [tokenizer.convert_ids_to_tokens(r["token_ids"][0]) for r in rows[:ONE_WORD]]
        return sum(w == c.qa[0].answer.split(" ")[0] for c, w in zip(clips, words)) / ONE_WORD

    print(f"image accuracy on {ONE_WORD} test images: vLLM baseline {accuracy(results['no plugin']):.1%}, "
          f"vLLM + aim merge {accuracy(served):.1%}", file=sys.stderr)
