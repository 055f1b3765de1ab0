"""Optional dependencies: one clear, one-line message naming the extra to install, never a traceback.

    plt = require("matplotlib.pyplot", "plot", "aim visualize")

The extras (setup.py): ``plot`` (matplotlib), ``triton`` (the GPU kernels), ``eval`` (lmms-eval).
"""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "aim-mllm"
# import name -> (pip package, extra that installs it)
PACKAGES = {
    "matplotlib": ("matplotlib", "plot"),
    "triton": ("triton", "triton"),
    "lmms_eval": ("lmms-eval", "eval"),
}


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed (the message says what to install)."""


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]' (in a checkout: pip install -e '.[{extra}]')"


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (e.g. ``"matplotlib.pyplot"``) or raise `MissingDependency` saying that
    `feature` needs it and which extra installs it."""
    top = module.split(".")[0]
    package, extra = PACKAGES[top]
    try:
        if top == "matplotlib":
            importlib.import_module("matplotlib").use("Agg")  # files only, never a window
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] != top:
            raise  # the package is there but broken: its own error says more
        raise MissingDependency(f"{feature} needs {package}, which is not installed: {install_hint(extra)}") from None
