"""Drive vLLM in its own virtualenv from aim's: write study-clip requests, run
`aim.integrations.vllm.offline` there and read its results, or start its OpenAI-compatible server
and send it chat requests (the vLLM tests and `benchmarks/vllm_serving.py` use it)."""

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
    """Requests for `clips` (study examples, videos or images): their first question's chat prompt
    with one video / image placeholder; the first `one_word` answer with one of the answer words
    (as the study scores), the rest generate freely."""
    from ...study import model as study
    from ...study.evaluate import known_answer_words

    tokenizer = getattr(processor, "tokenizer", processor)
    word_ids = study.answer_token_ids(processor, known_answer_words(processor))
    requests = []
    for i, clip in enumerate(clips):
        path = workdir / f"clip{i}.npy"
        np.save(path, clip.pixels)
        ids = tokenizer(study.prompt_text(clip.qa[0].question, clip.is_video), add_special_tokens=False)["input_ids"]
        request = {"prompt_token_ids": ids, "video" if clip.is_video else "image": str(path)}
        if i < one_word:
            request.update(max_tokens=1, allowed_token_ids=word_ids)
        requests.append(request)
    return requests


def run_offline(vllm_python: str, model_dir: Path, workdir: Path, requests: list[dict], merge_keep: float | None,
                plugin: bool = True, max_tokens: int = 8, timeout: int = 900, repeats: int = 1,
                video_pruning_rate: float | None = None, merged_positions: str | None = None) -> dict:
    """Serve `requests` with vLLM offline (`aim.integrations.vllm.offline`) in the virtualenv of
    `vllm_python`; with ``plugin=False`` vLLM loads no plugin (its own model classes);
    `video_pruning_rate` turns on vLLM's own EVS pruning instead of aim's merging;
    `merged_positions` is the plugin's position rule (default contiguous)."""
    name = f"{'plugin' if plugin else 'noplugin'}-{merge_keep}-evs{video_pruning_rate}-{merged_positions}"
    request_file, out = workdir / f"{name}.requests.json", workdir / f"{name}.out.json"
    request_file.write_text(json.dumps(requests))
    env = vllm_env(plugin)
    command = [vllm_python, "-m", "aim.integrations.vllm.offline", "--model", str(model_dir),
               "--requests", str(request_file), "--out", str(out), "--max-tokens", str(max_tokens),
               "--repeats", str(repeats)]
    if merge_keep is not None:
        command += ["--merge-keep", str(merge_keep)]
    if video_pruning_rate:
        command += ["--video-pruning-rate", str(video_pruning_rate)]
    if merged_positions:
        command += ["--merged-positions", merged_positions]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM run {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def vllm_env(plugin: bool = True) -> dict:
    """The environment of a process in vLLM's virtualenv: the CPU build's workarounds loaded; with
    ``plugin=False`` an allow-list that names no plugin (vLLM's own model classes)."""
    env = dict(os.environ, PYTHONPATH=str(SUPPORT), AIM_VLLM_CPU_WORKAROUNDS="1")
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache:
        # torch inductor writes its precompiled headers (~150 MiB per environment) under the temp dir
        # whatever TORCHINDUCTOR_CACHE_DIR says; where a cache dir is given (CI), vLLM's temp files
        # belong in it too, so that they go when it goes
        Path(cache, "tmp").mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(Path(cache, "tmp"))
    if not plugin:
        env["VLLM_PLUGINS"] = ""
    return env


def video_data_url(vllm_python: str, frames: Path, out: Path, fps: float = 8.0) -> str:
    """A ``data:`` URL of the uint8 frames saved at `frames`, encoded losslessly (FFV1 in Matroska,
    by OpenCV in vLLM's virtualenv), so that vLLM's video loader decodes the exact pixels."""
    import base64

    code = ("import sys, cv2, numpy as np; f = np.load(sys.argv[1]); "
            "w = cv2.VideoWriter(sys.argv[2], cv2.VideoWriter_fourcc(*'FFV1'), float(sys.argv[3]), (f.shape[2], f.shape[1])); "
            "[w.write(cv2.cvtColor(x, cv2.COLOR_RGB2BGR)) for x in f]; w.release()")
    subprocess.run([vllm_python, "-c", code, str(frames), str(out), str(fps)], check=True, env=vllm_env(),
                   capture_output=True, timeout=120)
    return "data:video/x-matroska;base64," + base64.b64encode(out.read_bytes()).decode()


class OpenAIServer:
    """vLLM's OpenAI-compatible server on localhost, started in vLLM's virtualenv; a context manager
    that waits until it answers and stops it on exit."""

    def __init__(self, vllm_python: str, model_dir: Path, merge_keep: float | None, log: Path, startup: float = 600):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                        "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "2048",
                        "--enforce-eager", "--distributed-executor-backend", "uni"]
        if merge_keep is not None:
            self.command += ["--hf-overrides", json.dumps({"aim_merge_keep": merge_keep})]
        self.model, self.log, self.startup = str(model_dir), log, startup

    def __enter__(self) -> "OpenAIServer":
        import time
        import urllib.request

        self.process = subprocess.Popen(self.command, env=vllm_env(), stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({self.process.returncode}):\n{self.log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5)
                return self
            except OSError:
                time.sleep(2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"vLLM's server did not answer within {self.startup:.0f} s:\n{self.log.read_text()[-4000:]}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def chat(self, content: list[dict], **params) -> dict:
        """POST one user message to ``/v1/chat/completions``; the response."""
        import urllib.request

        body = {"model": self.model, "messages": [{"role": "user", "content": content}], **params}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)
