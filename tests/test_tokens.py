"""TokenSet compaction without device syncs: the host-side counts give the same slots as the
counts the device would report, and the layer mask trusts what the host knows."""

import pytest
import torch

from aim.engine import _layer_mask
from aim.tokens import TokenSet, attention_mask_4d


def _tokens(valid: torch.Tensor, visual: torch.Tensor, dim: int = 6, seed: int = 0) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    batch, width = valid.shape
    hidden = torch.randn(batch, width, dim, generator=g)
    cos, sin = torch.randn(batch, width, 4, generator=g), torch.randn(batch, width, 4, generator=g)
    return TokenSet(hidden, cos, sin, valid, visual, remove=True)


def _state(tokens: TokenSet) -> dict:
    return {name: getattr(tokens, name).clone() for name in ("hidden", "cos", "sin", "sizes", "origin", "visual", "valid")}


def _prompts():
    # two prompts, the second left-padded by two slots; visual slots 2..7 (second: 4..7)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :2] = False
    visual = torch.zeros(2, 10, dtype=torch.bool)
    visual[0, 2:8] = True
    visual[1, 4:8] = True
    return valid, visual


@pytest.mark.parametrize("kept_visual", [(3, 1), (2, 2)])
def test_keep_with_host_counts_equals_device_counts(kept_visual):
    valid, visual = _prompts()
    keep = valid & ~visual
    for row, count in enumerate(kept_visual):
        slots = (valid[row] & visual[row]).nonzero().flatten()
        keep[row, slots[torch.randperm(slots.numel(), generator=torch.Generator().manual_seed(row))[:count]]] = True
    counts = keep.sum(1).tolist()

    told, measured = _tokens(valid, visual), _tokens(valid, visual)
    told.keep(keep, counts)
    measured.keep(keep)
    for name, value in _state(measured).items():
        assert torch.equal(getattr(told, name), value), name
    assert torch.equal(told.outputs(), measured.outputs())
    # equal rows leave no padding, which the host now knows; unequal rows pad the shorter one
    assert told.all_valid is (len(set(counts)) == 1)
    assert told.all_valid == bool(told.valid.all())
    assert measured.all_valid is None


def test_outputs_keep_each_removed_slot_and_leave_padding_alone():
    valid, visual = _prompts()
    tokens = _tokens(valid, visual)
    before = tokens.hidden.clone()
    keep = valid & ~visual
    keep[:, 7] = True
    tokens.keep(keep, keep.sum(1).tolist())
    tokens.hidden = tokens.hidden + 1.0  # a later layer changes the slots that stay
    out = tokens.outputs()
    assert out.shape == before.shape
    stays = keep
    assert torch.equal(out[stays], before[stays] + 1.0)
    gone = valid & ~keep
    assert torch.equal(out[gone], before[gone])  # the state each had when it was removed
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))  # padding: written nowhere


def test_keep_refuses_counts_that_disagree_with_the_mask():
    valid, visual = _prompts()
    tokens = _tokens(valid, visual)
    keep = valid & ~visual
    with pytest.raises(RuntimeError, match="keep\\(\\) was told"):
        tokens.keep(keep, [c + 1 for c in keep.sum(1).tolist()])


def test_layer_mask_trusts_the_host_and_checks_otherwise():
    valid = torch.ones(1, 5, dtype=torch.bool)
    assert _layer_mask(valid, 5, torch.float32, implicit_ok=True, all_valid=True) is None
    assert _layer_mask(valid, 5, torch.float32, implicit_ok=True) is None  # asks the tensor
    padded = valid.clone()
    padded[0, 0] = False
    expected = attention_mask_4d(padded, 5, torch.float32)
    assert torch.equal(_layer_mask(padded, 5, torch.float32, implicit_ok=True), expected)
    assert torch.equal(_layer_mask(padded, 5, torch.float32, implicit_ok=True, all_valid=False), expected)
    # not a prefill (or eager attention): always the explicit mask, whatever the host says
    assert torch.equal(_layer_mask(valid, 5, torch.float32, implicit_ok=False, all_valid=True),
                       attention_mask_4d(valid, 5, torch.float32))


def test_outputs_with_unequal_rows_match_the_boolean_index_formula():
    # after a first compaction the shorter row is left-padded; a second compaction must save the
    # kept slots' states at their input positions and write nothing where padding sits
    valid, visual = _prompts()
    tokens = _tokens(valid, visual)
    before = tokens.hidden.clone()
    first = valid & ~visual
    first[0, 2:6] = True  # row 0 keeps 4 visual slots, row 1 keeps 1
    first[1, 4] = True
    tokens.keep(first, first.sum(1).tolist())
    assert not tokens.all_valid
    tokens.hidden = tokens.hidden * 2.0 + 1.0
    expected = torch.zeros_like(before)
    expected[valid & ~first] = before[valid & ~first]  # removed by the first compaction, as they were then
    rows = torch.arange(2).unsqueeze(1).expand_as(tokens.valid)
    expected[rows[tokens.valid], tokens.origin[tokens.valid]] = tokens.hidden[tokens.valid]
    second = tokens.valid & ~tokens.visual
    tokens.keep(second, second.sum(1).tolist())
    out = tokens.outputs()
    rows = torch.arange(2).unsqueeze(1).expand_as(tokens.valid)
    stays = torch.zeros_like(valid)
    stays[rows[tokens.valid], tokens.origin[tokens.valid]] = True
    assert torch.equal(out[~stays], expected[~stays])  # removed slots: their state when removed; padding: zeros
    assert torch.equal(out[stays], expected[stays])  # text slots: unchanged since, so the same


def test_select_tokens_keeps_candidates_ranked_minus_infinity():
    from aim.prune import select_tokens

    valid = torch.ones(1, 6, dtype=torch.bool)
    visual = torch.tensor([[False, True, True, True, True, False]])
    importance = torch.tensor([[0.0, float("-inf"), float("-inf"), 1.0, float("-inf"), 0.0]])
    keep = select_tokens(importance, valid, visual, torch.tensor([3]))
    assert int((keep & visual).sum()) == 3 and bool(keep[0, 3]) and bool(keep[0, 0] & keep[0, 5])
