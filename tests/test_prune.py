"""PageRank importance against a direct dense implementation of the formula in `aim.prune`'s docstring."""

import numpy as np
import pytest
import torch

from aim.config import visual_tokens_kept
from aim.prune import pagerank_importance_reference, select_tokens


def dense_formula(q, k, tau, iterations):
    """Per head: M = softmax(q k^T / sqrt(d) / tau) with causal mask; s = 1/N; s = s @ M; RMS over heads."""
    q, k = q.double().numpy(), k.double().numpy()
    heads, n, d = q.shape
    group = heads // k.shape[0]
    per_head = []
    for h in range(heads):
        logits = q[h] @ k[h // group].T / np.sqrt(d) / tau
        logits[np.triu_indices(n, 1)] = -np.inf
        m = np.exp(logits - logits.max(-1, keepdims=True))
        m /= m.sum(-1, keepdims=True)
        s = np.full(n, 1.0 / n)
        for _ in range(iterations):
            s = s @ m
        per_head.append(s)
    return np.sqrt(np.mean(np.stack(per_head) ** 2, axis=0))


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (7, 1)])
@pytest.mark.parametrize("tau, iterations", [(0.1, 5), (1.0, 2)])
def test_importance_equals_dense_formula(heads, kv_heads, tau, iterations):
    torch.manual_seed(0)
    q, k = torch.randn(1, heads, 23, 8), torch.randn(1, kv_heads, 23, 8)
    valid = torch.ones(1, 23, dtype=torch.bool)
    got = pagerank_importance_reference(q, k, valid, tau=tau, iterations=iterations)
    np.testing.assert_allclose(got[0].numpy(), dense_formula(q[0], k[0], tau, iterations), rtol=1e-4, atol=1e-7)


def test_padding_and_removed_tokens_do_not_change_scores():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    alone = pagerank_importance_reference(q, k, torch.ones(1, 12, dtype=torch.bool))
    pad = 5  # left padding with garbage states
    qp = torch.cat([torch.randn(1, 4, pad, 8), q], 2)
    kp = torch.cat([torch.randn(1, 2, pad, 8), k], 2)
    valid = torch.arange(12 + pad)[None] >= pad
    padded = pagerank_importance_reference(qp, kp, valid)
    torch.testing.assert_close(padded[:, pad:], alone, rtol=1e-5, atol=1e-7)
    assert bool((padded[:, :pad] == 0).all())


def test_select_keeps_text_and_top_visual():
    importance = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2]])
    valid = torch.tensor([[False, True, True, True, True, True]])
    visual = torch.tensor([[True, False, True, True, True, False]])
    keep = select_tokens(importance, valid, visual, torch.tensor([2]))
    # slot 0 is padding (never kept); text slots 1, 5 always kept; visual: 4 (0.8) and 2 (0.5)
    assert keep.tolist() == [[False, True, True, False, True, True]]


def test_keep_counts_round_half_up():
    # 8 * 0.5 = 4; 3 * 0.5 = 1.5 -> 2; never more than there are, never below 0
    assert [visual_tokens_kept(n, 0.5) for n in (8, 3, 1, 0)] == [4, 2, 1, 0]
    assert visual_tokens_kept(7, 0.125) == 1 and visual_tokens_kept(3, 0.0) == 0
