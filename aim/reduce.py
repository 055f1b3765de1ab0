"""Merging applied to a prompt chunk in the engine: before the LLM (temporal, then per frame /
crop) and, with ``prune_action="merge"``, inside it (pruned tokens merge into kept ones).

Both work on a `aim.tokens.TokenSet` in place: the features of the tokens that stay become the
size-weighted means of what merged into them (hidden states and carried features such as
Qwen3-VL's DeepStack features alike), their sizes add up, and `TokenSet.keep` drops the rest.
A token that stays keeps its own position, so positions stay those of the input.
"""

from __future__ import annotations

import torch

from .baselines import evs_retention, reduce_groups
from .config import AIMConfig
from .layout import VisualLayout
from .merge import best_match
from .temporal import merge_into, temporal_destinations
from .tokens import TokenSet, kept_first


def merge_before_llm(tokens: TokenSet, layout: VisualLayout, config: AIMConfig, generator: torch.Generator) -> None:
    """Removal of the frames the vision tower did not encode (`layout.dropped`), temporal merging
    of each video (when configured), then the per-frame / per-crop step of `config.merge_method`,
    on the chunk's visual tokens; every other token stays as it is."""
    keep = tokens.valid.clone()
    if layout.dropped is not None:
        keep &= ~layout.dropped.to(keep.device)
    if not config.merges_before_llm:
        tokens.keep(keep)
        return
    tokens.hidden = tokens.hidden.clone()
    if tokens.extras is not None:
        tokens.extras = tokens.extras.clone()
    device = tokens.hidden.device
    for sample, sample_groups in enumerate(layout.groups):
        groups = _to_device(sample_groups, device)
        if config.temporal_merging:
            for video in layout.videos[sample] if sample < len(layout.videos) else ():
                _merge_video(tokens, sample, groups, video, config, keep)
        if config.merge_schedule and config.merge_method == "evs":
            for video in layout.videos[sample] if sample < len(layout.videos) else ():
                _prune_video_evs(tokens, sample, groups, video, config.merge_schedule[-1], keep)
        elif config.merge_schedule:
            _merge_groups(tokens, sample, groups, config, keep, generator)
    tokens.keep(keep)


def _to_device(groups: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A prompt's group positions on `device` in one copy (on a GPU, each copy waits for the device)."""
    if not groups:
        return []
    return list(torch.cat(list(groups)).to(device).split([g.numel() for g in groups]))


def _values(tokens: TokenSet, sample: int, positions: torch.Tensor) -> torch.Tensor:
    """Hidden states with the carried features appended, at `positions` of `sample`."""
    values = tokens.hidden[sample, positions]
    if tokens.extras is None:
        return values
    return torch.cat([values, tokens.extras[sample, positions].to(values.dtype)], dim=-1)


def _store(tokens: TokenSet, sample: int, positions: torch.Tensor, values: torch.Tensor, sizes: torch.Tensor) -> None:
    dim = tokens.hidden.shape[-1]
    tokens.hidden[sample, positions] = values[..., :dim]
    if tokens.extras is not None:
        tokens.extras[sample, positions] = values[..., dim:].to(tokens.extras.dtype)
    tokens.sizes[sample, positions] = sizes


def _video_positions(groups, video, method: str) -> torch.Tensor:
    """``(T, n)`` positions of one video's frames (which must hold equal token counts)."""
    frames = [groups[i] for i in video]
    if len({f.numel() for f in frames}) != 1:
        raise ValueError(f"{method} needs a video's frames to hold equal token counts, got {[f.numel() for f in frames]}")
    return torch.stack(frames)


def _prune_video_evs(tokens, sample, groups, video, kept_fraction: float, keep) -> None:
    positions = _video_positions(groups, video, "EVS")
    # scored on the features with the carried ones appended, as vLLM scores Qwen3-VL's (DeepStack included)
    stays = evs_retention(_values(tokens, sample, positions), kept_fraction)
    _keep_rows(keep, sample, groups, video, positions, stays)


def _merge_video(tokens, sample, groups, video, config: AIMConfig, keep) -> None:
    positions = _video_positions(groups, video, "temporal merging")  # (T, n)
    count, n = positions.shape
    dest = temporal_destinations(
        tokens.hidden[sample, positions], keep=config.temporal_keep,
        threshold=config.temporal_threshold, window=config.temporal_window,
    )
    flat = positions.flatten()
    values, sizes = merge_into(_values(tokens, sample, flat), tokens.sizes[sample, flat], dest)
    _store(tokens, sample, flat, values, sizes)
    roots = (dest == torch.arange(dest.numel(), device=dest.device)).view(count, n)
    _keep_rows(keep, sample, groups, video, positions, roots)


def _keep_rows(keep, sample, groups, video, positions: torch.Tensor, stays: torch.Tensor) -> None:
    """Drop the video's tokens where `stays` ``(T, n)`` is False; each frame's group keeps the rest,
    in order. One wait for the device (the counts), not one per frame as boolean indexing would."""
    flat = positions.flatten()
    keep[sample, flat] = keep[sample, flat] & stays.flatten()
    counts = stays.sum(dim=1).tolist()
    first = positions.gather(1, kept_first(stays))
    for row, index in enumerate(video):
        groups[index] = first[row, : counts[row]]


def _merge_groups(tokens, sample, groups, config: AIMConfig, keep, generator) -> None:
    """The per-frame / per-crop step: groups of equal size are reduced together."""
    by_size: dict[int, list[torch.Tensor]] = {}
    for positions in groups:
        if positions.numel() >= 2:
            by_size.setdefault(positions.numel(), []).append(positions)
    for same_size in by_size.values():
        stacked = torch.stack(same_size)  # (groups, n)
        carry = tokens.extras[sample, stacked] if tokens.extras is not None else None
        merged = reduce_groups(
            tokens.hidden[sample, stacked], config.merge_schedule, config.merge_method, generator,
            sizes=tokens.sizes[sample, stacked], carry=carry,
        )
        survivors = stacked.gather(1, merged.index)
        values = merged.features if merged.carry is None else torch.cat([merged.features, merged.carry], dim=-1)
        keep[sample, stacked] = False
        keep[sample, survivors] = True
        _store(tokens, sample, survivors, values, merged.sizes)


def merge_pruned(tokens: TokenSet, keep: torch.Tensor) -> None:
    """Merge every visual token that `keep` removes into the visual token that stays whose hidden
    state is most cosine-similar (size-weighted), before `TokenSet.keep(keep)` drops it. A prompt
    that keeps no visual token drops its pruned ones as they are."""
    removed = tokens.valid & tokens.visual & ~keep
    stays = tokens.valid & tokens.visual & keep
    rows = (removed.any(1) & stays.any(1)).nonzero().flatten().tolist()
    if not rows:
        return
    tokens.hidden = tokens.hidden.clone()
    if tokens.extras is not None:
        tokens.extras = tokens.extras.clone()
    for b in rows:
        kept_slots, gone_slots = stays[b].nonzero().flatten(), removed[b].nonzero().flatten()
        _, match = best_match(tokens.hidden[b, gone_slots][None], tokens.hidden[b, kept_slots][None])
        slots = torch.cat([kept_slots, gone_slots])
        dest = torch.cat([torch.arange(kept_slots.numel(), device=slots.device), match[0]])
        values, sizes = merge_into(_values(tokens, b, slots), tokens.sizes[b, slots], dest)
        count = kept_slots.numel()
        _store(tokens, b, kept_slots, values[:count], sizes[:count])
