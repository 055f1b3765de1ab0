"""The `aim` console entry: the demo and the visualisation run end to end on the embedded trained
model, and bad options are clear errors."""

import json

import pytest

from aim import AIMConfig
from aim import flops as F
from aim.cli import main
from aim.merge import merged_token_count
from aim.study.model import load_default_model


@pytest.fixture(scope="module")
def default_config():
    return load_default_model()[0].config


def test_demo_json(capsys, default_config):
    assert main(["demo", "--repeats", "1", "--questions", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    base, aim = report["baseline"], report["aim"]
    spec = F.video_input(default_config, 8)
    per_frame = spec.visual_groups[0]
    assert base["visual_tokens_before_merge"] == aim["visual_tokens_before_merge"] == spec.visual_tokens
    assert base["visual_tokens_entering_llm"] == spec.visual_tokens
    # paper default: 25% of each frame (+ the video newline)
    assert aim["visual_tokens_entering_llm"] == 8 * merged_token_count(per_frame, (0.5, 0.25)) + 1
    assert aim["kv_cache_entries"] < base["kv_cache_entries"]
    assert len(aim["answers"]) == len(base["answers"]) == 5
    assert 0.0 <= aim["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "options, config",
    [
        (["--merge-keep", "0.5", "--prune-start", "6", "--prune-step", "0.5"],
         AIMConfig(merge_keep=0.5, prune_start=6, prune_step=0.5)),
        (["--no-prune"], AIMConfig(prune=False)),
    ],
)
def test_demo_options_take_effect(options, config, capsys, default_config):
    """The per-layer token counts the demo reports are those the FLOPs model predicts for the
    configuration the options describe."""
    assert main(["demo", "--repeats", "1", "--questions", "2", "--json", *options]) == 0
    report = json.loads(capsys.readouterr().out)
    base, aim = report["baseline"], report["aim"]
    visual = F.video_input(default_config, 8).visual_tokens
    spec = F.video_input(default_config, 8, text_tokens=base["tokens_entering_llm"] - visual)
    expected = [layer.tokens for layer in F.estimate(default_config, spec, config).layers]
    assert aim["tokens_per_layer"] == expected
    assert base["tokens_per_layer"] == [base["tokens_entering_llm"]] * len(expected)


def test_demo_reads_as_a_report(capsys):
    """What model, what input, what setting, the table, one sentence; no loading bar, no raw repr."""
    assert main(["demo", "--repeats", "1", "--questions", "5", "--merge-keep", "0.5"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    heads = [line.split()[0] for line in out.splitlines()[2:] if line and not line.startswith(" ")][:5]
    assert heads[:3] == ["Model", "Input", "Setting"] and "Machine" in heads
    assert "merging keeps 50% of each frame's" in out  # the setting the user asked for, in words
    for label in ("tokens entering the LLM", "KV-cache size (KiB)", "prefill time (ms)", "accuracy", "truth"):
        assert label in out
    assert any(line.startswith("In short: AIM ran the LLM layers on") for line in out.splitlines())
    assert "AIMConfig(" not in out and "Loading weights" not in captured.out + captured.err


def test_subcommand_errors_show_the_subcommand_usage_and_option_names(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--prune-start", "40"])
    err = capsys.readouterr().err
    assert err.startswith("usage: aim demo") and "--prune-start=40 is past the model's last layer" in err
    assert "prune_start" not in err


def test_visualize_writes_a_png(tmp_path, capsys):
    target = tmp_path / "kept.png"
    assert main(["visualize", "--out", str(target), "--index", "3", "--stages", "4"]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "truth:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["demo", "--merge-keep", "1.5"], ["demo", "--prune-start", "40"], ["demo", "--frames", "0"],
     ["visualize", "--kind", "image_colour"], ["visualize", "--index", "-1"], ["visualize", "--stages", "2"]],
)
def test_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
