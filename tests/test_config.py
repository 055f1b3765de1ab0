"""AIMConfig validation and schedules: every bad input gets a clear error."""

import pytest

from aim import AIMConfig
from aim.config import merge_schedule_for_keep, visual_tokens_kept


def test_default_schedule_is_the_papers_for_28_layers():
    ratios = AIMConfig().keep_ratios(28)
    assert ratios[:14] == (1.0,) * 14
    assert ratios[14:21] == pytest.approx([0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert ratios[21:] == (0.0,) * 7
    assert AIMConfig().merge_schedule == (0.5, 0.25)


def test_default_schedule_scales_with_depth():
    ratios = AIMConfig().keep_ratios(8)  # start 4, gone at 6
    assert ratios == pytest.approx([1, 1, 1, 1, 2 / 3, 1 / 3, 0, 0])


def test_start_and_step_override():
    ratios = AIMConfig(prune_start=2, prune_step=0.5).keep_ratios(4)
    assert ratios == (1.0, 1.0, 0.5, 0.0)


def test_merge_keep_builds_halving_steps():
    assert merge_schedule_for_keep(0.25) == (0.5, 0.25)
    assert merge_schedule_for_keep(0.3) == (0.5, 0.3)
    assert merge_schedule_for_keep(0.1) == (0.5, 0.25, 0.125, 0.1)
    assert merge_schedule_for_keep(1.0) == ()
    assert AIMConfig(merge_keep=0.3).merge_schedule == (0.5, 0.3)


def test_rounding_rule():
    assert visual_tokens_kept(1568, 0.875) == 1372
    assert visual_tokens_kept(5, 0.5) == 3  # half up
    assert visual_tokens_kept(5, 0.0) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"merge_keep": 0.0}, "merge_keep must be in"),
        ({"merge_keep": 1.5}, "merge_keep must be in"),
        ({"merge_schedule": (0.5, 0.2)}, "at most half"),
        ({"merge_schedule": (0.4,)}, "at most half"),
        ({"merge_schedule": (0.5, 0.6)}, "non-increasing"),
        ({"prune_keep_ratios": (1.0, 0.5, 0.7)}, "non-increasing"),
        ({"prune_keep_ratios": (0.9, 0.5)}, r"prune_keep_ratios\[0\] must be 1.0"),
        ({"prune_keep_ratios": (1.0, 1.2)}, "must be in"),
        ({"prune_start": 0}, "prune_start must be an integer >= 1"),
        ({"prune_step": 0.0}, "prune_step must be in"),
        ({"prune_step": 2.0}, "prune_step must be in"),
        ({"tau": 0}, "tau must be > 0"),
        ({"pagerank_iterations": 0}, "pagerank_iterations"),
        ({"prune_mode": "drop"}, "prune_mode must be one of"),
        ({"prune_keep_ratios": (1.0, 0.5), "prune_start": 1}, "either prune_keep_ratios or"),
    ],
)
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AIMConfig(**kwargs)


def test_schedule_longer_or_later_than_the_model():
    with pytest.raises(ValueError, match="has 3 entries but the model has 4 decoder layers"):
        AIMConfig(prune_keep_ratios=(1.0, 0.5, 0.0)).keep_ratios(4)
    with pytest.raises(ValueError, match=r"prune_start=4 is past the model's last layer .* allowed prune_start: 1..3"):
        AIMConfig(prune_start=4).keep_ratios(4)


def test_replace_validates_and_rejects_unknown_options():
    config = AIMConfig().replace(merge_keep=0.5, prune_start=3)
    assert config.merge_schedule == (0.5,) and config.prune_start == 3
    with pytest.raises(TypeError, match="unknown AIM option"):
        AIMConfig().replace(r2=0.5)
    with pytest.raises(ValueError):
        AIMConfig().replace(merge_keep=-1)


def test_identity():
    assert AIMConfig(enabled=False).is_identity(4)
    assert AIMConfig(merge_keep=1.0, prune=False).is_identity(4)
    assert not AIMConfig().is_identity(4)


@pytest.mark.parametrize("kwargs, before_llm, tokens", [
    (dict(), True, True),  # the paper's default merges before the LLM
    (dict(merge_schedule=()), False, False),  # pruning that drops
    (dict(merge_schedule=(), prune_action="merge"), False, True),  # pruning layers merge what they remove
    (dict(merge_schedule=(), prune=False, prune_action="merge"), False, False),  # no pruning: nothing merges
    (dict(merge_schedule=(), temporal_keep=0.5, prune=False), True, True),  # across frames only
    (dict(enabled=False), False, False),
])
def test_merge_conditions(kwargs, before_llm, tokens):
    """What the engine asks before merging (`merges_before_llm`) and before weighing keys by the
    number of tokens they stand for (`merges_tokens`, proportional attention)."""
    config = AIMConfig(**kwargs)
    assert config.merges_before_llm is before_llm and config.merges_tokens is tokens
