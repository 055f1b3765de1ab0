"""Rendering of the study's synthetic frames: textured muted backgrounds, per-frame grain, and
saturated shapes (sprites) that carry the answers (:mod:`aim.study.data` builds scenes of them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35), "green": (35, 185, 55), "blue": (40, 75, 235), "yellow": (240, 220, 35),
}
SHAPES = ("square", "circle", "triangle")
HALF_SIZE = (10, 14)  # half-size range of a shape in pixels (a 20-28 px shape covers ~3x3 patches of 8 px)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour: a grey level with a small tint (channels within +-22 of it)."""
    return rng.uniform(70, 170) + rng.uniform(-22, 22, size=3)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured float background ``(size, size, 3)``: smooth noise, stripes or a gradient."""
    a, b = _muted_colour(rng), _muted_colour(rng)
    coords = np.arange(size, dtype=np.float32) / size
    texture = rng.integers(3)
    if texture == 0:  # smooth noise: a coarse random grid, bilinearly upsampled
        cells = int(rng.integers(3, 7))
        grid = rng.uniform(0, 1, size=(cells + 1, cells + 1)).astype(np.float32)
        pos = coords * cells
        i = np.minimum(pos.astype(int), cells - 1)
        f = pos - i
        rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (size, cells + 1)
        weight = rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]
    elif texture == 1:  # stripes of random orientation and period
        theta, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3)
        proj = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]
        weight = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period + rng.uniform(0, 2 * np.pi))
    else:  # linear gradient in a random direction
        theta = rng.uniform(0, 2 * np.pi)
        proj = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]
        weight = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    return a + (b - a) * weight[..., None].astype(np.float32)


def shape_masks(shape: str, cx: np.ndarray, cy: np.ndarray, half: float, size: int) -> np.ndarray:
    """Boolean masks ``(n, size, size)`` of a filled shape centred at ``(cx[k], cy[k])``.

    ``half`` is the half-size in pixels; triangles point up (apex at ``cy - half``).
    """
    ys = np.arange(size, dtype=np.float32)[None, :, None]
    xs = np.arange(size, dtype=np.float32)[None, None, :]
    dx = xs - np.asarray(cx, dtype=np.float32)[:, None, None]
    dy = ys - np.asarray(cy, dtype=np.float32)[:, None, None]
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "triangle":
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@dataclass
class Sprite:
    """A shape of one colour and its centre and visibility in each frame."""

    shape: str
    colour: str
    half: float
    cx: np.ndarray  # (T,) centre per frame
    cy: np.ndarray
    visible: np.ndarray  # (T,) bool

    def box(self, t: int) -> tuple[float, float, float, float]:
        return (self.cx[t] - self.half, self.cy[t] - self.half, self.cx[t] + self.half, self.cy[t] + self.half)


def render_frames(rng: np.random.Generator, sprites: Sequence[Sprite], frames: int, size: int) -> np.ndarray:
    """Frames ``(T, size, size, 3)`` uint8: one background for the clip, per-frame grain, sprites."""
    video = np.broadcast_to(background(rng, size), (frames, size, size, 3)).copy()
    video += rng.normal(0.0, 3.0, size=(frames, size, size, 1)).astype(np.float32)
    for sprite in sprites:
        shown = np.flatnonzero(sprite.visible)
        masks = shape_masks(sprite.shape, sprite.cx[shown], sprite.cy[shown], sprite.half, size)
        tint = np.asarray(COLOURS[sprite.colour], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        for k, t in enumerate(shown):
            video[t][masks[k]] = tint
    return np.clip(video, 0, 255).astype(np.uint8)


def _overlaps(box: tuple, others: Sequence[tuple], margin: float = 3.0) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin for b in others)


def still_sprite(rng: np.random.Generator, colour: str, frames: int, size: int, visible: np.ndarray,
           avoid: Sequence[tuple], shape: str | None = None, region: tuple | None = None,
           scale: float = 1.0, half_size: tuple[float, float] = HALF_SIZE, tries: int = 30) -> Sprite | None:
    """A still sprite placed off the boxes in ``avoid`` (``None`` if no place is found).

    ``region``: ``(x_min, x_max, y_min, y_max)`` bounds of the centre; default the whole frame.
    """
    half = float(rng.uniform(*half_size)) * scale
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    lo, hi = half + 2, size - half - 2
    x_min, x_max, y_min, y_max = region or (lo, hi, lo, hi)
    for _ in range(tries):
        cx, cy = rng.uniform(max(x_min, lo), min(x_max, hi)), rng.uniform(max(y_min, lo), min(y_max, hi))
        box = (cx - half, cy - half, cx + half, cy + half)
        if not _overlaps(box, avoid):
            return Sprite(shape, colour, half, np.full(frames, cx), np.full(frames, cy), visible)
    return None
