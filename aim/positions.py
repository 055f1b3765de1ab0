"""RoPE positions of the tokens merging leaves before the LLM (``merged_positions``).

``"destination"`` (aim's default) changes nothing: every token that stays keeps its input
position, so a merged token takes its destination token's position and the positions of the
tokens merged away become gaps. ``"contiguous"`` renumbers what stays without gaps, as a prompt
that only ever held the merged tokens would be numbered; this is what the official AIM code gives
(it shortens the sequence) and what vLLM computes (it fixes positions when a request arrives,
before the encoder runs), so aim's vLLM plugin and the transformers path agree under it:

- 1-D RoPE (LLaVA families): the tokens that stay count on from the first one.
- 3-D M-RoPE (Qwen families): each image / video (a run of visual tokens) starts where the text
  before it ends; a frame's tokens that stay keep their frame's temporal offset and are laid out
  as one row (height offset 0, width offset 0, 1, 2, ... in order), i.e. the positions of a grid
  of ``(frames, 1, kept per frame)`` tokens; the text after starts at the largest position of the
  run + 1 over all three axes, as vLLM numbers it (transformers 5.24's own rope index resumes
  after the spatial extent only, which differs from vLLM when a video's time axis is the longest,
  with or without aim). `mrope_row_layout` is the same rule for the vLLM plugin.

Text positions after a merged image shift by the same amount in every later chunk (decoding
steps, verification passes): the shift per prompt is returned and kept with the KV cache.
"""

from __future__ import annotations

from typing import Sequence

import torch


