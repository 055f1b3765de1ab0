"""Run requests through vLLM offline (``LLM.generate``) and write what came back: the runner the
vLLM tests and `benchmarks/vllm_serving.py` start in vLLM's own virtualenv.

    python -m aim.integrations.vllm.offline --model DIR --requests req.json --out out.json [--merge-keep 0.25]

Each request is ``{"prompt_token_ids": [...], "video": "frames.npy"}`` (uint8 ``(T, H, W, 3)``) or
``"image": "image.npy"`` (``(H, W, 3)``), with one placeholder token where the video / image goes;
optionally ``"max_tokens"``, ``"allowed_token_ids"`` (e.g. the answer words of a one-word answer),
``"logprobs"`` (how many top log-probabilities to return per token) and ``"video_fps"`` (the
video's frame rate, passed as metadata, which Qwen2.5-VL needs);
the output holds, per request, the prompt's token count after vLLM expanded the placeholder, the
generated token ids, and the run's wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def prepare_checkpoint(source: str | Path, target: str | Path) -> Path:
    """A copy of a transformers-saved model directory that vLLM 0.32 loads: LLaVA-OneVision's
    SigLIP tower is saved by transformers 5.x as ``vision_tower.*``, which vLLM reads as
    ``vision_tower.vision_model.*``."""
    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "draft"))
    for weights in source.glob("*.safetensors"):
        tensors = load_file(weights)
        renamed = {_vllm_name(k): v for k, v in tensors.items()}
        save_file(renamed, target / weights.name, metadata={"format": "pt"})
    return target


def _vllm_name(key: str) -> str:
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def run(model: str, requests: list[dict], merge_keep: float | None, max_tokens: int, allowed_token_ids=None,
        max_model_len: int = 2048, repeats: int = 1, video_pruning_rate: float | None = None,
        merged_positions: str | None = None) -> dict:
    """Serve `requests` (module docstring); `video_pruning_rate`: vLLM's own EVS pruning of videos
    (``--video-pruning-rate``, for the models that support it, e.g. Qwen2.5-VL); `merged_positions`:
    the plugin's position rule (``aim_merged_positions``; default contiguous)."""
    import numpy as np
    from vllm import LLM, SamplingParams

    overrides = {"aim_merge_keep": merge_keep} if merge_keep is not None else {}
    if merged_positions:
        overrides["aim_merged_positions"] = merged_positions
    pruning = {"video_pruning_rate": video_pruning_rate} if video_pruning_rate else {}
    start = time.perf_counter()
    llm = LLM(model=model, dtype="float32", max_model_len=max_model_len, enforce_eager=True, seed=0,
              hf_overrides=overrides, distributed_executor_backend="uni", limit_mm_per_prompt={"image": 1, "video": 1},
              **pruning)
    started = time.perf_counter() - start
    prompts = []
    for request in requests:
        prompt = {"prompt_token_ids": request["prompt_token_ids"]}
        if "video" in request:
            frames = np.load(request["video"])
            if "video_fps" in request:  # Qwen2.5-VL takes (frames, metadata) pairs
                count = len(frames)
                metadata = {"fps": request["video_fps"], "total_num_frames": count, "frames_indices": list(range(count)),
                            "duration": count / request["video_fps"], "do_sample_frames": False}
                frames = (frames, metadata)
            prompt["multi_modal_data"] = {"video": frames}
        elif "image" in request:
            from PIL import Image

            prompt["multi_modal_data"] = {"image": Image.fromarray(np.load(request["image"]))}
        prompts.append(prompt)
    params = [
        SamplingParams(temperature=0.0, max_tokens=request.get("max_tokens", max_tokens),
                       allowed_token_ids=request.get("allowed_token_ids", allowed_token_ids),
                       logprobs=request.get("logprobs"))
        for request in requests
    ]
    times = []
    for _ in range(max(1, repeats)):  # the same batch again: the fastest run is the least disturbed
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return {
        "engine_start_seconds": started,
        "generate_seconds": min(times),
        "generate_seconds_each": times,
        "results": [
            {"prompt_tokens": len(out.prompt_token_ids), "token_ids": list(out.outputs[0].token_ids),
             # per generated token, the top log-probabilities {token id: logprob} (when asked for)
             "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in out.outputs[0].logprobs or []]}
            for out in outputs
        ],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--merge-keep", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="serve the batch this many times, report the fastest")
    parser.add_argument("--video-pruning-rate", type=float, default=None, help="vLLM's own EVS pruning of videos")
    parser.add_argument("--merged-positions", default=None, choices=("contiguous", "destination"),
                        help="the plugin's position rule for merged tokens (destination: Qwen2.5-VL)")
    parser.add_argument("--allowed-token-ids", default=None, help="comma-separated ids the answer may use")
    args = parser.parse_args(argv)
    requests = json.loads(Path(args.requests).read_text())
    allowed = [int(x) for x in args.allowed_token_ids.split(",")] if args.allowed_token_ids else None
    result = run(args.model, requests, args.merge_keep, args.max_tokens, allowed, repeats=args.repeats,
                 video_pruning_rate=args.video_pruning_rate, merged_positions=args.merged_positions)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
