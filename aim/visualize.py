"""See which visual tokens AIM keeps: after merging, and after each pruning layer, over the frames.

    from aim.visualize import record_kept_tokens, render_kept_tokens
    with torch.no_grad(), record_kept_tokens(model):
        model(**inputs)
    render_kept_tokens(aim.last_stats(model), frames, "kept.png")

`record_kept_tokens` makes the next prefill store, in `AIMStats.kept_visual_positions`, the
prompt positions of the visual tokens present after merging and after every pruning layer,
and in `AIMStats.visual_groups` the positions of each frame's tokens (row-major grids).
`render_kept_tokens` draws one row per stage and one column per frame: the frame, dimmed
where its tokens are gone.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .optional import require
from .stats import AIMStats


@contextlib.contextmanager
def record_kept_tokens(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, prefills record which visual tokens each stage kept (see module doc)."""
    from .patch import recording_positions

    with recording_positions(model):
        yield


def kept_grids(stats: AIMStats, sample: int = 0) -> tuple[list[str], np.ndarray]:
    """``(stage labels, kept)`` with ``kept[stage, frame, row, col]`` True where the token of
    that grid cell is present after the stage (the first stage is the input, all True).

    A merged or pooled token is drawn at the position it carries (its destination's / its
    region's top-left), so merging shows as the survivors.
    """
    if stats.kept_visual_positions is None or stats.visual_groups is None:
        raise ValueError("no kept positions recorded: run the prefill inside record_kept_tokens(model)")
    groups = stats.visual_groups[sample]
    if not groups:
        raise ValueError(f"sample {sample} has no visual groups (frames / crops) to draw")
    sides = {math.isqrt(len(g)) for g in groups}
    if len(sides) != 1 or any(math.isqrt(len(g)) ** 2 != len(g) for g in groups):
        raise ValueError("drawing needs every frame to be a square grid of the same size")
    side = sides.pop()
    cell = {pos: (f, i // side, i % side) for f, group in enumerate(groups) for i, pos in enumerate(group)}
    labels = ["input"]
    kept = [np.ones((len(groups), side, side), dtype=bool)]
    for stage, positions in stats.kept_visual_positions:
        grid = np.zeros((len(groups), side, side), dtype=bool)
        for pos in positions[sample]:
            if pos in cell:  # markers (e.g. a video newline) are in no frame
                grid[cell[pos]] = True
        kept.append(grid)
        labels.append("merged" if stage == "merge" else f"layer {stage}")
    return labels, np.stack(kept)


def render_kept_tokens(
    stats: AIMStats,
    frames: np.ndarray | Sequence[np.ndarray],
    path: str | Path,
    sample: int = 0,
    max_stages: int | None = None,
) -> Path:
    """Draw the frames of `sample` once per stage with removed tokens dimmed; save a PNG.

    Args:
        stats: `aim.last_stats(model)` of a prefill run inside `record_kept_tokens`.
        frames: ``(frames, height, width, 3)`` uint8 (or floats in [0, 1]), the clip as shown to
            the model (one frame per merge group).
        path: where to write the PNG.
        sample: which prompt of the batch.
        max_stages: draw at most this many stages (input and merging first, then pruning
            layers evenly spaced; the last one always drawn).
    """
    plt = require("matplotlib.pyplot", "drawing kept tokens (aim visualize)")

    if max_stages is not None and max_stages < 3:
        raise ValueError(f"max_stages must be at least 3 (input, merged, one pruning layer) or None, got {max_stages}")
    labels, kept = kept_grids(stats, sample)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).astype(np.uint8)
    if frames.ndim != 4 or frames.shape[0] != kept.shape[1]:
        raise ValueError(f"expected {kept.shape[1]} frames as (frames, height, width, 3), got {frames.shape}")
    order = list(range(len(labels)))
    if max_stages is not None and len(order) > max_stages >= 3:
        rest = order[2:]
        picks = np.linspace(0, len(rest) - 1, max_stages - 2).round().astype(int)
        order = order[:2] + [rest[i] for i in sorted(set(picks))]
    num_frames, height, width = frames.shape[:3]
    fig, axes = plt.subplots(len(order), num_frames, figsize=(1.4 * num_frames, 1.5 * len(order)), squeeze=False)
    for row, stage in enumerate(order):
        count = int(kept[stage].sum())
        for f in range(num_frames):
            mask = np.kron(kept[stage, f], np.ones((-(-height // kept.shape[2]), -(-width // kept.shape[3]))))
            mask = mask[:height, :width, None].astype(bool)
            shown = np.where(mask, frames[f], (frames[f] * 0.15 + 20).astype(np.uint8))
            ax = axes[row, f]
            ax.imshow(shown)
            ax.set_xticks([])
            ax.set_yticks([])
            if f == 0:
                ax.set_ylabel(f"{labels[stage]}\n{count} tokens", fontsize=8)
            if row == 0:
                ax.set_title(f"frame {f}", fontsize=8)
    fig.suptitle("visual tokens kept (dimmed: merged away or pruned)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def visualize_study_clip(
    path: str | Path,
    index: int = 0,
    kind: str = "motion_direction",
    max_stages: int | None = 6,
    model_dir: str | Path | None = None,
    **aim_options,
) -> tuple[Path, dict]:
    """Render the kept tokens of the embedded default model on test clip `index` of `kind`.

    `aim_options` configure AIM as in `apply_aim` (default: the paper's schedule). Returns the
    PNG path and what the model answered (``question``, ``answer``, ``predicted``).
    """
    from . import apply_aim, last_stats, remove_aim
    from .study import data
    from .study.evaluate import predict
    from .study.model import load_default_model

    if kind not in data.VIDEO_KINDS:
        raise ValueError(f"kind must be a video question kind {data.VIDEO_KINDS}, got {kind!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    model, processor = load_default_model(model_dir)
    example = data.make_example(data.split_seed("test", index), kind)
    apply_aim(model, **aim_options)
    try:
        with torch.no_grad(), record_kept_tokens(model):
            predicted = predict(model, processor, [example])[0]  # the one prefill that is drawn
        stats = last_stats(model)
    finally:
        remove_aim(model)
    out = render_kept_tokens(stats, example.pixels, path, max_stages=max_stages)
    return out, {"question": example.question, "answer": example.answer, "predicted": predicted}
