"""Token-reduction baselines, run through the same engine as AIM so that only the choice of
tokens differs.

Before the LLM (per frame / crop, where AIM merges): random dropping and uniform spatial
average pooling. Inside the LLM (the ranking at pruning layers, where AIM uses PageRank):
random ranking (a fixed random priority per prompt position, drawn in the engine) and
FastV's attention from the last token (arXiv 2403.06764). Each returns what its AIM
counterpart returns (`MergedTokens`, a ``(batch, N)`` importance), so the engine, the stats
and the FLOPs model treat them alike. Chosen by
``AIMConfig.merge_method`` / ``AIMConfig.prune_method``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import visual_tokens_kept
from .merge import MergedTokens, merge_tokens, merged_token_count


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
        return pooled_side(num_tokens, schedule[-1]) ** 2
    raise ValueError(f"unknown merge method {method!r}")


def pooled_side(num_tokens: int, keep: float) -> int:
    """Output side of uniform pooling: the square grid closest to `keep` of the tokens."""
    side = grid_side(num_tokens)
    return min(side, max(1, math.floor(math.sqrt(num_tokens * keep) + 0.5)))


def reduce_groups(
    features: torch.Tensor, schedule: Sequence[float], method: str, generator: torch.Generator | None = None
) -> MergedTokens:
    """Reduce each group of `features` ``(groups, n, dim)`` by `method` (see `group_size_after_merge`)."""
    if method == "bipartite":
        return merge_tokens(features, schedule)
    groups, n, dim = features.shape
    target = group_size_after_merge(n, schedule, method)
    if method == "random":
        scores = torch.rand(groups, n, generator=generator).to(features.device)
        index = scores.topk(target, dim=1).indices.sort(dim=1).values
        kept = features.gather(1, index.unsqueeze(-1).expand(-1, -1, dim))
        return MergedTokens(kept, torch.ones(groups, target, device=features.device), index)
    if method == "pool":
        return _pool(features, pooled_side(n, schedule[-1]))
    raise ValueError(f"unknown merge method {method!r}")


def _pool(features: torch.Tensor, out_side: int) -> MergedTokens:
    """Adaptive average pooling of square grids (row-major tokens) to ``out_side x out_side``.
    Each pooled token takes the position of the first (top-left) token of its region."""
    groups, n, dim = features.shape
    side = grid_side(n)
    grid = features.float().view(groups, side, side, dim).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, out_side).permute(0, 2, 3, 1).reshape(groups, out_side * out_side, dim)
    # adaptive pooling's regions: [floor(i * side / out), ceil((i + 1) * side / out))
    starts = [(i * side) // out_side for i in range(out_side)]
    ends = [-((-(i + 1) * side) // out_side) for i in range(out_side)]
    first = torch.tensor([r * side + c for r in starts for c in starts], device=features.device)
    sizes = torch.tensor(
        [float((re - rs) * (ce - cs)) for rs, re in zip(starts, ends) for cs, ce in zip(starts, ends)],
        device=features.device,
    )
    return MergedTokens(pooled.to(features.dtype), sizes.expand(groups, -1), first.expand(groups, -1))


def last_token_importance(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """FastV's ranking: the attention the last token pays to each token, mean over heads.

    Args as `aim.prune.pagerank_importance_reference` (the last slot is the prompt's last
    token: the engine left-pads). Returns ``(batch, N)`` float32.
    """
    batch, heads, n, head_dim = query.shape
    kv_heads = key.shape[1]
    last = query[:, :, -1:].float().reshape(batch, kv_heads, heads // kv_heads, head_dim)
    logits = (last @ key.float().transpose(-1, -2)) * head_dim**-0.5  # (batch, kv, group, N)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(batch, heads, n).mean(dim=1)
