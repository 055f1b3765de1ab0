"""lmms-eval integration: model_args parsing, cost accounting, the synthetic tasks, and the real
``python -m lmms_eval`` command line on a tiny offline checkpoint (baseline vs AIM).

The parts that need lmms-eval skip (with the reason) when it is not importable; the `test` extra
installs it.
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

import pytest

from aim.integrations.lmms_eval.args import AIMArgumentError, allowed_keys, parse_model_args
from aim.integrations.lmms_eval.cost import CostTracker
from aim.integrations.lmms_eval.tasks.utils import extract_choice, process_results

REPO = Path(__file__).resolve().parents[1]
HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
needs_lmms_eval = pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms_eval is not installed (pip install -e '.[eval]')")
LIMIT = 2


def test_ci_runs_the_lmms_eval_tests():
    """CI installs the test extra, which pulls lmms-eval: there the end-to-end tests must run, not skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and not HAS_LMMS_EVAL:
        pytest.fail("CI=true but lmms_eval is not importable: the test extra (pip install -e '.[test]') installs it")


# ---------------------------------------------------------------------------------------------
# --model_args parsing (no lmms-eval needed)
# ---------------------------------------------------------------------------------------------

BASE = {"pretrained", "device", "device_map", "batch_size", "max_frames_num"}


def test_parse_splits_aim_and_base_arguments():
    settings, rest = parse_model_args(
        {"pretrained": "ckpt", "merge_keep": 0.25, "prune_start": 14, "prune_step": 0.125, "device": "cpu"}, BASE,
    )
    assert rest == {"pretrained": "ckpt", "device": "cpu"}
    assert settings.enabled and settings.config.merge_schedule == (0.5, 0.25)
    assert (settings.config.prune_start, settings.config.prune_step) == (14, 0.125)
    assert settings.config.keep_ratios(28)[14:22] == (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0)


@pytest.mark.parametrize("value", ["off", "false", False, 0, "no"])
def test_parse_aim_off_is_the_unchanged_model(value):
    settings, rest = parse_model_args({"pretrained": "ckpt", "aim": value}, BASE)
    assert not settings.enabled and not settings.config.enabled and rest == {"pretrained": "ckpt"}


@pytest.mark.parametrize(
    "value, expected",
    [("[0.5,0.25]", (0.5, 0.25)), ("0.5:0.25", (0.5, 0.25)), ("0.5;0.3", (0.5, 0.3)), (0.5, (0.5,)), ("", ())],
)
def test_parse_list_forms(value, expected):
    settings, _ = parse_model_args({"merge_schedule": value}, BASE)
    assert settings.config.merge_schedule == expected


def test_parse_prefixed_names_and_plugin_options(tmp_path):
    settings, rest = parse_model_args(
        {"aim_merge_keep": "0.5", "aim_prune": "off", "aim_output": str(tmp_path / "c.json"), "aim_flops": "off",
         "tau": "0.2", "pagerank_iterations": "3", "prune_mode": "mask", "pretrained": "x"}, BASE,
    )
    config = settings.config
    assert config.merge_schedule == (0.5,) and config.prune is False and config.tau == 0.2
    assert config.pagerank_iterations == 3 and config.prune_mode == "mask"
    assert settings.output == str(tmp_path / "c.json") and settings.flops is False and rest == {"pretrained": "x"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"merge_kep": 0.25}, "unknown model argument 'merge_kep'"),
        ({"aim_merge": 0.25}, "unknown AIM option 'aim_merge'"),
        ({"merge_keep": 2}, "merge_keep must be in (0, 1]"),
        ({"merge_keep": "quarter"}, "merge_keep='quarter': expected a number"),
        ({"merge_schedule": "0.5:0.1"}, "at most half"),
        ({"merge_schedule": "[0.5,"}, "not a list of numbers"),
        ({"prune_start": "middle"}, "prune_start='middle': expected an integer"),
        ({"prune_start": 0}, "prune_start must be an integer >= 1"),
        ({"prune_step": 1.5}, "prune_step must be in (0, 1]"),
        ({"prune_keep_ratios": "1:0.5:0.75"}, "non-increasing"),
        ({"prune_keep_ratios": "1:0.5", "prune_start": 3}, "not both"),
        ({"tau": 0}, "tau must be > 0"),
        ({"prune_mode": "drop"}, "prune_mode must be one of"),
        ({"aim": "maybe"}, "aim='maybe': expected on/off"),
        ({"aim": "on", "enabled": False}, "contradicts"),
        ({"merge_keep": 0.5, "aim_merge_keep": 0.25}, "given twice"),
    ],
)
def test_parse_errors_are_clear(kwargs, message):
    with pytest.raises(AIMArgumentError) as error:
        parse_model_args(kwargs, BASE, model="aim_llava_hf")
    text = str(error.value)
    assert message in text and text.startswith("aim_llava_hf:")
    assert isinstance(error.value, ValueError)


