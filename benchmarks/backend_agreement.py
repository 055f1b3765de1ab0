"""Whole-model check of the Triton kernels against the torch references, on a patched model.

tests/test_kernels.py holds each kernel to its reference op by op; this script holds the whole
patched model to itself: the same random-weight LLaVA-OneVision as benchmarks/prefill.py, the same
video prompt, each AIM configuration run once with ``AIM_BACKEND=torch`` (the references) and once
with ``AIM_BACKEND=triton`` (the kernels, which need CUDA or ``TRITON_INTERPRET=1``). It prints,
per configuration, the tokens the first and last layers kept under both backends, whether the same
input positions were kept at every stage (merging and each pruning layer), the relative difference
of the last-position logits, and whether the greedy next token agrees. The kept positions must be equal;
the logits differ by rounding only (the kernels use tf32 / bf16 tensor-core dots where the
reference uses float32 matmuls), and differ more where a near-tie in the similarity or the
importance ranking picked a different token (then "same kept" is False).

    python benchmarks/backend_agreement.py              # GPU: the 0.5b preset of prefill.py
    TRITON_INTERPRET=1 python benchmarks/backend_agreement.py --quick   # CPU, through the interpreter

Exit status 1 when a configuration's kept positions differ or its logits differ by more than --tol.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefill import CONFIGS, SIZES, build_model  # noqa: E402

from aim import apply_aim, last_stats, remove_aim  # noqa: E402
from aim.patch import recording_positions  # noqa: E402
from aim.tiny import make_inputs  # noqa: E402


def run_backend(model, inputs: dict, backend: str) -> tuple[torch.Tensor, list[int], list]:
    """Last-position logits (float32, on the CPU), tokens per layer, and the input positions of
    the visual tokens each stage kept, under one backend."""
    previous = os.environ.get("AIM_BACKEND")
    os.environ["AIM_BACKEND"] = backend  # aim.dispatch reads it at each call
    try:
        with torch.inference_mode(), recording_positions(model):
            logits = model(**inputs, use_cache=False).logits[:, -1].float().cpu()
        stats = last_stats(model)
        return logits, [layer[0] for layer in stats.tokens_per_layer], stats.kept_visual_positions
    finally:
        if previous is None:
            del os.environ["AIM_BACKEND"]
        else:
            os.environ["AIM_BACKEND"] = previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset (CPU with TRITON_INTERPRET=1)")
    parser.add_argument("--size", choices=["0.5b", "7b"], default="0.5b")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default: the preset's)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--tol", type=float, default=None,
                        help="largest relative logits difference allowed (default: 2e-2 bf16, 1e-3 float32)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("without a GPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    tol = args.tol if args.tol is not None else (2e-2 if dtype == "bfloat16" else 1e-3)
    size = "quick" if args.quick else args.size
    _, _, default_frames, text_tokens = SIZES[size]
    model = build_model(size, "sdpa", getattr(torch, dtype), device)
    inputs = make_inputs(model, kind="video", num_frames=args.frames or default_frames,
                         text_lengths=(text_tokens,), seed=0)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}, {dtype}, {size} preset, {inputs['input_ids'].shape[1]} input tokens; tolerance {tol:g}")
    print(f"{'config':18} {'kept (torch)':>14} {'kept (triton)':>14} {'same kept':>9} {'rel. logits diff':>17}"
          f" {'same argmax':>11}")
    failed = False
    try:
        for config_name, config in CONFIGS.items():
            if not config.enabled:
                continue
            apply_aim(model, config)
            ref_logits, ref_kept, ref_positions = run_backend(model, inputs, "torch")
            ker_logits, ker_kept, ker_positions = run_backend(model, inputs, "triton")
            rel = float((ker_logits - ref_logits).norm() / ref_logits.norm())
            # the same input positions kept at every stage (the counts alone are fixed by the schedule)
            same_kept = ref_positions == ker_positions and ref_kept == ker_kept
            same_argmax = bool((ker_logits.argmax(-1) == ref_logits.argmax(-1)).all())
            failed |= not same_kept or not rel <= tol
            print(f"{config_name:18} {f'{ref_kept[0]}->{ref_kept[-1]}':>14} {f'{ker_kept[0]}->{ker_kept[-1]}':>14}"
                  f" {str(same_kept):>9} {rel:>17.2e} {str(same_argmax):>11}")
    finally:
        remove_aim(model)
    print("FAILED: a configuration differs beyond rounding" if failed else "all configurations agree")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
