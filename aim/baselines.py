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
from einops import rearrange

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
        return _pool(features, pooled_shape(n, schedule[-1]))
    raise ValueError(f"unknown merge method {method!r}")


def _pool(features: torch.Tensor, shape: tuple[int, int]) -> MergedTokens:
    """Adaptive average pooling of square grids (row-major tokens) to ``rows x cols``.
    Each pooled token takes the position of the first (top-left) token of its region."""
    groups, n, dim = features.shape
    side = grid_side(n)
    rows, cols = shape
    grid = rearrange(features.float(), "g (row col) d -> g d row col", row=side)
    pooled = rearrange(F.adaptive_avg_pool2d(grid, shape), "g d row col -> g (row col) d")
    row_spans, col_spans = _regions(side, rows), _regions(side, cols)
    first = torch.tensor([r0 * side + c0 for r0, _ in row_spans for c0, _ in col_spans], device=features.device)
    sizes = torch.tensor(
        [float((r1 - r0) * (c1 - c0)) for r0, r1 in row_spans for c0, c1 in col_spans], device=features.device
    )
    return MergedTokens(pooled.to(features.dtype), sizes.expand(groups, -1), first.expand(groups, -1))


def _regions(size: int, out: int) -> list[tuple[int, int]]:
    """adaptive_avg_pool's regions along one axis: ``[floor(i * size / out), ceil((i + 1) * size / out))``."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def last_token_importance(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """FastV's ranking: the attention the last token pays to each token, mean over heads.

    Args as `aim.prune.pagerank_importance_reference`. The query is each prompt's last valid
    token (with right padding that is not the last slot). Returns ``(batch, N)`` float32.
    """
    batch, heads, n, head_dim = query.shape
    kv_heads = key.shape[1]
    last_slot = n - 1 - valid.flip(1).int().argmax(1)  # (batch,)
    last_query = query.gather(2, last_slot.view(batch, 1, 1, 1).expand(batch, heads, 1, head_dim)).squeeze(2)
    last = rearrange(last_query.float(), "b (kv g) d -> b kv g d", kv=kv_heads)
    logits = (last @ key.float().transpose(-1, -2)) * head_dim**-0.5  # (batch, kv, group, N)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return rearrange(torch.softmax(logits, dim=-1), "b kv g n -> b (kv g) n").mean(dim=1)