def test_unknown_key_lists_what_is_allowed():
    with pytest.raises(AIMArgumentError) as error:
        parse_model_args({"frames": 8}, BASE, model="aim_llava_hf", base="lmms-eval LlavaHf")
    text = str(error.value)
    assert all(key in text for key in allowed_keys()) and "max_frames_num" in text and "LlavaHf" in text


def test_parse_budget_options():
    settings, rest = parse_model_args(
        {"pretrained": "x", "aim_budget_ms": "250", "aim_budget_quantile": "0.95", "aim_profile": "p.json",
         "aim_interpolate_keeps": "off"}, BASE,
    )
    assert rest == {"pretrained": "x"} and settings.enabled
    assert (settings.budget.flops, settings.budget.ms, settings.budget.quantile) == (None, 250.0, 0.95)
    assert settings.profile == "p.json" and settings.interpolate_keeps is False
    recorded = settings.as_dict()
    assert recorded["budget"]["describe"] == "250 ms prefill (p95)" and recorded["model_args"]["aim_budget_ms"] == "250"
    flops, _ = parse_model_args({"aim_budget": 0.25, "aim": "on"}, BASE)
    assert flops.budget.flops == 0.25 and flops.profile is None and flops.interpolate_keeps is True
    plain, _ = parse_model_args({"merge_keep": 0.5}, BASE)
    assert plain.budget is None and "budget" not in plain.as_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"aim_budget": 0.25, "merge_keep": 0.5}, "give either AIM settings (merge_keep) or a budget"),
        ({"aim_budget": 0.25, "aim": "off"}, "aim=off contradicts a budget"),
        ({"aim_profile": "p.json"}, "aim_profile applies only with a budget: add aim_budget="),
        ({"aim_budget_quantile": 0.9, "aim_profile": "p.json"}, "aim_budget_quantile and aim_profile apply only with a budget"),
        ({"aim_budget": 0.3, "aim_budget_ms": 100}, "give exactly one budget"),
        ({"aim_budget": 1.5}, "a FLOPs budget is a fraction of the unchanged model's prefill FLOPs in (0, 1], got 1.5"),
        ({"aim_budget": 0.3, "aim_budget_quantile": 0.9}, "a budget quantile applies to latency budgets"),
        ({"aim_budget_ms": "fast"}, "aim_budget_ms='fast': expected a number"),
        ({"aim_budget_ms": 100, "aim_budget_quantile": 1.0}, "quantile is the share of prefills"),
        ({"aim_budget": 0.3, "aim_interpolate_keeps": "maybe"}, "aim_interpolate_keeps='maybe': expected on/off"),
    ],
)
def test_parse_budget_errors_are_clear(kwargs, message):
    with pytest.raises(AIMArgumentError) as error:
        parse_model_args(kwargs, BASE, model="aim_llava_hf")
    assert message in str(error.value) and str(error.value).startswith("aim_llava_hf: bad AIM arguments (")


# ---------------------------------------------------------------------------------------------
# Cost accounting and task hooks (no lmms-eval needed)
# ---------------------------------------------------------------------------------------------


