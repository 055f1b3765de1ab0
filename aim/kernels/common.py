"""What every aim Triton kernel does before it launches: where it can run (GPU, or Triton's CPU
interpreter), which ``tl.dot`` precision matches the torch reference, and the interpreter's bf16
work-around."""

from __future__ import annotations

import torch
import triton.language as tl


def interpreted(kernel) -> bool:
    """True when `kernel` can run through Triton's CPU interpreter. ``@triton.jit`` reads
    ``TRITON_INTERPRET`` when a function is defined: for our kernels when this module is first
    imported, for triton's own ``triton.language`` helpers when triton is first imported."""
    return all(type(fn).__name__ == "InterpretedFunction" for fn in (kernel, tl.zeros))


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Raise a clear error for CPU tensors unless `kernel` runs in the Triton interpreter."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if next(iter(devices)).type == "cpu" and not interpreted(kernel):
        raise RuntimeError(
            "the Triton kernels need a GPU; for CPU tensors set TRITON_INTERPRET=1 before triton is "
            "first imported (slow, for tests) or use the torch reference (AIM_BACKEND=torch)"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: full fp32 ("ieee") for fp32 inputs, as the torch references
    compute (torch disables TF32 for matmuls by default); half inputs use tensor cores with fp32
    accumulation, which is exact for the products of fp16/bf16 values."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {dtype}; expected float32, float16 or bfloat16")
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(kernel, dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter keeps bf16 as raw uint16 and its ``tl.dot`` multiplies those bit
    patterns; there the kernels cast bf16 tiles to fp32 before the dot (the same numbers: bf16
    products are exact in fp32). On a GPU the dot takes bf16 directly."""
    return dtype == torch.bfloat16 and interpreted(kernel)
