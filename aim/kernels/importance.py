"""PageRank token importance over one layer's attention in O(N) memory (Triton).

``pagerank_importance_triton`` has the signature and semantics of
``aim.prune.pagerank_importance_reference``: per head
``M = softmax(q k^T * d^-0.5 / tau)`` with a causal mask, keys and queries
restricted to valid tokens; ``s0 = valid / count(valid)``; ``iterations`` times
``s = s @ M``; heads combined by root-mean-square. The reference materialises
``M`` as a ``(batch, heads, N, N)`` float32 tensor. Here ``M`` only ever exists
one ``(BLOCK_M, BLOCK_N)`` tile at a time:

1. ``_row_lse_kernel``: one program per block of query rows streams the key
   tiles (causally: only up to its diagonal) and keeps an online log-sum-exp,
   giving each row's softmax normaliser ``lse`` (``(batch, heads, N)``).
2. ``_power_step_kernel``, launched once per iteration: one program per block
   of key columns streams the query rows at or below its diagonal, rebuilds the
   logits tile, forms ``p = exp(logit - lse_row)`` and accumulates the column
   sums of ``s_row * p``. Each program owns its output columns: no atomics.

Extra memory: ``lse`` and two score buffers, each ``(batch, heads, N)`` float32.
Compute: ``iterations + 1`` causal ``Q K^T`` products instead of one, the price
of not storing ``M``. GQA (``heads = g * kv_heads``, query head ``h`` reads kv
head ``h // g``) is resolved by indexing, without repeating the keys.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import check_launchable, dot_precision, upcast_dot


@triton.jit
def _row_lse_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    lse_ptr,
    n_tokens,
    heads,
    group_size,
    head_dim,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vn,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Base-2 log-sum-exp of each query row's allowed logits (0 for rows with none)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    kvh = (h // group_size).to(tl.int64)
    h = h.to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_valid = tl.load(valid_ptr + b * stride_vb + rows * stride_vn, mask=row_ok, other=0) != 0
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST_DOT:  # interpreter only, see aim.kernels.common.upcast_dot
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, n_tokens)  # causal: nothing right of this block's diagonal
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_tokens
        k_valid = tl.load(valid_ptr + b * stride_vb + cols * stride_vn, mask=col_ok, other=0) != 0
        kt = tl.load(
            k_base + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST_DOT:
            kt = kt.to(tl.float32)
        x = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        allowed = (cols[None, :] <= rows[:, None]) & (k_valid & col_ok)[None, :] & (q_valid & row_ok)[:, None]
        x = tl.where(allowed, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    tl.store(lse_ptr + bh.to(tl.int64) * n_tokens + rows, lse, mask=row_ok)


@triton.jit
def _power_step_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    lse_ptr,
    s_in_ptr,
    s_out_ptr,
    n_tokens,
    heads,
    group_size,
    head_dim,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vn,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """``s_out[:, cols] = s_in @ M[:, cols]`` for this program's block of key columns."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    kvh = (h // group_size).to(tl.int64)
    h = h.to(tl.int64)
    row_base = bh.to(tl.int64) * n_tokens  # (batch, heads, N) buffers are contiguous

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_tokens
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    k_valid = tl.load(valid_ptr + b * stride_vb + cols * stride_vn, mask=col_ok, other=0) != 0
    kt = tl.load(
        k_ptr + b * stride_kb + kvh * stride_kh + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
        mask=d_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    if UPCAST_DOT:  # interpreter only, see aim.kernels.common.upcast_dot
        kt = kt.to(tl.float32)
    q_base = q_ptr + b * stride_qb + h * stride_qh

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # causal: no row above this block's diagonal
    for m0 in range(lo, n_tokens, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_tokens
        q_valid = tl.load(valid_ptr + b * stride_vb + rows * stride_vn, mask=row_ok, other=0) != 0
        q = tl.load(
            q_base + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0)
        s = tl.load(s_in_ptr + row_base + rows, mask=row_ok, other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
        x = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        allowed = (cols[None, :] <= rows[:, None]) & (k_valid & col_ok)[None, :] & (q_valid & row_ok)[:, None]
        p = tl.exp2(tl.where(allowed, x - lse[:, None], float("-inf")))
        acc += tl.sum(s[:, None] * p, axis=0)
    tl.store(s_out_ptr + row_base + cols, acc, mask=col_ok)


def pagerank_importance_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    tau: float = 0.1,
    iterations: int = 5,
) -> torch.Tensor:
    """PageRank importance from one layer's post-RoPE query and key states (Triton, O(N) memory).

    Same contract as ``aim.prune.pagerank_importance_reference``.

    Args:
        query: ``(batch, heads, N, head_dim)``, fp32/fp16/bf16, any strides.
        key: ``(batch, kv_heads, N, head_dim)``; ``heads`` a multiple of ``kv_heads`` (GQA).
        valid: ``(batch, N)`` bool, tokens taking part (others get importance 0).
        tau: softmax temperature on top of the ``1/sqrt(head_dim)`` scaling.
        iterations: power iterations ``s = s @ M``.
    Returns:
        ``(batch, N)`` float32 importance, RMS over heads.
    """
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"expected (batch, heads, N, head_dim) query and key, got {tuple(query.shape)}, {tuple(key.shape)}"
        )
    batch, heads, n, head_dim = query.shape
    kv_heads = key.shape[1]
    if key.shape[0] != batch or key.shape[2] != n or key.shape[3] != head_dim:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)}")
    if tuple(valid.shape) != (batch, n):
        raise ValueError(f"valid must be (batch, N) = {(batch, n)}, got {tuple(valid.shape)}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    if query.dtype != key.dtype:
        raise ValueError(f"query and key must share a dtype, got {query.dtype} and {key.dtype}")
    check_launchable(_power_step_kernel, query, key, valid)

    valid_f = valid.float()
    mass = valid_f / valid_f.sum(-1, keepdim=True).clamp_min(1.0)
    scores = mass[:, None, :].expand(batch, heads, n).contiguous()
    if iterations > 0 and n > 0 and batch * heads > 0:
        valid_i8 = valid.to(torch.int8)
        block_d = max(16, triton.next_power_of_2(head_dim))
        block = 64 if block_d <= 128 else 32
        qk_scale = head_dim**-0.5 / tau * math.log2(math.e)  # base-2 logits: exp2 instead of exp
        common = dict(
            BLOCK_M=block,
            BLOCK_N=block,
            BLOCK_D=block_d,
            INPUT_PRECISION=dot_precision(query.dtype),
            UPCAST_DOT=upcast_dot(_power_step_kernel, query.dtype),
        )
        strides = (*query.stride(), *key.stride(), *valid_i8.stride())
        shape_args = (n, heads, heads // kv_heads, head_dim, *strides, qk_scale)
        grid = (triton.cdiv(n, block), batch * heads)

        lse = torch.empty(batch, heads, n, dtype=torch.float32, device=query.device)
        _row_lse_kernel[grid](query, key, valid_i8, lse, *shape_args, **common)
        other = torch.empty_like(scores)
        for _ in range(iterations):
            _power_step_kernel[grid](query, key, valid_i8, lse, scores, other, *shape_args, **common)
            scores, other = other, scores
    return scores.pow(2).mean(dim=1).sqrt()
