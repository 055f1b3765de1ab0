"""AIMConfig: what to merge before the LLM and what to prune inside it.

The config is validated twice: on construction (ratios, step sizes, types) and
when it is resolved against a model (`resolve(num_layers)`), where the schedule
is checked against the model's depth.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

# Paper default: two merge steps, r = N/2 then N/4 of the original N (25% kept).
DEFAULT_MERGE_SCHEDULE: tuple[float, ...] = (0.5, 0.25)
PRUNE_MODES = ("remove", "mask")
# AIM's own methods first; the others are the baselines the accuracy study compares against
MERGE_METHODS = ("bipartite", "pool", "random", "evs")
PRUNE_METHODS = ("pagerank", "last_token", "random")
# what happens to the visual tokens a pruning layer removes
PRUNE_ACTIONS = ("drop", "merge")
# the RoPE positions of the visual tokens that stay after merging before the LLM (aim.positions)
MERGED_POSITIONS = ("destination", "contiguous")


def merge_schedule_for_keep(merge_keep: float) -> tuple[float, ...]:
    """Cumulative keep fractions that reach `merge_keep` halving at most per step.

    0.25 -> (0.5, 0.25); 0.3 -> (0.5, 0.3); 0.1 -> (0.5, 0.25, 0.125, 0.1); 1.0 -> ().
    """
    if not 0.0 < merge_keep <= 1.0:
        raise ValueError(f"merge_keep must be in (0, 1], got {merge_keep!r}")
    steps: list[float] = []
    keep = 1.0
    while keep > merge_keep + 1e-12:
        keep = max(keep / 2, merge_keep)
        steps.append(keep)
    return tuple(steps)


def default_prune_start_end(num_layers: int) -> tuple[int, int]:
    """Default schedule relative to depth: start pruning at half depth, no visual token
    left from three quarters of depth on (28 layers: 14 and 21, as in the paper)."""
    return num_layers // 2, (3 * num_layers) // 4


@dataclass
class AIMConfig:
    """Configuration of AIM token merging (before the LLM) and pruning (inside it).

    Args:
        enabled: when False the patched model behaves exactly as the unpatched one.
        merge_schedule: cumulative fractions of each frame's / crop's visual tokens
            kept after each bipartite merge step, e.g. ``(0.5, 0.25)``. Each step may
            remove at most half of the tokens present before it. Empty: no merging.
        merge_keep: shortcut that builds `merge_schedule` with halving steps
            (``merge_keep=0.25`` gives ``(0.5, 0.25)``). Overrides `merge_schedule`.
        prune_start: first layer that sees fewer visual tokens (chosen from the
            importance at layer ``prune_start - 1``). Default: half the depth.
            Given alone, the step still ends at three quarters of depth: on 28 layers
            ``prune_start=15`` gives steps of 1/7 (none left from layer 21); give
            ``prune_step`` too to fix the step (``prune_start=15, prune_step=0.125`` is the
            official code's schedule, one layer later than the paper's table).
        prune_step: fraction of the LLM's visual tokens removed at each layer from
            `prune_start` on. Default: ``1 / (end - start + 1)`` with end at three
            quarters of depth (the paper's 12.5% for 28 layers).
        prune_keep_ratios: explicit per-layer fractions of the visual tokens that
            entered the LLM, one per decoder layer, non-increasing, first entry 1.0.
            Overrides `prune_start` / `prune_step`.
        prune: set False to disable pruning (merge only).
        tau: PageRank softmax temperature (applied on top of 1/sqrt(d) scaling).
        pagerank_iterations: power iterations of ``s = s @ M``.
        prune_mode: ``"remove"`` physically drops pruned tokens (hidden states, RoPE,
            masks, KV cache all shrink); ``"mask"`` only masks them as keys, the
            reference the public AIM code uses. Useful for checking and comparisons.
        merge_method: how each frame / crop is reduced before the LLM: ``"bipartite"`` (AIM's
            similarity merging), or the baselines ``"pool"`` (uniform spatial average pooling
            of square grids to the closest rows x cols grid), ``"random"`` (random dropping) and
            ``"evs"`` (vLLM's video pruning, per video: the tokens least like the same place of the
            previous frame stay, `aim.baselines.evs_retention`; images are left as they are). The
            baselines only use the final fraction of `merge_schedule`.
        prune_method: how visual tokens are ranked at pruning layers: ``"pagerank"`` (AIM), or
            the baselines ``"last_token"`` (FastV: attention from the last token, mean over
            heads) and ``"random"``.
        seed: seed of the random baselines (the same tokens for the same input).
        temporal_keep: temporal merging of videos, before the per-frame merging: the fraction of
            each frame's tokens (after the first frame) that stay; the others, the tokens most
            similar to a token of the frames before, merge into it (`aim.temporal`). ``1.0``: off.
        temporal_threshold: instead of `temporal_keep`, merge every token whose cosine similarity
            to its best match in the earlier frames is at least this (token counts then depend on
            the video). None: off.
        temporal_window: how many earlier frames a token is matched against.
        prune_action: what happens to the visual tokens a pruning layer removes: ``"drop"`` (AIM)
            or ``"merge"``: each merges (size-weighted, by hidden-state cosine similarity) into
            the most similar visual token that stays, as HoliTom does inside the LLM.
        merged_positions: the RoPE positions of the tokens left by merging before the LLM:
            ``"destination"`` (default) keeps each token's own input position, so a merged token
            takes its destination's (gaps where tokens merged away); ``"contiguous"`` renumbers
            them without gaps, as the official AIM code and aim's vLLM plugin do (vLLM fixes
            positions before the encoder runs): 1-D RoPE counts on, 3-D M-RoPE lays each frame's
            tokens out as one row (`aim.positions`). Decoding continues after the last position.
        proportional_attention: ToMe's proportional attention: a token that stands for ``s``
            merged tokens (merging before the LLM, or ``prune_action="merge"``) gets ``log(s)`` added
            to its attention logits as a key, in every layer and every later decoding step, so it
            draws the attention its ``s`` tokens would have drawn together (exactly so for ``s``
            identical tokens at one position). Off by default; `benchmarks/proportional_attention.py`
            measures it.
        frame_keep: fraction of each video's frames the vision tower encodes (``1.0``: all). The
            frames kept are evenly spaced from the first to the last (`aim.counts.kept_frames`);
            the others are never encoded, and their placeholder tokens are removed before the
            first decoder layer, so the vision tower, the LLM and the KV cache all see fewer
            frames (with ``prune_mode="mask"`` they stay in the sequence, masked as keys). The frames kept keep their own positions (with ``merged_positions=
            "contiguous"``, the LLM sees exactly the shorter video). Merging and pruning then
            work on the frames kept. Videos of LLaVA-OneVision and LLaVA-NeXT-Video only (Qwen's
            vision towers encode frames in pairs, with positions from the frame grid: give those
            fewer frames in the processor instead); images are unchanged.
    """

    enabled: bool = True
    merge_schedule: tuple[float, ...] = DEFAULT_MERGE_SCHEDULE
    merge_keep: float | None = None
    prune: bool = True
    prune_start: int | None = None
    prune_step: float | None = None
    prune_keep_ratios: tuple[float, ...] | None = None
    tau: float = 0.1
    pagerank_iterations: int = 5
    prune_mode: str = "remove"
    merge_method: str = "bipartite"
    prune_method: str = "pagerank"
    seed: int = 0
    temporal_keep: float = 1.0
    temporal_threshold: float | None = None
    temporal_window: int = 1
    prune_action: str = "drop"
    merged_positions: str = "destination"
    proportional_attention: bool = False
    frame_keep: float = 1.0

    def __post_init__(self) -> None:
        if self.merge_keep is not None:
            self.merge_schedule = merge_schedule_for_keep(float(self.merge_keep))
        self.merge_schedule = tuple(float(x) for x in self.merge_schedule)
        previous = 1.0
        for i, keep in enumerate(self.merge_schedule):
            if not 0.0 < keep <= 1.0:
                raise ValueError(f"merge_schedule[{i}] = {keep} must be in (0, 1]")
            if keep > previous:
                raise ValueError(f"merge_schedule must be non-increasing, got {self.merge_schedule}")
            if keep < previous / 2 - 1e-9:
                raise ValueError(
                    f"merge step {i} keeps {keep} of the tokens after {previous}: a bipartite step can "
                    f"remove at most half of the tokens present (allowed: >= {previous / 2:g}). "
                    "Use more steps, e.g. merge_keep=<target> builds halving steps."
                )
            previous = keep
        if self.prune_keep_ratios is not None:
            self.prune_keep_ratios = tuple(float(x) for x in self.prune_keep_ratios)
            _check_keep_ratios(self.prune_keep_ratios)
            if self.prune_start is not None or self.prune_step is not None:
                raise ValueError("give either prune_keep_ratios or prune_start/prune_step, not both")
        if self.prune_start is not None and (not isinstance(self.prune_start, int) or self.prune_start < 1):
            raise ValueError(
                f"prune_start must be an integer >= 1 (layer 0 always sees every token, its importance "
                f"picks the tokens of layer 1), got {self.prune_start!r}"
            )
        if self.prune_step is not None and not 0.0 < self.prune_step <= 1.0:
            raise ValueError(f"prune_step must be in (0, 1], got {self.prune_step!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if not isinstance(self.pagerank_iterations, int) or self.pagerank_iterations < 1:
            raise ValueError(f"pagerank_iterations must be an integer >= 1, got {self.pagerank_iterations!r}")
        if self.prune_mode not in PRUNE_MODES:
            raise ValueError(f"prune_mode must be one of {PRUNE_MODES}, got {self.prune_mode!r}")
        if self.merge_method not in MERGE_METHODS:
            raise ValueError(f"merge_method must be one of {MERGE_METHODS}, got {self.merge_method!r}")
        if self.prune_method not in PRUNE_METHODS:
            raise ValueError(f"prune_method must be one of {PRUNE_METHODS}, got {self.prune_method!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self._check_temporal()
        if self.prune_action not in PRUNE_ACTIONS:
            raise ValueError(f"prune_action must be one of {PRUNE_ACTIONS}, got {self.prune_action!r}")
        if self.merged_positions not in MERGED_POSITIONS:
            raise ValueError(f"merged_positions must be one of {MERGED_POSITIONS}, got {self.merged_positions!r}")
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(f"proportional_attention must be True or False, got {self.proportional_attention!r}")
        if isinstance(self.frame_keep, bool) or not isinstance(self.frame_keep, (int, float)) \
                or not 0.0 < self.frame_keep <= 1.0:
            raise ValueError(f"frame_keep is the fraction of each video's frames encoded, in (0, 1]; got {self.frame_keep!r}")
        self.frame_keep = float(self.frame_keep)

    def _check_temporal(self) -> None:
        self.temporal_keep = float(self.temporal_keep)
        if not 0.0 < self.temporal_keep <= 1.0:
            raise ValueError(f"temporal_keep must be in (0, 1], got {self.temporal_keep!r}")
        if self.temporal_threshold is not None:
            self.temporal_threshold = float(self.temporal_threshold)
            if not -1.0 <= self.temporal_threshold <= 1.0:
                raise ValueError(f"temporal_threshold is a cosine similarity in [-1, 1], got {self.temporal_threshold!r}")
            if self.temporal_keep < 1.0:
                raise ValueError("give either temporal_keep (a fraction) or temporal_threshold (a similarity), not both")
        if isinstance(self.temporal_window, bool) or not isinstance(self.temporal_window, int) or self.temporal_window < 1:
            raise ValueError(f"temporal_window must be an integer >= 1 (earlier frames matched), got {self.temporal_window!r}")
        if self.temporal_merging and self.merge_method == "evs":
            raise ValueError("EVS prunes whole videos itself; use it without temporal merging (temporal_keep=1.0)")
        if self.temporal_merging and self.merge_method == "pool":
            raise ValueError(
                "temporal merging leaves frames of different sizes, which uniform pooling (square grids) "
                "cannot reduce; use merge_method='bipartite' or 'random' with it"
            )

    @property
    def temporal_merging(self) -> bool:
        """Whether videos are merged across frames (before the per-frame step)."""
        return self.enabled and (self.temporal_keep < 1.0 or self.temporal_threshold is not None)

    @property
    def drops_frames(self) -> bool:
        """Whether the vision tower encodes only some of each video's frames."""
        return self.enabled and self.frame_keep < 1.0

    @property
    def merges_before_llm(self) -> bool:
        """Whether visual tokens are merged before the LLM (within frames, across frames or both)."""
        return self.enabled and (bool(self.merge_schedule) or self.temporal_merging)

    @property
    def merges_tokens(self) -> bool:
        """Whether a kept token may stand for several input tokens: merged before the LLM, or by
        pruning layers that merge what they remove (what `proportional_attention` weighs)."""
        return self.merges_before_llm or (self.enabled and self.prune and self.prune_action == "merge")

    def replace(self, **overrides) -> "AIMConfig":
        """A copy with some fields changed (validated again)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown AIM option(s) {unknown}; allowed: {sorted(names)}")
        if overrides.get("temporal_threshold") is not None:
            overrides.setdefault("temporal_keep", 1.0)
        if overrides.get("temporal_keep", 1.0) < 1.0:
            overrides.setdefault("temporal_threshold", None)
        if "merge_schedule" in overrides and "merge_keep" not in overrides:
            overrides["merge_keep"] = None
        if ("prune_start" in overrides or "prune_step" in overrides) and "prune_keep_ratios" not in overrides:
            overrides["prune_keep_ratios"] = None
        if "prune_keep_ratios" in overrides and overrides["prune_keep_ratios"] is not None:
            overrides.setdefault("prune_start", None)
            overrides.setdefault("prune_step", None)
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "merge_keep" not in overrides:
            current["merge_keep"] = None  # merge_schedule already holds its effect
        current.update(overrides)
        return AIMConfig(**current)

    def keep_ratios(self, num_layers: int) -> tuple[float, ...]:
        """Per-layer fraction of the LLM's visual tokens each decoder layer sees."""
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not self.prune:
            return (1.0,) * num_layers
        if self.prune_keep_ratios is not None:
            if len(self.prune_keep_ratios) != num_layers:
                raise ValueError(
                    f"prune_keep_ratios has {len(self.prune_keep_ratios)} entries but the model has "
                    f"{num_layers} decoder layers: give exactly one ratio per layer"
                )
            return self.prune_keep_ratios
        start, end = default_prune_start_end(num_layers)
        if self.prune_start is not None:
            start = self.prune_start
        if start >= num_layers:
            raise ValueError(
                f"prune_start={start} is past the model's last layer (the model has {num_layers} decoder "
                f"layers, allowed prune_start: 1..{num_layers - 1})"
            )
        if start < 1:
            raise ValueError(f"this model is too shallow to prune ({num_layers} layer(s)); set prune=False")
        step = self.prune_step if self.prune_step is not None else 1.0 / max(end - start + 1, 1)
        return tuple(1.0 if layer < start else max(0.0, 1.0 - (layer - start + 1) * step) for layer in range(num_layers))

    def is_identity(self, num_layers: int) -> bool:
        """True when this config changes nothing (no merging, every layer keeps every token)."""
        return (not self.enabled) or (
            all(k >= 1.0 for k in self.merge_schedule)
            and all(r >= 1.0 for r in self.keep_ratios(num_layers))
            and not self.temporal_merging
            and not self.drops_frames
        )

    def describe(self, num_layers: int) -> str:
        """One readable sentence of what this config does to a model of `num_layers` layers."""
        if not self.enabled:
            return "off: the unchanged model"
        merge_names = {"bipartite": "merging", "pool": "uniform pooling", "random": "random dropping"}
        if self.merge_schedule and self.merge_schedule[-1] < 1.0 and self.merge_method == "evs":
            merge = (f"EVS keeps {self.merge_schedule[-1]:.0%} of each video's visual tokens (the least like the "
                     "previous frame; images unchanged)")
        elif self.merge_schedule and self.merge_schedule[-1] < 1.0:
            steps = ", ".join(f"{k:.0%}" for k in self.merge_schedule)
            merge = f"{merge_names[self.merge_method]} keeps {self.merge_schedule[-1]:.0%} of each frame's / crop's visual tokens"
            if self.merge_method == "bipartite":
                merge += f" (steps {steps})"
        else:
            merge = "no merging"
        if self.temporal_merging:
            when = (f"similarity >= {self.temporal_threshold:g}" if self.temporal_threshold is not None
                    else f"{self.temporal_keep:.0%} of each later frame kept")
            window = "the frame" if self.temporal_window == 1 else f"the {self.temporal_window} frames"
            merge = f"temporal merging into {window} before ({when}), then {merge}"
        if self.drops_frames:
            merge = f"{self.frame_keep:.0%} of each video's frames encoded (evenly spaced); {merge}"
        ratios = self.keep_ratios(num_layers)
        pruned = [(layer, r) for layer, r in enumerate(ratios) if r < 1.0]
        proportional = "; proportional attention to merged tokens" if self.proportional_attention else ""
        if not pruned:
            return f"{merge}; no pruning{proportional}"
        ranking = {"pagerank": "PageRank", "last_token": "last-token attention", "random": "random ranks"}
        shown = []
        for layer, r in pruned:
            if r == 0.0:
                shown.append(f"none from layer {layer}")
                break
            shown.append(f"{r:.1%} at layer {layer}".replace(".0%", "%"))
        mode = "" if self.prune_mode == "remove" else ", masked instead of removed"
        if self.prune_action == "merge":
            mode += ", pruned tokens merged into the most similar kept one"
        return f"{merge}; pruning by {ranking[self.prune_method]}{mode} keeps " + ", ".join(shown) + \
            f" of the visual tokens entering the {num_layers}-layer LLM" + proportional

    def check_depth(self, num_layers: int) -> None:
        """Raise a clear error if the schedule does not fit a model of `num_layers` layers."""
        self.keep_ratios(num_layers)


def _check_keep_ratios(ratios: Sequence[float]) -> None:
    if not ratios:
        raise ValueError("prune_keep_ratios must not be empty")
    for i, r in enumerate(ratios):
        if not 0.0 <= r <= 1.0 or math.isnan(r):
            raise ValueError(f"prune_keep_ratios[{i}] = {r} must be in [0, 1]")
        if i and r > ratios[i - 1]:
            raise ValueError(
                f"prune_keep_ratios must be non-increasing (a pruned token cannot come back), "
                f"but layer {i} has {r} > {ratios[i - 1]}"
            )
    if ratios[0] != 1.0:
        raise ValueError(
            "prune_keep_ratios[0] must be 1.0: layer 0 sees every token and its importance "
            "selects the tokens of layer 1"
        )


def visual_tokens_kept(num_visual: int, fraction: float) -> int:
    """How many of `num_visual` tokens a keep fraction leaves (round half up).

    The one rounding rule shared by merging, pruning, stats and the FLOPs model.
    """
    return min(num_visual, int(math.floor(num_visual * fraction + 0.5)))
