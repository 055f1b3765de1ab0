"""The `aim` console entry: the demo runs end to end and bad options are clear errors."""

import json

import pytest

from aim.cli import main


def test_demo_json(capsys):
    assert main(["demo", "--frames", "2", "--repeats", "1", "--new-tokens", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    base, aim = report["baseline"], report["aim"]
    assert base["visual_tokens_before_merge"] == aim["visual_tokens_before_merge"] == 2 * 196 + 1
    assert aim["visual_tokens_entering_llm"] == 2 * 49 + 1  # paper default: 25% of each frame
    assert aim["kv_cache_entries"] < base["kv_cache_entries"]
    assert len(aim["generated_ids"]) == 2


def test_demo_table(capsys):
    assert main(["demo", "--frames", "1", "--repeats", "1", "--new-tokens", "1", "--merge-keep", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "tokens entering LLM" in out and "KV-cache MiB" in out and "prefill ms" in out


@pytest.mark.parametrize("argv", [["demo", "--merge-keep", "1.5"], ["demo", "--prune-start", "40"], ["demo", "--frames", "0"]])
def test_demo_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
