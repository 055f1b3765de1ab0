"""Per-call state: what one forward of a patched model needs, passed as a value, never kept on
modules, wrappers or controllers.

One patched model may serve many threads and requests with different settings at once. So:

- `CallState` holds everything of one multimodal forward (its config, input ids, the visual
  features it encoded, what it records, its stats). The patched forward makes one per call and
  makes it current in a context variable for the duration of that call only; the text decoder
  reads it from there. Context variables are per thread (and per asyncio task), so two threads
  never see each other's call.
- `settings(model, ...)` sets a config for the calls made inside the block, in this thread only;
  ``model(..., aim_config=...)`` and ``model.generate(..., aim_config=...)`` do the same for one
  call.
- The query / key capture of importance ranking is requested through a context variable too
  (`capture_request`): the hooks are installed once, with the patch, and act only for the call
  that asked.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from .config import AIMConfig
from .stats import AIMStats


@dataclass
class CallState:
    """One multimodal forward of one patched model."""

    owner: Any  # the Controller whose patched forward made this call
    config: AIMConfig
    input_ids: torch.Tensor | None
    recording: dict[str, list] = field(default_factory=lambda: {"image": [], "video": []})
    record_positions: bool = False
    layout_taken: bool = False
    stats: AIMStats | None = None
    budget: Any = None  # aim.budget.Budget of this call, if any
    choice: Any = None  # aim.budget.Choice the engine made for it
    attention_mask: torch.Tensor | None = None  # the prompt's padding mask (a latency budget's frames choice)
    frame_keep: float = 1.0  # fraction of each video's frames the vision tower encoded for this call


@dataclass(frozen=True)
class CallOptions:
    """What `settings` asks of the calls in its block (None: the model's own)."""

    config: AIMConfig | None = None
    record_positions: bool = False
    budget: Any = None  # aim.budget.Budget for the calls in the block
    # (input_ids, attention_mask) of a generation: generate() encodes images / videos before the
    # forward that would carry them, and a latency budget chooses the frames encoded from the prompt
    prompt: Any = None


_CALL: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("aim_call", default=None)
# controller -> options, for the calls of this thread / task; replaced, never mutated
_OPTIONS: contextvars.ContextVar[Mapping[Any, CallOptions]] = contextvars.ContextVar("aim_options", default={})
_CAPTURE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("aim_capture", default=None)


def owned(var: contextvars.ContextVar, owner: Any):
    """The value of `var` in this context if it belongs to `owner` (its ``.owner``), else None."""
    value = var.get()
    return value if value is not None and value.owner is owner else None


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value):
    """`var` set to `value` for the block, in this context only."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def current_call(owner: Any) -> CallState | None:
    """The call of `owner` in progress in this context (None outside one, or for another model)."""
    return owned(_CALL, owner)


def running(state: CallState):
    """Make `state` the call in progress for the block."""
    return scoped(_CALL, state)


def options_for(owner: Any) -> CallOptions:
    return _OPTIONS.get().get(owner, CallOptions())


@contextlib.contextmanager
def call_options(owner: Any, **changes) -> Iterator[None]:
    """Within the block, calls of `owner` in this thread use `changes` (fields of `CallOptions`)."""
    current = dict(_OPTIONS.get())
    base = current.get(owner, CallOptions())
    current[owner] = CallOptions(**{**base.__dict__, **changes})
    token = _OPTIONS.set(current)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


@contextlib.contextmanager
def capture_request(query: torch.nn.Module, key: torch.nn.Module) -> Iterator[dict]:
    """Ask the capture hooks of one attention's query / key modules (`Family.qk_modules`) to store
    their outputs (this context only); yields the dict they fill with ``"q"`` and ``"k"``."""
    request = {"q": query, "k": key, "out": {}}
    token = _CAPTURE.set(request)
    try:
        yield request["out"]
    finally:
        _CAPTURE.reset(token)


class CaptureHook:
    """Forward hook on a q or k projection, installed with the patch: stores the output when the
    current context asked for this very module (`capture_request`), does nothing otherwise."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: torch.nn.Module, args, output) -> None:
        request = _CAPTURE.get()
        if request is not None and request[self.name] is module:
            request["out"][self.name] = output
