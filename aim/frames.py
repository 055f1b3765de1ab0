"""Fewer frames through the vision tower (``AIMConfig.frame_keep``).

The patched ``get_video_features`` encodes only the frames kept (`aim.counts.kept_frames`) and
hands the model features of the full video's shape, so that transformers' placeholder check and
``masked_scatter`` see what they expect: the frames not encoded get zeros, and their positions are
reported as *dropped* to the engine, which removes them before the first decoder layer (they never
reach a layer, the KV cache or the logits). Written for the LLaVA families' video features in
transformers 5.21-5.25: ``pixel_values_videos`` ``(videos, frames, channels, height, width)`` in,
``pooler_output`` ``(videos, frames * tokens + markers, dim)`` out, markers (LLaVA-OneVision's
closing newline) after the frames.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from .counts import kept_frames


def encode_kept_frames(
    original: Callable, args: tuple, kwargs: dict, call: inspect.BoundArguments, keep: float, markers: int
) -> tuple[Any, list[list[torch.Tensor]] | None]:
    """Run the video feature function `original` (called with `args`, `kwargs`, bound as `call`)
    on the kept frames of each video. Only ``pooler_output`` is laid out for every frame: the
    tower's ``last_hidden_state`` / ``hidden_states`` in the output hold the kept frames only.

    Returns ``(output, dropped)``: the output with ``pooler_output`` laid out for every frame, and
    per video the feature indices of the frames not encoded (one tensor in a list, the shape of
    `aim.layout` item groups); ``dropped`` is None when every frame was kept.
    """
    pixels = call.arguments.get("pixel_values_videos")
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 5:
        raise ValueError(
            "frame_keep needs the videos as pixel_values_videos of shape (videos, frames, channels, height, "
            f"width); got {type(pixels).__name__} {tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else ''}"
        )
    frames = pixels.shape[1]
    kept = kept_frames(frames, keep)
    if len(kept) == frames:
        return original(*args, **kwargs), None
    if "pixel_values_videos" in kwargs:
        output = original(*args, **{**kwargs, "pixel_values_videos": pixels[:, kept]})
    else:  # given positionally
        index = list(call.signature.parameters).index("pixel_values_videos")
        output = original(*args[:index], pixels[:, kept], *args[index + 1 :], **kwargs)
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise ValueError(
            "frame_keep needs the video features as a ModelOutput with pooler_output (the default "
            f"return_dict=True); got {type(output).__name__}"
        )
    if not isinstance(pooled, torch.Tensor) or pooled.ndim != 3 or (pooled.shape[1] - markers) % len(kept):
        raise ValueError(
            f"frame_keep: unexpected video features {type(pooled).__name__} "
            f"{tuple(getattr(pooled, 'shape', ()))} for {len(kept)} frames and {markers} marker token(s); "
            "this transformers release may lay video features out differently"
        )
    videos, width = pooled.shape[0], pooled.shape[1] - markers
    per_frame = width // len(kept)
    full = pooled.new_zeros(videos, frames * per_frame + markers, pooled.shape[-1])
    by_frame = full[:, : frames * per_frame].view(videos, frames, per_frame, -1)
    by_frame[:, kept] = pooled[:, :width].view(videos, len(kept), per_frame, -1)
    full[:, frames * per_frame :] = pooled[:, width:]
    output.pooler_output = full
    dropped_frames = torch.tensor(sorted(set(range(frames)) - set(kept)))
    dropped = (dropped_frames.unsqueeze(1) * per_frame + torch.arange(per_frame)).flatten()
    return output, [[dropped] for _ in range(videos)]


def without_dropped(item_groups: list[list[torch.Tensor]], dropped: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Each item's merge groups less those lying in its dropped frames (a frame is one group)."""
    out = []
    for groups, gone in zip(item_groups, dropped):
        removed = torch.cat(gone) if gone else torch.empty(0, dtype=torch.long)
        out.append([g for g in groups if not bool(torch.isin(g, removed).any())])
    return out