def _stats(before, after, per_layer, full, mode="remove"):
    return SimpleNamespace(
        input_tokens=full, visual_tokens_before_merge=before, visual_tokens_after_merge=after,
        tokens_per_layer=per_layer, mode=mode,
    )


def test_cost_tracker_summary():
    tracker = CostTracker(model="m", pretrained=None, aim={"enabled": True}, num_layers=2,
                          counter=lambda layers: sum(n * n for n in layers))
    tracker.add_stats(_stats([100], [25], [[40], [20]], [115]), [("video", 0)])
    tracker.add_stats(_stats([100, 50], [25, 10], [[40, 25], [30, 15]], [115, 65]), [("image", 0), ("image", 1)])
    tracker.add_failure(RuntimeError("boom"))
    s = tracker.summary()
    assert s["num_samples"] == 3 and s["failed_generations"] == 1 and "RuntimeError: boom" in s["failures"][0]
    assert s["mean_visual_tokens_before_merge"] == pytest.approx(250 / 3)
    assert s["visual_token_ratio"] == pytest.approx(250 / 60)
    base = 2 * (115**2) * 2 + 2 * 65**2
    ours = 40**2 + 20**2 + 40**2 + 30**2 + 25**2 + 15**2
    assert s["prefill_flops_ratio"] == pytest.approx(base / ours)
    assert s["per_task"]["image"]["num_samples"] == 2 and s["per_task"]["video"]["mean_input_tokens"] == 115
    # a batch whose documents are not known keeps the task only
    added = tracker.add_stats(_stats([10, 10], [5, 5], [[8, 8]], [9, 9]), [("image", 3)])
    assert [(r.task, r.doc_id) for r in added] == [("image", None), ("image", None)]


def test_cost_tracker_reports_the_budgeted_choices():
    """Under a budget each sample records the setting that ran and its prefill's predicted and
    measured cost; the summary counts the settings per sample, compares the FLOPs per sample and
    the times per prefill (a batch is one prefill: its time counts once)."""
    budget = {"describe": "30 ms prefill (p90)", "ms": 30.0, "flops": None}
    tracker = CostTracker(model="m", pretrained=None, aim={"enabled": True, "budget": budget}, num_layers=2,
                          counter=lambda layers: sum(layers))
    for point, fraction, predicted, measured, batch in (
            ("merge 0.5", 0.5, 0.020, 0.025, 1), ("merge 0.25", 0.25, 0.012, 0.040, 1),
            ("merge 0.5", 0.5, 0.021, 0.019, 1), ("merge 0.75", 0.75, 0.030, 0.010, 2)):
        stats = _stats([100] * batch, [50] * batch, [[60] * batch, [40] * batch], [110] * batch)
        stats.budget = {"point": point, "predicted_flops_fraction": fraction, "predicted_seconds": predicted,
                        "measured_seconds": measured}
        tracker.add_stats(stats, [("video", i) for i in range(batch)])
    summary = tracker.summary()["budget"]
    assert summary["settings_run"] == {"merge 0.5": 2, "merge 0.75": 2, "merge 0.25": 1}
    assert (summary["samples"], summary["prefills"]) == (5, 4)
    assert summary["mean_predicted_flops_fraction"] == pytest.approx(2.75 / 5)
    assert summary["mean_flops_fraction"] == pytest.approx(100 / 220)  # counted from the tokens that ran
    assert summary["mean_predicted_ms"] == pytest.approx(83 / 4) and summary["mean_measured_ms"] == pytest.approx(23.5)
    assert summary["within_budget"] == pytest.approx(3 / 4)
    line = tracker.summary_line()
    assert "(budget 30 ms prefill (p90))" in line and "settings run: merge 0.5 x2, merge 0.75 x2, merge 0.25 x1" in line
    assert "75% of prefills within the budget" in line
    assert CostTracker(model="m", pretrained=None, aim={"enabled": True}).summary()["budget"] is None


