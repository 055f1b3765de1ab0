"""Bipartite soft matching (ToMe, arXiv 2210.09461) with size tracking.

Works on groups of visual tokens of equal length (one group = one frame or one
image crop), batched as ``(groups, tokens, dim)``. Surviving tokens keep their
original order, and each carries the original position of its destination
token, so a merged token takes its destination token's position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .counts import merge_counts, merged_token_count  # noqa: F401 (re-exported)
from .dispatch import backend_for


def best_match_reference(set_a: torch.Tensor, set_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of `set_a` its most cosine-similar token of `set_b`.

    Args:
        set_a: ``(groups, Na, dim)``. set_b: ``(groups, Nb, dim)``, ``Nb >= 1``.
    Returns:
        ``(best_score, best_index)``, each ``(groups, Na)``; scores in float32.
    """
    a = set_a.float()
    b = set_b.float()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a @ b.transpose(-1, -2)).max(dim=-1)


def best_match(set_a: torch.Tensor, set_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in `set_b` for each token of `set_a` (see `best_match_reference`): the Triton
    kernel for CUDA tensors when triton is installed, else the reference (`aim.dispatch`)."""
    if backend_for(set_a) == "triton":
        from .kernels.matching import best_match_triton

        return best_match_triton(set_a, set_b)
    return best_match_reference(set_a, set_b)


@dataclass
class MergedTokens:
    """Result of merging: tokens in original order with their sizes and source positions."""

    features: torch.Tensor  # (groups, n_kept, dim)
    sizes: torch.Tensor  # (groups, n_kept) how many original tokens each one stands for
    index: torch.Tensor  # (groups, n_kept) original position (within the group) of each survivor
    carry: torch.Tensor | None = None  # (groups, n_kept, extra) per-token features merged alike


def merge_step(
    features: torch.Tensor, sizes: torch.Tensor, index: torch.Tensor, num_merge: int, match_dims: int | None = None
) -> MergedTokens:
    """One bipartite step: merge the `num_merge` A-tokens (even positions) that best
    match a B-token (odd positions) into that B-token, as a size-weighted mean.

    `match_dims`: only the first `match_dims` features decide the matching (the rest are carried
    features, e.g. Qwen3-VL's DeepStack features, averaged with the same weights); default all.
    """
    groups, n, dim = features.shape
    if num_merge <= 0:
        return MergedTokens(features, sizes, index)
    num_a = (n + 1) // 2
    if n < 2 or num_merge > num_a:
        raise ValueError(f"cannot merge {num_merge} of {n} tokens in one bipartite step (at most {num_a}, n >= 2)")
    matched = features if match_dims is None else features[..., :match_dims]
    score, partner = best_match(matched[:, ::2], matched[:, 1::2])
    order = score.argsort(dim=-1, descending=True, stable=True)
    merged_a, kept_a = order[:, :num_merge], order[:, num_merge:]

    weighted = features.float() * sizes.unsqueeze(-1)
    w_a, w_b = weighted[:, ::2], weighted[:, 1::2]
    s_a, s_b = sizes[:, ::2], sizes[:, 1::2]
    dst = partner.gather(1, merged_a)
    w_b = w_b.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, dim), w_a.gather(1, merged_a.unsqueeze(-1).expand(-1, -1, dim)))
    s_b = s_b.scatter_add(1, dst, s_a.gather(1, merged_a))

    keep_a_sorted = kept_a.sort(dim=-1).values
    out_w = torch.cat([w_a.gather(1, keep_a_sorted.unsqueeze(-1).expand(-1, -1, dim)), w_b], dim=1)
    out_s = torch.cat([s_a.gather(1, keep_a_sorted), s_b], dim=1)
    out_i = torch.cat([index[:, ::2].gather(1, keep_a_sorted), index[:, 1::2]], dim=1)
    restore = out_i.argsort(dim=-1)  # back to the original order
    out_i = out_i.gather(1, restore)
    out_s = out_s.gather(1, restore)
    out_w = out_w.gather(1, restore.unsqueeze(-1).expand(-1, -1, dim))
    return MergedTokens((out_w / out_s.unsqueeze(-1)).to(features.dtype), out_s, out_i)


def merge_tokens(
    features: torch.Tensor,
    schedule: Sequence[float],
    sizes: torch.Tensor | None = None,
    carry: torch.Tensor | None = None,
) -> MergedTokens:
    """Merge each group of `features` ``(groups, n, dim)`` down the cumulative keep
    fractions of `schedule` (fractions of the original ``n``), one bipartite step each.

    Args:
        sizes: ``(groups, n)`` how many original tokens each token already stands for (e.g. after
            temporal merging); default ones.
        carry: ``(groups, n, extra)`` features merged with the same groups and weights but not
            matched on (Qwen3-VL's DeepStack features); returned as ``MergedTokens.carry``.
    """
    groups, n, dim = features.shape
    if sizes is None:
        sizes = torch.ones(groups, n, dtype=torch.float32, device=features.device)
    index = torch.arange(n, device=features.device).expand(groups, n)
    values = features if carry is None else torch.cat([features, carry.to(features.dtype)], dim=-1)
    merged = MergedTokens(values, sizes.float(), index)
    for num_merge in merge_counts(n, schedule):
        merged = merge_step(merged.features, merged.sizes, merged.index, num_merge, match_dims=dim)
    return split_carry(merged, dim)


def split_carry(merged: MergedTokens, dim: int) -> MergedTokens:
    """Split merged ``[features | carry]`` values (the carried part after column `dim`)."""
    if merged.features.shape[-1] == dim:
        return merged
    return MergedTokens(merged.features[..., :dim], merged.sizes, merged.index, merged.features[..., dim:])


def merge_item(features: torch.Tensor, frames: int, schedule: Sequence[float], markers: int = 0) -> torch.Tensor:
    """Merge one image's / video's features as a serving engine receives them from the encoder:
    ``(frames * n + markers, dim)``, frame after frame, then `markers` tokens that stay as they are.
    Returns ``(merged_item_tokens(n, frames, schedule, markers), dim)``, in order."""
    total = features.shape[0] - markers
    if frames < 1 or total < frames or total % frames:
        raise ValueError(f"cannot split {total} visual features (of {features.shape[0]}, {markers} marker(s)) into {frames} equal frames")
    merged = merge_frames(features[:total], frames, schedule)
    return torch.cat([merged.features.reshape(-1, features.shape[-1]), features[total:]])


def merge_frames(features: torch.Tensor, frames: int, schedule: Sequence[float]) -> MergedTokens:
    """Merge `frames` equal frames given end to end, ``(frames * n, dim)``, each on its own:
    ``MergedTokens`` of shape ``(frames, kept, ...)``, whose ``index`` says where in its frame each
    survivor (a merged token's destination) was, e.g. for its position (`aim.positions`)."""
    total = features.shape[0]
    if frames < 1 or total < frames or total % frames:
        raise ValueError(f"cannot split {total} visual features into {frames} equal frames")
    per_frame = features.reshape(frames, total // frames, features.shape[-1])
    if total // frames >= 2 and schedule:
        return merge_tokens(per_frame, schedule)
    index = torch.arange(total // frames, device=features.device).expand(frames, -1)
    return MergedTokens(per_frame, torch.ones(index.shape, device=features.device), index)


def merge_item_groups(features: torch.Tensor, groups: Sequence[torch.Tensor], schedule: Sequence[float]) -> torch.Tensor:
    """Merge one item's features ``(n, dim)`` group by group (`groups`: positions, e.g. the base view
    and the high-resolution grid of an any-resolution image without its newline tokens), as aim's
    transformers path does: groups of equal size merge together, every position in no group stays,
    and the survivors keep their order. Returns ``(n - merged away, dim)``."""
    keep = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    out = features.clone()
    by_size: dict[int, list[torch.Tensor]] = {}
    for positions in groups:
        if positions.numel() >= 2:
            by_size.setdefault(positions.numel(), []).append(positions.to(features.device))
    for same_size in by_size.values():
        stacked = torch.stack(same_size)  # (groups, size)
        merged = merge_tokens(features[stacked], schedule)
        survivors = stacked.gather(1, merged.index)
        keep[stacked] = False
        keep[survivors] = True
        out[survivors] = merged.features
    return out[keep]
