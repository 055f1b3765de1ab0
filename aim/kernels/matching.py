"""Fused cosine best-match for bipartite token merging (Triton).

``best_match_triton`` has the signature and semantics of
``aim.merge.best_match_reference``: for each token of set A its most
cosine-similar token of set B, per group. The reference materialises the
``(groups, Na, Nb)`` float32 similarity matrix; this kernel never does. Each
program owns a tile of A rows, streams tiles of B, computes the dot products
(fp32 accumulation), scales them by both inverse L2 norms (computed on the fly
from the same tiles, so normalisation is fused and costs no extra pass over B)
and keeps a running max / argmax. Extra memory: the two ``(groups, Na)`` outputs.

Ties go to the lowest B index, as ``torch.max`` does: within a tile by
``tl.argmax(tie_break_left=True)``, across tiles by replacing the running best
only on a strictly larger score.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_launchable, dot_precision, interpreted, upcast_dot  # noqa: F401 (re-exported)

_EPS = 1e-12  # ``clamp_min`` of the reference's norms


@triton.jit
def _best_match_kernel(
    a_ptr,
    b_ptr,
    score_ptr,
    index_ptr,
    num_a,
    num_b,
    dim,
    stride_ag,
    stride_an,
    stride_ad,
    stride_bg,
    stride_bn,
    stride_bd,
    stride_sg,
    stride_sn,
    eps,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_a = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)

    rows = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    row_ok = rows < num_a
    offs_d = tl.arange(0, BLOCK_D)
    a_base = a_ptr + group * stride_ag + rows[:, None].to(tl.int64) * stride_an
    b_base = b_ptr + group * stride_bg

    # inverse L2 norms of this tile's A rows (fp32), reference: a / a.norm().clamp_min(eps)
    a_sq = tl.zeros([BLOCK_A], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d_ok = (d0 + offs_d) < dim
        a32 = tl.load(a_base + (d0 + offs_d)[None, :] * stride_ad, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        a32 = a32.to(tl.float32)
        a_sq += tl.sum(a32 * a32, axis=1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(a_sq), eps)

    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, num_b, BLOCK_B):
        cols = b0 + tl.arange(0, BLOCK_B)
        col_ok = cols < num_b
        dots = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        b_sq = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d_ok = (d0 + offs_d) < dim
            a = tl.load(a_base + (d0 + offs_d)[None, :] * stride_ad, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            # B tile loaded transposed: (BLOCK_D, BLOCK_B)
            bt = tl.load(
                b_base + cols[None, :].to(tl.int64) * stride_bn + (d0 + offs_d)[:, None] * stride_bd,
                mask=d_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            bt32 = bt.to(tl.float32)
            b_sq += tl.sum(bt32 * bt32, axis=0)
            if UPCAST_DOT:  # interpreter only: its tl.dot multiplies bf16 bit patterns
                a = a.to(tl.float32)
                bt = bt32
            dots = tl.dot(a, bt, dots, input_precision=INPUT_PRECISION)
        inv_b = 1.0 / tl.maximum(tl.sqrt(b_sq), eps)
        sim = dots * inv_a[:, None] * inv_b[None, :]
        sim = tl.where(col_ok[None, :], sim, float("-inf"))
        tile_best, tile_idx = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: an earlier (lower-index) tile wins ties
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx + b0, best_idx)

    out = group * stride_sg + rows.to(tl.int64) * stride_sn
    tl.store(score_ptr + out, best, mask=row_ok)
    tl.store(index_ptr + out, best_idx.to(tl.int64), mask=row_ok)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def best_match_triton(set_a: torch.Tensor, set_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of `set_a` its most cosine-similar token of `set_b` (Triton).

    Same contract as ``aim.merge.best_match_reference``.

    Args:
        set_a: ``(groups, Na, dim)``. set_b: ``(groups, Nb, dim)``, ``Nb >= 1``.
            fp32, fp16 or bf16, any strides (e.g. the ``[:, ::2]`` views merging uses).
    Returns:
        ``(best_score, best_index)``, each ``(groups, Na)``; float32 and int64.
    """
    if set_a.dim() != 3 or set_b.dim() != 3:
        raise ValueError(f"expected (groups, tokens, dim) tensors, got {tuple(set_a.shape)} and {tuple(set_b.shape)}")
    groups, num_a, dim = set_a.shape
    if set_b.shape[0] != groups or set_b.shape[2] != dim:
        raise ValueError(f"set_b {tuple(set_b.shape)} does not match set_a {tuple(set_a.shape)}")
    num_b = set_b.shape[1]
    if num_b < 1:
        raise ValueError("set_b must hold at least one token")
    if set_a.dtype != set_b.dtype:
        raise ValueError(f"set_a and set_b must share a dtype, got {set_a.dtype} and {set_b.dtype}")
    check_launchable(_best_match_kernel, set_a, set_b)

    score = torch.empty(groups, num_a, dtype=torch.float32, device=set_a.device)
    index = torch.empty(groups, num_a, dtype=torch.int64, device=set_a.device)
    if groups == 0 or num_a == 0:
        return score, index
    if dim == 0:  # all vectors are zero: every similarity is 0, the first B token wins
        return score.zero_(), index.zero_()

    block_a = _block(num_a, 16, 64)
    block_b = _block(num_b, 16, 64)
    block_d = _block(dim, 16, 64)
    grid = (triton.cdiv(num_a, block_a), groups)
    _best_match_kernel[grid](
        set_a,
        set_b,
        score,
        index,
        num_a,
        num_b,
        dim,
        *set_a.stride(),
        *set_b.stride(),
        *score.stride(),
        _EPS,
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        INPUT_PRECISION=dot_precision(set_a.dtype),
        UPCAST_DOT=upcast_dot(_best_match_kernel, set_a.dtype),
    )
    return score, index