def test_cost_tracker_without_flops_and_mask_mode(tmp_path):
    tracker = CostTracker(model="m", pretrained=None, aim={"enabled": True})
    tracker.add_stats(_stats([16], [4], [[10]], [20]))
    s = tracker.summary()
    assert "mean_prefill_tflops" not in s and s["mean_visual_tokens_after_merge"] == 4
    masked = CostTracker(model="m", pretrained=None, aim={}, counter=lambda layers: sum(layers))
    masked.add_stats(_stats([16], [4], [[10]], [20], mode="mask"))
    assert masked.summary()["prefill_flops_ratio"] == 1.0  # masking computes on every token
    path = tracker.write(tmp_path / "cost.json", tmp_path / "samples.jsonl")
    assert json.loads(path.read_text())["num_samples"] == 1
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "prediction, expected",
    [("B", "B"), ("(C) up", "C"), ("A.", "A"), ("the answer is (D)", "D"), ("red", "B"), ("w14 in w14", None), ("", None)],
)
def test_extract_choice(prediction, expected):
    assert extract_choice(prediction, ["blue", "red", "up", "down"]) == expected


def test_process_results_scores_letters():
    doc = {"options": ["left", "right", "up", "down"], "answer": "C"}
    assert process_results(doc, ["C"]) == {"accuracy": 1.0}
    assert process_results(doc, [SimpleNamespace(text="(A)")]) == {"accuracy": 0.0}


def test_make_data_refuses_a_folder_named_like_the_task(tmp_path, capsys):
    from aim.integrations.lmms_eval.make_data import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "aim_synth")])
    assert exit_info.value.code == 2
    assert "other than a task name" in capsys.readouterr().err
    assert not (tmp_path / "aim_synth").exists()


def test_make_data_is_deterministic(tmp_path):
    pytest.importorskip("PIL")
    if importlib.util.find_spec("av") is None and importlib.util.find_spec("cv2") is None:
        pytest.skip("writing videos needs PyAV or OpenCV (installed with lmms-eval)")
    from aim.integrations.lmms_eval.make_data import TASK_FILES, generate

    rows = []
    for name in ("a", "b"):
        files = generate(tmp_path / name, videos=2, images=2, frames=4, size=48, seed=3)
        rows.append([json.loads(line) for line in files["video"].read_text().splitlines()]
                    + [json.loads(line) for line in files["image"].read_text().splitlines()])
        assert all((tmp_path / name / task).is_file() for task in TASK_FILES)
    strip = [{k: v for k, v in row.items() if k not in ("video", "image")} for row in rows[0]]
    assert strip == [{k: v for k, v in row.items() if k not in ("video", "image")} for row in rows[1]]
    assert [r["category"] for r in strip] == ["colour", "direction", "colour", "shape"]
    for row in strip:
        assert row["answer"] in "ABCD" and row["options"][ord(row["answer"]) - 65] == row["answer_text"]
    assert all(Path(r.get("video") or r["image"]).is_file() for r in rows[0])


# ---------------------------------------------------------------------------------------------
# With lmms-eval: the model classes and the real command line
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_setup(tmp_path_factory):
    """Synthetic data + task files and a tiny LLaVA-OneVision checkpoint with its processor."""
    from aim.integrations.lmms_eval.checkpoint import build_checkpoint
    from aim.integrations.lmms_eval.make_data import generate

    root = tmp_path_factory.mktemp("lmms_eval")
    generate(root / "synth", videos=LIMIT, images=LIMIT, frames=8, size=96, seed=0)
    checkpoint = build_checkpoint(root / "tiny-llava-ov", num_layers=4, hidden_size=64)
    return SimpleNamespace(root=root, tasks=root / "synth", checkpoint=checkpoint)


def _entry_point_installed() -> bool:
    return any(ep.value.startswith("aim.integrations.lmms_eval") for ep in entry_points(group="lmms_eval.models"))


