"""Drive vLLM in its own virtualenv from aim's: write study-clip requests, run
`aim.integrations.vllm.offline` there, read its results (the vLLM tests and
`benchmarks/vllm_serving.py` use it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np

# the CPU build's workarounds (a sitecustomize.py the vLLM process loads), beside the tests
SUPPORT = Path(__file__).resolve().parents[3] / "tests" / "vllm_support"


def study_requests(workdir: Path, clips: Sequence, processor, one_word: int) -> list[dict]:
    """Requests for `clips` (study examples with videos): their first question's chat prompt with one
    video placeholder; the first `one_word` answer with one of the answer words (as the study
    scores), the rest generate freely."""
    from ...study import data
    from ...study import model as study

    tokenizer = getattr(processor, "tokenizer", processor)
    words = [w for w in data.ANSWER_WORDS if w in tokenizer.get_vocab()]
    word_ids = study.answer_token_ids(processor, words)
    requests = []
    for i, clip in enumerate(clips):
        if not clip.is_video:
            raise ValueError("the vLLM plugin merges LLaVA-OneVision videos; give video clips")
        path = workdir / f"clip{i}.npy"
        np.save(path, clip.pixels)
        ids = tokenizer(study.prompt_text(clip.qa[0].question, True), add_special_tokens=False)["input_ids"]
        request = {"prompt_token_ids": ids, "video": str(path)}
        if i < one_word:
            request.update(max_tokens=1, allowed_token_ids=word_ids)
        requests.append(request)
    return requests


def run_offline(vllm_python: str, model_dir: Path, workdir: Path, requests: list[dict], merge_keep: float | None,
                plugin: bool = True, max_tokens: int = 8, timeout: int = 900, repeats: int = 1) -> dict:
    """Serve `requests` with vLLM offline (`aim.integrations.vllm.offline`) in the virtualenv of
    `vllm_python`; with ``plugin=False`` vLLM loads no plugin (its own model classes)."""
    name = f"{'plugin' if plugin else 'noplugin'}-{merge_keep}"
    request_file, out = workdir / f"{name}.requests.json", workdir / f"{name}.out.json"
    request_file.write_text(json.dumps(requests))
    env = dict(os.environ, PYTHONPATH=str(SUPPORT), AIM_VLLM_CPU_WORKAROUNDS="1")
    if not plugin:
        env["VLLM_PLUGINS"] = ""  # an allow-list that names no plugin
    command = [vllm_python, "-m", "aim.integrations.vllm.offline", "--model", str(model_dir),
               "--requests", str(request_file), "--out", str(out), "--max-tokens", str(max_tokens),
               "--repeats", str(repeats)]
    if merge_keep is not None:
        command += ["--merge-keep", str(merge_keep)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM run {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())
