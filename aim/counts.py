"""Token counts of merging and pooling: pure arithmetic, shared by the engine and the FLOPs model
(no torch import, so ``aim flops`` runs without it)."""

from __future__ import annotations

import math
from typing import Sequence

from .config import visual_tokens_kept


def merge_counts(num_tokens: int, schedule: Sequence[float]) -> list[int]:
    """Tokens merged away at each step for a group of `num_tokens` (shared with the FLOPs model)."""
    counts, current = [], num_tokens
    for keep in schedule:
        target = max(1, visual_tokens_kept(num_tokens, keep))
        # rounding can ask for a hair more than half; a step never removes more than half of the
        # tokens present (floor, as the official AIM code caps r), so e.g. 35 tokens go 35 -> 18 -> 9
        num_merge = max(0, min(current - target, current // 2))
        counts.append(num_merge)
        current -= num_merge
    return counts


def merged_token_count(num_tokens: int, schedule: Sequence[float]) -> int:
    """Tokens left of a group of `num_tokens` after merging down `schedule`."""
    return num_tokens - sum(merge_counts(num_tokens, schedule))


def kept_frames(frames: int, keep: float) -> list[int]:
    """Indices of the frames of a `frames`-frame video that the vision tower encodes with
    ``frame_keep=keep``: ``max(1, round(frames * keep))`` of them, evenly spaced from the first
    frame to the last (``numpy.linspace`` rounded to the nearest frame)."""
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got {frames}")
    count = max(1, visual_tokens_kept(frames, keep))
    if count == 1:
        return [0]
    return [int(math.floor(i * (frames - 1) / (count - 1) + 0.5)) for i in range(count)]


def temporal_frame_sizes(frame_tokens: Sequence[int], keep: float) -> list[int]:
    """Tokens each frame of one video keeps after temporal merging with keep fraction `keep`: the
    first frame all, every later frame ``max(1, round(n * keep))`` of its ``n`` (`aim.temporal`)."""
    return [n if t == 0 or keep >= 1.0 else max(1, visual_tokens_kept(n, keep)) for t, n in enumerate(frame_tokens)]


def grid_side(num_tokens: int) -> int:
    """Side of the square grid of `num_tokens` tokens; a clear error if they form none."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"uniform pooling needs square per-frame token grids, got a group of {num_tokens} tokens "
            "(use merge_method='bipartite' or 'random' for this input)"
        )
    return side


def group_size_after_merge(num_tokens: int, schedule: Sequence[float], method: str = "bipartite") -> int:
    """Tokens a frame / crop of `num_tokens` keeps before the LLM (shared by engine and FLOPs model)."""
    if not schedule or num_tokens < 2:
        return num_tokens
    if method == "bipartite":
        return merged_token_count(num_tokens, schedule)
    if method == "random":
        return max(1, visual_tokens_kept(num_tokens, schedule[-1]))
    if method == "pool":
        rows, cols = pooled_shape(num_tokens, schedule[-1])
        return rows * cols
    raise ValueError(f"unknown merge method {method!r}")


def pooled_shape(num_tokens: int, keep: float) -> tuple[int, int]:
    """Output grid ``(rows, cols)`` of uniform pooling: the grid whose size is closest to `keep`
    of the tokens (square where possible, else one side longer)."""
    side = grid_side(num_tokens)
    target = max(1.0, num_tokens * keep)
    rows = min(side, max(1, math.floor(math.sqrt(target) + 0.5)))
    cols = min(side, max(1, math.floor(target / rows + 0.5)))
    return rows, cols


def merged_item_tokens(frame_tokens: int, frames: int, schedule: Sequence[float], markers: int = 0) -> int:
    """Tokens one image / video keeps after per-frame merging: `frames` frames (temporal slices) of
    `frame_tokens` each, plus `markers` tokens outside every frame (LLaVA-OneVision's closing
    newline), which never merge. Serving engines place this many placeholders before encoding."""
    return frames * group_size_after_merge(frame_tokens, schedule) + markers


def merged_anyres_tokens(base: int, grid: int, newlines: int, schedule: Sequence[float]) -> int:
    """Tokens an any-resolution image (LLaVA-NeXT / OneVision) keeps after merging: its base view of
    `base` tokens and its high-resolution grid of `grid` tokens merge as two groups; the `newlines`
    tokens closing the grid's rows never merge."""
    return group_size_after_merge(base, schedule) + group_size_after_merge(grid, schedule) + newlines


def evs_kept_tokens(frame_tokens: int, frames: int, keep: float) -> int:
    """Tokens a video of `frames` frames of `frame_tokens` each keeps under EVS (vLLM's video
    pruning, `aim.baselines.evs_retention`) at retention `keep`: vLLM's
    ``max(frame_tokens, int(total * (1 - q)))`` with pruning rate ``q = 1 - keep`` (the same float
    arithmetic, so the counts agree with vLLM's), at least the whole first frame."""
    total = frame_tokens * frames
    rate = 1.0 - keep
    return max(frame_tokens, int(total * (1 - rate)))
