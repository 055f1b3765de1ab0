"""Bipartite soft matching with size tracking, against hand-checked numbers."""

import torch

from aim.merge import best_match_reference, merge_counts, merge_tokens, merged_token_count


def test_hand_checked_two_step_merge():
    # step 1 (keep 3 of 4): A = {x0, x2}, B = {x1, x3}; x0 ~ x1 (cos 1) beats x2 ~ x1 (cos .71): x0 -> x1
    # step 2 (keep 2): A = {m01 (size 2), x3}, B = {x2}; m01 ~ x2 (cos .71) beats x3 ~ x2 (-.55): m01 -> x2
    x = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.2]]])
    merged = merge_tokens(x, (0.75, 0.5))
    assert merged.index.tolist() == [[2, 3]]  # original order, destination positions
    assert merged.sizes.tolist() == [[3.0, 1.0]]
    # size-weighted mean: (2 * (1.5, 0) + (1, 1)) / 3, not the plain mean (1.25, 0.5)
    torch.testing.assert_close(merged.features, torch.tensor([[[4 / 3, 1 / 3], [-1.0, 0.2]]]))


def test_order_preserved_and_sizes_sum_to_original():
    torch.manual_seed(0)
    x = torch.randn(5, 196, 16)
    merged = merge_tokens(x, (0.5, 0.25))
    assert merged.features.shape == (5, 49, 16)
    assert bool((merged.index[:, 1:] > merged.index[:, :-1]).all())
    torch.testing.assert_close(merged.sizes.sum(-1), torch.full((5,), 196.0))
    # mass is conserved: size-weighted sum of merged features equals the sum of the originals
    torch.testing.assert_close((merged.features * merged.sizes[..., None]).sum(1), x.sum(1), rtol=1e-4, atol=1e-4)


def test_paper_counts_and_odd_groups():
    assert merge_counts(196, (0.5, 0.25)) == [98, 49]
    assert merged_token_count(196, (0.5, 0.25)) == 49
    assert merged_token_count(15, (0.5, 0.25)) == 4  # 15 -> 8 -> 4
    assert merged_token_count(1, (0.5, 0.25)) == 1
    x = torch.randn(2, 15, 8)
    assert merge_tokens(x, (0.5, 0.25)).features.shape == (2, 4, 8)


def test_best_match_matches_brute_force():
    torch.manual_seed(1)
    a, b = torch.randn(3, 7, 5), torch.randn(3, 6, 5)
    score, index = best_match_reference(a, b)
    for g in range(3):
        for i in range(7):
            sims = torch.nn.functional.cosine_similarity(a[g, i][None], b[g], dim=-1)
            assert int(index[g, i]) == int(sims.argmax())
            torch.testing.assert_close(score[g, i], sims.max())


def test_merge_counts_never_remove_more_than_half_per_step():
    # the official AIM code caps each step at floor(t / 2) of the t tokens present
    assert merge_counts(35, (0.5, 0.25)) == [17, 9] and merged_token_count(35, (0.5, 0.25)) == 9
    for n in range(1, 300):
        for schedule in ((0.5, 0.25), (0.5, 0.3), (0.6,), (0.5, 0.25, 0.125, 0.1)):
            current = n
            for removed in merge_counts(n, schedule):
                assert 0 <= removed <= current // 2
                current -= removed
            assert current == merged_token_count(n, schedule) >= 1