def _run_lmms_eval(setup, name: str, model_args: str, extra: tuple[str, ...] = (), model: str = "aim_llava_hf",
                   base_args: str | None = None, limit: int = LIMIT) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(setup.root / "hf_home"), TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    if not _entry_point_installed():  # aim installed without its entry points: lmms-eval's legacy variable
        env["LMMS_EVAL_PLUGINS"] = "aim.integrations.lmms_eval"
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", model,
        "--model_args", f"{base_args or f'pretrained={setup.checkpoint},max_frames_num=8'},{model_args}",
        "--device", "cpu", "--batch_size", "1", "--include_path", str(setup.tasks), "--tasks", "aim_synth",
        "--limit", str(limit), "--output_path", str(setup.root / name), *extra,
    ]
    return subprocess.run(cmd, cwd=setup.root, env=env, capture_output=True, text=True, timeout=600)


def _outputs(setup, name: str) -> tuple[dict, dict]:
    results = glob.glob(str(setup.root / name / "*" / "*_results.json"))
    costs = glob.glob(str(setup.root / name / "*" / "*_aim_cost.json"))
    assert len(results) == 1 and len(costs) == 1, (results, costs)
    assert Path(costs[0]).name == Path(results[0]).name.replace("_results.json", "_aim_cost.json")
    return json.loads(Path(results[0]).read_text()), json.loads(Path(costs[0]).read_text())


@needs_lmms_eval
def test_models_are_registered():
    if not _entry_point_installed():
        pytest.skip("the lmms_eval.models entry point is not installed (pip install -e .)")
    from lmms_eval.models import get_model

    from aim.integrations.lmms_eval.models.aim_llava_hf import AimLlavaHf, AimLlavaHfChat
    from aim.integrations.lmms_eval.models.aim_qwen3_vl import AimQwen3VL, AimQwen3VLChat

    assert get_model("aim_llava_hf") is AimLlavaHfChat and get_model("aim_llava_hf", force_simple=True) is AimLlavaHf
    for name in ("aim_qwen2_vl", "aim_qwen2_5_vl", "aim_qwen3_vl"):
        assert get_model(name).AIM_MODEL_ID == name
    assert get_model("aim_qwen3_vl") is AimQwen3VLChat and get_model("aim_qwen3_vl", force_simple=True) is AimQwen3VL


