"""Test-wide setup.

Triton reads TRITON_INTERPRET when it is first imported, so it has to be set before any test
module imports ``kernels``: without a GPU the kernel tests run in Triton's CPU interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