def contiguous_positions(
    position_ids: torch.Tensor, stays: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor,
    groups: Sequence[Sequence[torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Renumber the slots that stay after merging.

    Args:
        position_ids: the chunk's RoPE positions, ``(batch, seq)`` (1-D RoPE) or ``(3, batch, seq)``
            (M-RoPE rows t / h / w).
        stays: ``(batch, seq)`` the valid slots merging kept (text and visual).
        valid: ``(batch, seq)`` the slots of the input that are not padding (numbering starts at
            the first, even where merging removed it).
        visual: ``(batch, seq)`` the visual slots of the input (before merging).
        groups: per sample, the sequence positions of each frame / crop (`aim.layout.VisualLayout`).
    Returns:
        ``(position_ids, shift)``: the new positions (slots that do not stay keep theirs) and, per
        sample, how far the positions after the chunk move (``(batch,)``; under M-RoPE a row wider than the
        frame grid can move them forward).
    """
    if position_ids.ndim == 2:
        return _contiguous_1d(position_ids, stays, valid)
    if position_ids.ndim != 3:
        raise ValueError(f"position ids of shape {tuple(position_ids.shape)}: expected (batch, seq) or (rows, batch, seq)")
    new = position_ids.clone()
    shift = torch.zeros(position_ids.shape[1], dtype=position_ids.dtype, device=position_ids.device)
    for sample in range(position_ids.shape[1]):
        new[:, sample], shift[sample] = _contiguous_mrope(
            position_ids[:, sample], stays[sample], visual[sample] & valid[sample], groups[sample] if sample < len(groups) else []
        )
    return new, shift


def _contiguous_1d(position_ids: torch.Tensor, stays: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    first = valid.int().argmax(dim=1, keepdim=True)
    base = position_ids.gather(1, first)
    rank = stays.long().cumsum(dim=1) - 1
    new = torch.where(stays, base + rank, position_ids)
    last = stays.shape[1] - 1 - stays.flip(1).int().argmax(dim=1, keepdim=True)
    shift = (new.gather(1, last) - position_ids.gather(1, last)).squeeze(1)
    return new, torch.where(stays.any(1), shift, torch.zeros_like(shift))


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of consecutive slot numbers."""
    runs: list[tuple[int, int]] = []
    for slot in slots:
        if runs and runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], slot + 1)
        else:
            runs.append((slot, slot + 1))
    return runs


def _contiguous_mrope(old: torch.Tensor, stays: torch.Tensor, visual: torch.Tensor, groups) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's ``(3, seq)`` M-RoPE positions under the contiguous rule (module docstring)."""
    new = old.clone()
    delta = old.new_zeros(())
    done = 0
    group_starts = sorted(((int(g.min()), g) for g in groups if g.numel()), key=lambda item: item[0])
    for start, end in _runs(visual.nonzero().flatten().tolist()):
        new[:, done:start] = old[:, done:start] + delta
        block = old[:, start:end]
        origin = block.min()
        new_origin = origin + delta
        kept_block = stays[start:end]
        new[:, start:end] = block + delta  # visual slots outside every frame (markers), if any
        for first, group in group_starts:
            if not start <= first < end:
                continue
            group = group.to(stays.device)
            kept = group[stays[group]].sort().values
            if kept.numel() == 0:
                continue
            new[0, kept] = new_origin + (old[0, kept] - origin)
            new[1, kept] = new_origin
            new[2, kept] = new_origin + torch.arange(kept.numel(), device=old.device, dtype=old.dtype)
        if bool(kept_block.any()):
            # the text after the run goes on at the run's largest position + 1 (vLLM's numbering),
            # wherever the input's own numbering had put it
            resumes = old[0, end] if end < old.shape[1] and bool(stays[end]) else block.max() + 1
            delta = new[:, start:end][:, kept_block].max() + 1 - resumes
        done = end
    new[:, done:] = old[:, done:] + delta
    return new, delta


def mrope_row_layout(kept_per_frame: Sequence[int]) -> tuple[int, int, int]:
    """The ``(frames, height, width)`` token grid under which a model that numbers a grid the Qwen way
    gives one image / video's merged tokens the contiguous positions above: one row per frame,
    as wide as the tokens each frame keeps (which merging makes equal across frames)."""
    widths = set(kept_per_frame)
    if len(widths) != 1:
        raise ValueError(f"the contiguous M-RoPE layout needs equal kept tokens per frame, got {list(kept_per_frame)}")
    return len(kept_per_frame), 1, widths.pop()


def mrope_slice_times(frames: int, time_scale: float = 1.0) -> torch.Tensor:
    """Temporal M-RoPE offset of each of `frames` slices: ``int(f * time_scale)`` (seconds per slice
    times tokens per second, truncated as vLLM and transformers do)."""
    steps = torch.arange(frames, dtype=torch.float64)
    return (steps * time_scale).long() if time_scale != 1.0 else steps.long()


def mrope_resume(grid_thw: Sequence[int], time_scale: float = 1.0) -> int:
    """Where the text after an unmerged image / video of LLM token grid ``(frames, height, width)``
    resumes, relative to the item's start: its largest position + 1 over all three axes, as vLLM
    numbers it (transformers 5.24 resumes after the spatial extent, max(height, width), which
    differs when the time axis is the longest)."""
    frames, height, width = (int(x) for x in grid_thw)
    return max(int(mrope_slice_times(frames, time_scale)[-1]), height - 1, width - 1) + 1


def destination_mrope(grid_thw: Sequence[int], index: torch.Tensor, time_scale: float = 1.0) -> torch.Tensor:
    """Destination M-RoPE positions of one image's / video's merged tokens, relative to where the
    item starts, for a serving engine that renumbers a prompt after its encoder ran (vLLM's
    multimodal pruning interface): ``(frames * kept, 4)`` long rows ``[t, h, w, resume]``.

    `grid_thw`: the item's LLM token grid ``(frames, height, width)``; `index`: ``(frames, kept)``
    where in its frame's ``height * width`` grid each survivor was (`aim.merge.merge_frames`).
    A survivor keeps its destination's position: frame ``f`` at `mrope_slice_times`, row and
    column of its place in the grid. ``resume`` (the same in every row) is `mrope_resume`."""
    frames, height, width = (int(x) for x in grid_thw)
    if index.dim() != 2 or index.shape[0] != frames:
        raise ValueError(f"expected the survivors' index per frame, ({frames}, kept), got {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= height * width):
        raise ValueError(f"survivor index outside a frame of {height} x {width} tokens")
    index = index.long().cpu()
    t = mrope_slice_times(frames, time_scale).unsqueeze(1).expand_as(index)
    resume = mrope_resume(grid_thw, time_scale)
    rows = torch.stack([t, index // width, index % width, torch.full_like(index, resume)], dim=-1)
    return rows.reshape(-1, 4)