@needs_lmms_eval
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"merge_keep": 3}, "merge_keep must be in (0, 1]"),
        ({"prune_start": 9}, "prune_start=9 is past the model's last layer"),  # the tiny model has 4 layers
        ({"bogus": 1}, "unknown model argument 'bogus'"),
        ({"aim_budget": 0.25}, "a budget needs a calibration profile, and no aim_profile.json in"),
        ({"aim_budget": 0.25, "aim_profile": str(REPO / "aim" / "default_model" / "aim_profile.json")},
         "calibrated for another model"),
        ({"aim_budget_ms": 50, "aim_profile": "missing.json"}, "aim_profile=missing.json: cannot read an AIM profile"),
    ],
)
def test_bad_model_args_stop_before_loading(offline_setup, kwargs, message, monkeypatch):
    from aim.integrations.lmms_eval.models.aim_llava_hf import AimLlavaHf

    monkeypatch.setattr(AimLlavaHf, "_aim_install", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(AIMArgumentError, match="aim_llava_hf") as error:
        AimLlavaHf(pretrained=str(offline_setup.checkpoint), device="cpu", **kwargs)
    assert message in str(error.value)


@needs_lmms_eval
def test_lmms_eval_cli_baseline_vs_aim(offline_setup):
    runs = {
        "baseline": _run_lmms_eval(offline_setup, "baseline", "aim=off"),
        "aim": _run_lmms_eval(offline_setup, "aim", "merge_keep=0.25,prune_start=2,prune_step=0.5"),
    }
    out = {}
    for name, run in runs.items():
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        assert "Error during evaluation" not in run.stdout + run.stderr, run.stdout[-4000:] + run.stderr[-4000:]
        results, cost = _outputs(offline_setup, name)
        for task in ("aim_synth_video", "aim_synth_image"):
            assert 0.0 <= results["results"][task]["accuracy,none"] <= 1.0
            assert cost["per_task"][task]["num_samples"] == LIMIT
        assert results["aim_cost"]["num_samples"] == cost["num_samples"] == 2 * LIMIT
        assert cost["failed_generations"] == 0, cost["failures"]
        assert f"[aim] aim_llava_hf ({'aim=off' if name == 'baseline' else 'AIM'})" in run.stdout
        out[name] = cost

    base, aim = out["baseline"], out["aim"]
    assert base["aim"]["enabled"] is False and aim["aim"]["enabled"] is True
    assert base["mean_visual_tokens_before_merge"] == base["mean_visual_tokens_after_merge"]
    assert aim["mean_visual_tokens_before_merge"] == base["mean_visual_tokens_before_merge"]  # same prompts
    assert aim["mean_visual_tokens_after_merge"] < 0.3 * base["mean_visual_tokens_after_merge"]
    # 8 frames x 16 tokens + 1 newline -> 8 x 4 + 1 after merging to 25%
    video = aim["per_task"]["aim_synth_video"]
    assert (video["mean_visual_tokens_before_merge"], video["mean_visual_tokens_after_merge"]) == (129, 33)
    assert aim["mean_llm_tokens_per_layer"] < base["mean_llm_tokens_per_layer"]
    if "mean_prefill_tflops" in aim:  # aim.flops present
        assert base["mean_prefill_tflops"] == pytest.approx(aim["mean_baseline_prefill_tflops"])
        assert aim["prefill_flops_ratio"] > 2 and base["prefill_flops_ratio"] == 1.0


@needs_lmms_eval
def test_lmms_eval_cli_bad_aim_argument(offline_setup):
    run = _run_lmms_eval(offline_setup, "bad", "merge_keep=1.5")
    text = run.stdout + run.stderr
    assert "aim_llava_hf: bad AIM arguments (merge_keep=1.5): merge_keep must be in (0, 1]" in text
    assert not glob.glob(str(offline_setup.root / "bad" / "*" / "*_results.json"))


@needs_lmms_eval
def test_qwen3_vl_model_runs_the_synthetic_task(offline_setup):
    """aim_qwen3_vl (lmms-eval's qwen3_vl + AIM) on a tiny offline Qwen3-VL: it loads, AIM is applied
    (the argument checks run first), and the real command line answers a video and an image."""
    pytest.importorskip("qwen_vl_utils", reason="lmms-eval's qwen3_vl reads its media with qwen_vl_utils")
    from aim.families import family_for_model_type
    from aim.integrations.lmms_eval.checkpoint import build_checkpoint
    from aim.integrations.lmms_eval.models.aim_qwen3_vl import AimQwen3VL

    if family_for_model_type("qwen3_vl") is None:
        pytest.skip("aim has no Qwen3-VL family (aim/families/qwen3_vl.py)")
    checkpoint = build_checkpoint(offline_setup.root / "tiny-qwen3-vl", family="qwen3_vl")
    with pytest.raises(AIMArgumentError, match="prune_start=9 is past the model's last layer"):
        AimQwen3VL(pretrained=str(checkpoint), device="cpu", device_map="cpu", prune_start=9)
    run = _run_lmms_eval(offline_setup, "qwen3", "merge_keep=0.5", model="aim_qwen3_vl", limit=1,
                         base_args=f"pretrained={checkpoint},device_map=cpu,max_num_frames=8")
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "Error during evaluation" not in output, output[-4000:]
    results, cost = _outputs(offline_setup, "qwen3")
    assert set(results["results"]) >= {"aim_synth_video", "aim_synth_image"}
    assert cost["model"] == "aim_qwen3_vl" and cost["failed_generations"] == 0, cost.get("failures")
    video = cost["per_task"]["aim_synth_video"]
    assert video["mean_visual_tokens_after_merge"] == video["mean_visual_tokens_before_merge"] / 2
