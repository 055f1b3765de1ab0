"""PageRank importance over a layer's attention, and the choice of visual tokens to keep.

Importance (AIM, arXiv 2412.03248): per head ``M = softmax(q k^T / sqrt(d) / tau)``
with a causal mask, ``s = 1/N``, five times ``s = s @ M``, heads combined by RMS.
Only valid tokens take part: padding and already-removed tokens are masked as
keys and start with zero mass, so a padded batch scores each prompt as if alone.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .dispatch import backend_for


def pagerank_importance_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    tau: float = 0.1,
    iterations: int = 5,
) -> torch.Tensor:
    """Dense PageRank importance from one layer's post-RoPE query and key states.

    Args:
        query: ``(batch, heads, N, head_dim)``.
        key: ``(batch, kv_heads, N, head_dim)``; ``heads`` a multiple of ``kv_heads`` (GQA).
        valid: ``(batch, N)`` bool, tokens taking part (others get importance 0).
        tau: softmax temperature on top of the ``1/sqrt(head_dim)`` scaling.
        iterations: power iterations ``s = s @ M``.
    Returns:
        ``(batch, N)`` float32 importance, RMS over heads.
    """
    batch, heads, n, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    # GQA without repeating the keys: the query heads of kv head i (i*g .. i*g+g-1, as
    # repeat_interleave orders them) are stacked into one (g*N, d) block against its keys
    scaled = query.float() * (head_dim**-0.5 / tau)
    scaled = rearrange(scaled, "b (kv g) n d -> b kv (g n) d", kv=kv_heads)
    logits = rearrange(scaled @ key.float().transpose(-1, -2), "b kv (g n) m -> b (kv g) n m", n=n)
    allowed = torch.ones(n, n, dtype=torch.bool, device=query.device).tril() & valid[:, None, None, :]
    # a finite fill keeps rows without any allowed key (padding queries) finite; those rows carry
    # no mass (s is 0 there), so they change nothing and need no NaN clean-up
    logits.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    attention = torch.softmax(logits, dim=-1)
    del logits  # two (B, H, N, N) float32 buffers at the peak, not three
    mass = valid.float() / valid.float().sum(-1, keepdim=True).clamp_min(1.0)
    scores = mass[:, None, :].expand(batch, heads, n)
    for _ in range(iterations):
        scores = (scores.unsqueeze(-2) @ attention).squeeze(-2)
    return scores.pow(2).mean(dim=1).sqrt()


def pagerank_importance(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, tau: float = 0.1, iterations: int = 5
) -> torch.Tensor:
    """PageRank importance (see `pagerank_importance_reference`): the Triton kernel for CUDA tensors
    when triton is installed, else the reference (`aim.dispatch`)."""
    if backend_for(query) == "triton":
        from .kernels.importance import pagerank_importance_triton

        return pagerank_importance_triton(query, key, valid, tau=tau, iterations=iterations)
    return pagerank_importance_reference(query, key, valid, tau=tau, iterations=iterations)


def select_tokens(
    importance: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor, keep_visual: torch.Tensor
) -> torch.Tensor:
    """Keep every valid text token and the `keep_visual[b]` most important visual tokens.

    Returns a ``(batch, N)`` bool mask of tokens that stay.
    """
    candidates = valid & visual
    # a candidate never ranks with the non-candidates (-inf): the engine relies on each row keeping
    # exactly min(keep_visual, candidates) tokens, and a -inf importance would tie with them
    ranked = importance.float().clamp_min(torch.finfo(torch.float32).min).masked_fill(~candidates, float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    top = rank < keep_visual.unsqueeze(-1)
    return valid & (~visual | (top & candidates))
