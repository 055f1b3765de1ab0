"""The lmms-eval task ``aim_study``: the study's test examples through the real ``python -m lmms_eval``
command line on the shipped trained model, with the accuracy the study's own evaluation computes.

``make_data --study`` writes the examples (lossless clips, PNG images); lmms-eval runs them with
``aim_llava_hf`` (baseline ``aim=off``, the default AIM, and a FLOPs budget with the shipped
calibration profile); the accuracy, per kind and answer by
answer, must equal `aim.study.evaluate` on the same examples with the same AIM settings. The parts
that need lmms-eval (or decord, torchvision) skip with the reason when it is not installed.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from aim.integrations.lmms_eval.tasks.utils import study_process_results

REPO = Path(__file__).resolve().parents[1]
HAS = {name: importlib.util.find_spec(name) is not None for name in ("lmms_eval", "decord", "torchvision", "av", "cv2", "PIL")}
needs_lmms_eval = pytest.mark.skipif(not HAS["lmms_eval"], reason="lmms_eval is not installed (pip install -e '.[eval]')")
needs_decord = pytest.mark.skipif(not HAS["decord"], reason="decord is not installed (pip install -e '.[eval]')")
needs_writer = pytest.mark.skipif(not ((HAS["av"] or HAS["cv2"]) and HAS["PIL"]),
                                  reason="writing the data needs PyAV or OpenCV and Pillow (the eval extra)")
LIMIT = 16  # lmms-eval's --limit: 2 questions of each of the 8 kinds


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    """The first LIMIT + 4 test examples as aim_study data (lmms-eval runs the first LIMIT)."""
    from aim.integrations.lmms_eval.make_data import generate_study

    root = tmp_path_factory.mktemp("lmms_eval_study")
    path = generate_study(root / "study_eval", limit=LIMIT + 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return SimpleNamespace(root=root, outdir=root / "study_eval", rows=rows)


# ---------------------------------------------------------------------------------------------
# The data and the scoring (no lmms-eval needed)
# ---------------------------------------------------------------------------------------------


@needs_writer
def test_study_data_are_the_study_examples(study_data):
    from PIL import Image

    from aim.study import data

    examples = data.dataset("test", LIMIT + 4)
    assert [r["seed"] for r in study_data.rows] == [e.seed for e in examples]
    assert [(r["kind"], r["question"], r["answer"]) for r in study_data.rows] == [
        (e.kind, e.question, e.answer) for e in examples
    ]
    assert [r["modality"] == "video" for r in study_data.rows] == [e.is_video for e in examples]
    assert (study_data.outdir / "aim_study.yaml").is_file()
    for row, example in zip(study_data.rows, examples):
        if not example.is_video:  # PNG: lossless
            with Image.open(row["visual"]) as image:
                assert np.array_equal(np.asarray(image.convert("RGB")), example.pixels)
    if HAS["decord"]:  # make_data checked every clip already; check one here independently
        from decord import VideoReader, cpu

        reader = VideoReader(study_data.rows[0]["visual"], ctx=cpu(0))
        assert np.array_equal(reader.get_batch(list(range(len(reader)))).asnumpy(), examples[0].pixels)


def test_make_data_study_refuses_options_of_the_synthetic_sets(tmp_path, capsys):
    from aim.integrations.lmms_eval.make_data import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "x"), "--study", "--frames", "4"])
    assert stop.value.code == 2 and "--frames" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "aim_study"), "--study"])
    assert stop.value.code == 2 and "other than a task name" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "aim_study").exists()


def test_study_scoring_is_exact_match_per_kind():
    doc = {"answer": "red", "kind": "motion_colour", "modality": "video"}
    assert study_process_results(doc, [" Red "]) == {"accuracy": 1.0, "video_accuracy": 1.0, "motion_colour": 1.0}
    assert study_process_results(doc, [SimpleNamespace(text="red circle")])["accuracy"] == 0.0
    image = {"answer": "left", "kind": "image_position", "modality": "image"}
    assert study_process_results(image, ["up"]) == {"accuracy": 0.0, "image_accuracy": 0.0, "image_position": 0.0}


def test_study_check_lists_budget_runs_it_cannot_reproduce(tmp_path, capsys):
    """A latency-budget run (its choices follow that run's timings) and a FLOPs-budget run batched by
    lmms-eval (a choice fits its whole batch) are listed as not compared, before any model loads;
    with nothing compared the check fails."""
    from aim.integrations.lmms_eval import study_check

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "aim_study.jsonl").write_text(json.dumps({"id": "test-0", "seed": 0, "kind": "count"}) + "\n")
    for name, budget, batch in (("latency", {"flops": None, "ms": 40.0}, 1), ("batched", {"flops": 0.25, "ms": None}, 4)):
        folder = tmp_path / "logs" / name / "model"
        folder.mkdir(parents=True)
        results = {"results": {"aim_study": {"accuracy,none": 1.0}}, "n-samples": {"aim_study": {"effective": 1}},
                   "config": {"model_args": "pretrained=m", "batch_size": batch},
                   "aim_cost": {"pretrained": "m", "aim": {"config": {}, "model_args": {"run": name}, "budget": budget}}}
        (folder / "20261204_results.json").write_text(json.dumps(results))
    report = study_check.compare(tmp_path)
    reasons = {entry["run"]: entry["skipped"] for entry in report}
    assert "latency budget" in reasons["run=latency"] and "--batch_size 4" in reasons["run=batched"]
    assert study_check.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "run=latency: not compared" in out and "no run compared" in out


# ---------------------------------------------------------------------------------------------
# The model's inputs through lmms-eval's path equal the study's
# ---------------------------------------------------------------------------------------------


@needs_lmms_eval
@needs_decord
@pytest.mark.skipif(not HAS["torchvision"], reason="the LLaVA-OneVision video processor needs torchvision")
def test_processor_inputs_equal_the_studys(study_data):
    """What aim_llava_hf hands the model (chat template, processor, clip decoded by decord) is what
    `aim.study.model.to_inputs` builds for the same example."""
    import torch
    from transformers import AutoProcessor

    from aim.integrations.lmms_eval.models.aim_llava_hf import _decord_fetcher
    from aim.study import data
    from aim.study.model import DEFAULT_MODEL_DIR, load_default_model, to_inputs

    model, _ = load_default_model()
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    processor.video_processor.fetch_videos = _decord_fetcher(8)
    examples = data.dataset("test", LIMIT)
    for index in (0, 5):  # a clip and an image
        row, example = study_data.rows[index], examples[index]
        kind = row["modality"]
        content = [{"type": kind, "url": row["visual"]}, {"type": "text", "text": row["question"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        if kind == "video":
            real = processor(text=text, videos=[row["visual"]], return_tensors="pt")
        else:
            from aim.integrations.lmms_eval.tasks.utils import study_doc_to_visual

            real = processor(text=text, images=study_doc_to_visual(row), return_tensors="pt")
        mine = to_inputs([example], processor, model.config)
        assert torch.equal(real["input_ids"], mine["input_ids"])
        key = "pixel_values_videos" if kind == "video" else "pixel_values"
        torch.testing.assert_close(real[key].float(), mine[key], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# The real command line: lmms-eval's accuracy is the study's
# ---------------------------------------------------------------------------------------------


def _entry_point_installed() -> bool:
    return any(ep.value.startswith("aim.integrations.lmms_eval") for ep in entry_points(group="lmms_eval.models"))


def _run(study_data, name: str, aim_args: str) -> subprocess.CompletedProcess:
    from aim.study.model import DEFAULT_MODEL_DIR

    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(study_data.root / "hf_home"), TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    if not _entry_point_installed():
        env["LMMS_EVAL_PLUGINS"] = "aim.integrations.lmms_eval"
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", "aim_llava_hf",
        "--model_args", f"pretrained={DEFAULT_MODEL_DIR},max_frames_num=8,{aim_args}",
        "--device", "cpu", "--include_path", str(study_data.outdir), "--tasks", "aim_study",
        "--limit", str(LIMIT), "--log_samples", "--output_path", str(study_data.outdir / "logs" / name),
    ]
    return subprocess.run(cmd, cwd=study_data.root, env=env, capture_output=True, text=True, timeout=600)


@needs_lmms_eval
@needs_decord
def test_lmms_eval_accuracy_is_the_studys(study_data):
    import torch

    from aim import AIMConfig, apply_aim
    from aim.integrations.lmms_eval.study_check import compare
    from aim.study import data
    from aim.study.evaluate import evaluate
    from aim.study.model import load_default_model

    # a FLOPs budget too (None: apply_aim(model, budget=0.25) with the profile shipped beside the weights)
    settings = {"baseline": ("aim=off", AIMConfig(enabled=False)), "aim": ("aim=on", AIMConfig()),
                "budget": ("aim_budget=0.25", None)}
    results = {}
    for name, (args, _) in settings.items():
        run = _run(study_data, name, args)
        output = run.stdout + run.stderr
        assert run.returncode == 0 and "Error during evaluation" not in output, output[-4000:]
        [path] = glob.glob(str(study_data.outdir / "logs" / name / "*" / "*_results.json"))
        results[name] = json.loads(Path(path).read_text())
        assert results[name]["n-samples"]["aim_study"]["effective"] == LIMIT

    # the study's own evaluation of the same examples, same settings
    torch.set_num_threads(2)
    model, processor = load_default_model()
    examples = data.dataset("test", LIMIT)
    for name, (_, config) in settings.items():
        if config is None:
            apply_aim(model, budget=0.25)
        else:
            apply_aim(model, config)
        # a budget's choice must fit every prompt of a batch: one prompt at a time, as lmms-eval ran them
        study = evaluate(model, processor, examples, batch_size=1 if config is None else 16)
        reported = {k.split(",")[0]: v for k, v in results[name]["results"]["aim_study"].items() if k.endswith(",none")}
        # with AIM one answer may differ: the two paths' pixel values differ by rounding (within 1e-5) and
        # merging's discrete pairing can fall the other way on a near-tie (README: 1-6 answers of 800);
        # the unchanged model has no such choice and must agree exactly
        tolerance = 1e-12 if name == "baseline" else 1 / LIMIT + 1e-12
        assert reported["accuracy"] == pytest.approx(study["accuracy"], abs=tolerance), (name, reported, study)
        for kind, row in study["per_kind"].items():
            assert reported[kind] == pytest.approx(row["accuracy"], abs=1e-12 if name == "baseline" else 1 / row["n"] + 1e-12), \
                (name, kind, reported, study)

    # the same, answer by answer (the samples of --log_samples), through study_check
    report = compare(study_data.outdir)
    assert sorted(entry["run"] for entry in report) == ["aim=off", "aim=on", "aim_budget=0.25"]
    for entry in report:
        allowed = 0 if entry["run"] == "aim=off" else 1
        assert entry["n"] == LIMIT and len(entry["differing_answers"]) <= allowed, entry
        assert entry["differing_metrics"] == [] or len(entry["differing_answers"]) == 1, entry
    base, aim = (results[name]["aim_cost"] for name in ("baseline", "aim"))
    assert base["aim"]["enabled"] is False and aim["aim"]["enabled"] is True
    assert aim["mean_llm_tokens_per_layer"] < 0.5 * base["mean_llm_tokens_per_layer"]
    assert base["failed_generations"] == aim["failed_generations"] == 0
    assert base["budget"] is None and aim["budget"] is None

    # the budgeted run: every prefill ran a calibrated setting (or keep between two) within 25% of the
    # LLM prefill FLOPs, as predicted; the summary counts them
    budgeted = results["budget"]["aim_cost"]
    assert budgeted["budget"]["budget"] == "25% of the prefill FLOPs" and budgeted["failed_generations"] == 0
    assert sum(budgeted["budget"]["settings_run"].values()) == budgeted["budget"]["samples"] == LIMIT
    [samples] = glob.glob(str(study_data.outdir / "logs" / "budget" / "*" / "*_aim_cost_samples.jsonl"))
    rows = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    assert len(rows) == LIMIT
    for row in rows:
        counted = row["prefill_flops"] / row["baseline_prefill_flops"]
        assert counted <= 0.25 + 1e-9 and counted == pytest.approx(row["predicted_flops_fraction"], rel=1e-6), row
    assert budgeted["budget"]["mean_flops_fraction"] <= 0.25 and budgeted["prefill_flops_ratio"] >= 4
