"""Token-reduction baselines, run through the same engine as AIM so that only the choice of
tokens differs.

Before the LLM (per frame / crop, where AIM merges): random dropping and uniform spatial
average pooling; per video: EVS, vLLM's own video pruning (drop the tokens that repeat the same
place of the previous frame). Inside the LLM (the ranking at pruning layers, where AIM uses PageRank):
random ranking (a fixed random priority per prompt position, drawn in the engine) and
FastV's attention from the last token (arXiv 2403.06764). Each returns what its AIM
counterpart returns (`MergedTokens`, a ``(batch, N)`` importance), so the engine, the stats
and the FLOPs model treat them alike. Chosen by
``AIMConfig.merge_method`` / ``AIMConfig.prune_method``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .counts import evs_kept_tokens, grid_side, group_size_after_merge, pooled_shape  # noqa: F401 (re-exported)
from .merge import MergedTokens, merge_tokens, split_carry


def reduce_groups(
    features: torch.Tensor,
    schedule: Sequence[float],
    method: str,
    generator: torch.Generator | None = None,
    sizes: torch.Tensor | None = None,
    carry: torch.Tensor | None = None,
) -> MergedTokens:
    """Reduce each group of `features` ``(groups, n, dim)`` by `method` (see `group_size_after_merge`).

    `sizes` / `carry` as in `aim.merge.merge_tokens`: tokens that already stand for several
    (temporal merging) and features reduced alongside (DeepStack). Pooling averages regions of the
    grid (it needs whole square frames: no earlier temporal merging); random dropping keeps sizes.
    """
    if method == "bipartite":
        return merge_tokens(features, schedule, sizes=sizes, carry=carry)
    groups, n, dim = features.shape
    values = features if carry is None else torch.cat([features, carry.to(features.dtype)], dim=-1)
    target = group_size_after_merge(n, schedule, method)
    if method == "random":
        scores = torch.rand(groups, n, generator=generator).to(features.device)
        index = scores.topk(target, dim=1).indices.sort(dim=1).values
        kept = values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
        kept_sizes = torch.ones(groups, target, device=features.device) if sizes is None else sizes.float().gather(1, index)
        return split_carry(MergedTokens(kept, kept_sizes, index), dim)
    if method == "pool":
        return split_carry(_pool(values, pooled_shape(n, schedule[-1])), dim)
    raise ValueError(f"unknown merge method {method!r}")


def evs_retention(frames: torch.Tensor, keep: float) -> torch.Tensor:
    """EVS (Efficient Video Sampling), the video pruning vLLM ships (``--video-pruning-rate``,
    ``vllm/multimodal/video_prune/evs.py``, written here after vLLM 0.32's torch code): a token's
    score is its cosine dissimilarity to the token at the same place of the previous frame (the
    first frame scores highest, so it is kept whole); the `evs_kept_tokens` highest-scoring tokens
    of the whole video stay, the rest are dropped (not merged), and the survivors keep their positions.

    Args:
        frames: ``(T, n, dim)`` one video's tokens, frame after frame, each frame in grid order.
        keep: the fraction of the video's tokens that stays (vLLM's ``1 - video_pruning_rate``).
    Returns:
        ``(T, n)`` bool, True where a token stays.
    """
    count, n, _ = frames.shape
    similarity = F.cosine_similarity(frames[1:], frames[:-1], dim=-1)
    first = 255 * torch.ones_like(frames[:1, :, 0])  # vLLM's score of the first frame: above any dissimilarity
    dissimilarity = torch.cat([first, 1 - similarity], dim=0).reshape(-1)
    order = torch.argsort(dissimilarity, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(dissimilarity, dtype=torch.bool)
    mask[order[: evs_kept_tokens(n, count, keep)]] = True
    return mask.view(count, n)


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
