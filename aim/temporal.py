"""Temporal merging: tokens of a video frame that repeat tokens of earlier frames merge into them.

Run before the per-frame (spatial) merging, on each video's frames in time order (FrameFusion,
arXiv 2501.01986, merges similar tokens of adjacent frames; HoliTom and FlashVID merge along
temporal redundancy). Every token of frame ``t >= 1`` is matched to its most cosine-similar token
among the *original* tokens of the `window` frames before it (`aim.merge.best_match`: the Triton
kernel on GPU). The tokens chosen to merge (the best-matched ones: a fraction per frame, or all
above a similarity threshold) join their match; matches that merged themselves are followed back
to the earliest token that stays (the *root*), so each root stands for a tree of near-duplicates
across time. A root's features become the size-weighted mean of its tree; it keeps its own
position (for 3-D M-RoPE: its own frame and place), and surviving tokens keep their order.

Counts: with a keep fraction every later frame keeps ``max(1, round(n * keep))`` of its ``n``
tokens (`aim.counts.temporal_frame_sizes`, shared with the FLOPs model); the first frame keeps all.
A threshold makes the count depend on the video (the stats report it).
"""

from __future__ import annotations

import torch

from .counts import temporal_frame_sizes
from .merge import best_match


def temporal_matches(frames: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match of each token among the tokens of the `window` frames before its own.

    Args:
        frames: ``(T, n, dim)`` one video's frames in time order.
    Returns:
        ``(score, target)`` ``(T, n)``: similarity (float32) and flat index ``t' * n + j`` into the
        video's ``T * n`` tokens of the best match. Frame 0 (nothing before it) gets score ``-inf``
        and itself as target. Ties go to the nearer frame.
    """
    count, n, _ = frames.shape
    score = torch.full((count, n), float("-inf"), device=frames.device)
    target = torch.arange(count * n, device=frames.device).view(count, n)
    for offset in range(1, min(window, count - 1) + 1):
        # frames offset.. against the frame `offset` before each: one batched matching per offset
        best, index = best_match(frames[offset:], frames[:-offset])
        earlier = torch.arange(count - offset, device=frames.device).unsqueeze(1) * n + index
        better = best > score[offset:]  # strictly better: nearer frames win ties
        score[offset:] = torch.where(better, best, score[offset:])
        target[offset:] = torch.where(better, earlier, target[offset:])
    return score, target


def temporal_destinations(
    frames: torch.Tensor, keep: float = 1.0, threshold: float | None = None, window: int = 1
) -> torch.Tensor:
    """Where each token of a video goes: flat index (into ``T * n``) of the root it merges into,
    itself for tokens that stay (see the module docstring).

    Args:
        frames: ``(T, n, dim)``.
        keep: fraction of each later frame's tokens that stay (``1.0``: none merges).
        threshold: when given, instead of `keep`, every token whose best similarity is at least
            `threshold` merges.
        window: how many earlier frames a token is matched against.
    Returns:
        ``(T * n,)`` long.
    """
    count, n, _ = frames.shape
    dest = torch.arange(count * n, device=frames.device)
    if count < 2 or (threshold is None and keep >= 1.0):
        return dest
    score, target = temporal_matches(frames, window)
    score, target = score[1:], target[1:]
    if threshold is not None:
        merges = score >= threshold
    else:
        num_merge = n - temporal_frame_sizes([n, n], keep)[1]
        order = score.argsort(dim=-1, descending=True, stable=True)[:, :num_merge]
        merges = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)
    dest[n:] = torch.where(merges, target, dest[n:].view(count - 1, n)).flatten()
    # follow matches that merged themselves back to a root: targets lie in earlier frames, so
    # resolving frame by frame, in order, needs one lookup per frame
    for t in range(1, count):
        block = slice(t * n, (t + 1) * n)
        dest[block] = dest[dest[block]]
    return dest


def merge_into(values: torch.Tensor, sizes: torch.Tensor, dest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of each destination's members: ``values`` ``(N, dim)``, ``sizes`` ``(N,)``,
    ``dest`` ``(N,)`` (a token whose `dest` is itself is a destination; others join theirs).

    Returns ``(values, sizes)`` ``(N, dim)`` / ``(N,)``: destinations hold their merged values and
    total sizes; the rows of tokens that merged away are left as they were (the caller drops them).
    """
    weighted = values.float() * sizes.float().unsqueeze(-1)
    total = torch.zeros_like(weighted).index_add_(0, dest, weighted)
    size = torch.zeros_like(sizes, dtype=torch.float32).index_add_(0, dest, sizes.float())
    roots = dest == torch.arange(dest.numel(), device=dest.device)
    out = torch.where(roots.unsqueeze(-1), total / size.clamp_min(1e-12).unsqueeze(-1), values.float())
    return out.to(values.dtype), torch.where(roots, size, sizes.float())
