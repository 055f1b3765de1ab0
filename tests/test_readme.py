"""The README's commands and `tests/readme_commands.py` stay in step, and optional dependencies
that are missing give one line naming the extra, never a traceback."""

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_commands as rc  # noqa: E402

from aim.cli import main  # noqa: E402
from aim.optional import MissingDependency  # noqa: E402


def test_every_readme_command_has_a_check_and_no_check_is_stale():
    shown = rc.readme_commands(rc.README.read_text(encoding="utf-8"))
    known = [check.readme for check in rc.CHECKS]
    assert len(known) == len(set(known))
    assert sorted(set(shown) - set(known)) == [], "README commands tests/readme_commands.py does not run"
    assert sorted(set(known) - set(shown)) == [], "checks for commands the README no longer shows"


def test_readme_command_parser():
    text = "\n".join([
        "```bash", "pip install -e . && aim demo   # the demo", "MODEL=x/y", 'COMMON="--a 1"', "export A=1",
        "python -m a \\", "  --b 2", "```", "```", "$ aim flops --json", "not a command", "```",
        "```python", "apply_aim(model)", "```",
    ])
    assert rc.readme_commands(text) == ["pip install -e . && aim demo", "python -m a --b 2", "aim flops --json"]


def _without(monkeypatch, *modules):
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError


@pytest.mark.parametrize(
    "argv, extra",
    [(["visualize", "--out", "x.png"], "plot"), (["flops", "--plot", "x.png"], "plot")],
)
def test_missing_matplotlib_is_one_line_naming_the_extra(argv, extra, monkeypatch, capsys, tmp_path):
    _without(monkeypatch, "matplotlib")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pip install 'aim-mllm[{extra}]'" in lines[0] and "matplotlib" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_missing_triton_with_the_triton_backend_names_the_extra(monkeypatch):
    import torch

    from aim.merge import best_match

    _without(monkeypatch, "triton")
    monkeypatch.setenv("AIM_BACKEND", "triton")
    with pytest.raises(MissingDependency, match=r"AIM_BACKEND=triton needs triton.*aim-mllm\[triton\]"):
        best_match(torch.randn(1, 3, 4), torch.randn(1, 3, 4))


def test_missing_video_writer_for_the_lmms_eval_data_names_the_extra(monkeypatch, capsys, tmp_path):
    from aim.integrations.lmms_eval.make_data import main as make_data

    _without(monkeypatch, "av", "cv2")
    with pytest.raises(SystemExit) as stop:
        make_data([str(tmp_path / "synth"), "--videos", "1", "--images", "1"])
    assert stop.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "aim-mllm[eval]" in lines[0]


def test_the_checker_knows_which_extras_are_installed():
    assert rc.installed(None)
    assert rc.installed("test") == (importlib.util.find_spec("pytest") is not None)


def test_a_folder_named_aim_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """A clone in a folder named `aim`, with commands run from the folder above it: `import aim`
    must still find the package, not an empty namespace package made of the clone's root."""
    import subprocess

    (tmp_path / "aim" / "docs").mkdir(parents=True)  # like a clone's root: no __init__.py
    done = subprocess.run([sys.executable, "-c", "import aim; print(aim.__file__); aim.apply_aim"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(str(Path("aim", "__init__.py")))
