"""Synthetic video and image QA whose answers need visual evidence spread over frames and space.

Every example is generated from one integer seed (``numpy.random.default_rng(seed)``), so it is
the same on every machine and independent of the batch it is drawn in. The splits use disjoint
seed ranges (:data:`SPLIT_OFFSETS`): example ``i`` of split ``s`` has seed ``SPLIT_OFFSETS[s] + i``.

Frames are textured backgrounds (smooth noise, stripes or gradients in muted, low-saturation
colours, with a little per-frame grain), so most visual tokens are redundant as in real video, and
a few saturated shapes carry the answer. Scenes and their questions (each answer one word; the
``v2`` recipe also asks for each scene's templated description, 9-17 words):

==================  ==============================================================  ===========
kind                question (scene)                                                answers
==================  ==============================================================  ===========
motion_colour       colour of the object that moves (1-2 still distractors)         4 colours
motion_direction    direction of its motion                                         4 directions
motion_shape        shape of the moving object                                      3 shapes
count               how many objects of a colour appear; each in its own frame     1-4
event_time          when a single object flashes (visible in one frame only)        beginning/middle/end
image_colour        colour of the single object of an image                         4 colours
image_shape         its shape                                                       3 shapes
image_position      where it is (left / right / top / bottom of the image)          4 positions
==================  ==============================================================  ===========

How salient the evidence is depends on the :class:`Recipe` (:data:`RECIPES`): ``v1`` (the table above,
the first default model) draws shapes 20-28 px wide moving 4-6 px per frame past up to two still
distractors; ``v2`` draws them 24-32 px wide moving 7-10 px per frame past at most one, counts 1-3
rather than 1-4, and asks more about each scene in training (the still shape's colour; the flashing
shape's colour and shape; the scene's description, e.g. "a red circle moves left in the video .
the blue square stays still ."; :func:`description_of`). In training the description is always a
later turn of a conversation, never the first. Unless a recipe is named, the splits are :data:`DEFAULT_RECIPE`'s.

An :class:`Example` carries its pixels (uint8, ``(T, H, W, 3)`` for a video, ``(H, W, 3)`` for an
image) and one or more :class:`QA` about them: the first is the example's question; the others
(other questions about the same scene) are extra turns for training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .render import COLOURS, HALF_SIZE, SHAPES, Sprite, render_frames, still_sprite

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNTS = ("1", "2", "3", "4")
TIMES = ("beginning", "middle", "end")
POSITIONS = ("left", "right", "top", "bottom")

#: answer vocabulary of every question kind (answers are drawn uniformly from it)
ANSWERS: dict[str, tuple[str, ...]] = {
    "motion_colour": tuple(COLOURS),
    "motion_direction": tuple(DIRECTIONS),
    "motion_shape": SHAPES,
    "count": COUNTS,
    "event_time": TIMES,
    "image_colour": tuple(COLOURS),
    "image_shape": SHAPES,
    "image_position": POSITIONS,
}
KINDS = tuple(ANSWERS)
VIDEO_KINDS = ("motion_colour", "motion_direction", "motion_shape", "count", "event_time")
#: every answer word, in a fixed order (the closed answer vocabulary of the study)
ANSWER_WORDS: tuple[str, ...] = tuple(dict.fromkeys(w for kind in KINDS for w in ANSWERS[kind]))
#: words of the questions
QUESTION_WORDS = tuple(
    "what colour is the moving object ? which direction does move shape how many objects are there "
    "in video when flash image where still flashing".split()
)
#: words of the templated descriptions (:func:`description_of`); those the tokenizer lacks come last
#: in the study vocabulary, so that adding them kept every earlier word's token id
DESCRIPTION_WORDS = ("describe", "a", "moves", "flashes", "at", "of", "and", "stays")
#: the description question's kind (an extra turn of every scene under recipes with ``describe_turns``)
DESCRIBE = "describe"

SPLIT_OFFSETS = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SPLIT_SIZE = 1_000_000_000  # seeds per split: the ranges never overlap

NUM_FRAMES = 8
FRAME_SIZE = 96
MAX_SCALE = 1.6  # largest shape-size multiplier (see make_example)
SPEED = (0.04, 0.06)  # range of a moving shape's speed, in frame widths per frame (96 px: 3.8-5.8 px)


@dataclass(frozen=True)
class Recipe:
    """Difficulty settings of the generator (how salient the visual evidence is)."""

    half_size: tuple[float, float] = HALF_SIZE  #: half-size range of a shape (pixels)
    speed: tuple[float, float] = SPEED  #: moving shape's speed range (frame widths per frame)
    motion_distractors: int = 2  #: most still shapes beside the moving one
    max_count: int = 4  #: counts are 1..max_count
    event_turns: bool = False  #: event scenes also ask the flashing object's colour and shape (extra turns)
    still_turns: bool = False  #: motion scenes with a still shape also ask its colour (extra turn)
    placement_tries: int = 30  #: random positions tried for a still shape before giving up
    describe_turns: bool = False  #: every scene also asks for its templated description (multi-token answer)


#: named recipes: "v1" made the first default model; "v2": bigger shapes, faster motion, fewer
#: distractors, counts 1-3, more questions per scene, and a templated description of every scene
RECIPES = {
    "v1": Recipe(),
    "v2": Recipe(half_size=(12, 16), speed=(0.07, 0.10), motion_distractors=1, max_count=3, event_turns=True,
                 still_turns=True, placement_tries=500, describe_turns=True),
}
#: the recipe of the splits unless one is named (the one the shipped default model was trained on)
DEFAULT_RECIPE = "v2"


def recipe_of(recipe: str | Recipe | None) -> Recipe:
    """The :class:`Recipe` named ``recipe`` (``None``: :data:`DEFAULT_RECIPE`)."""
    if isinstance(recipe, Recipe):
        return recipe
    name = DEFAULT_RECIPE if recipe is None else recipe
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {tuple(RECIPES)}")
    return RECIPES[name]


def answers_of(kind: str, recipe: str | Recipe | None = None) -> tuple[str, ...]:
    """The answers a kind's questions can have under ``recipe`` (uniformly drawn)."""
    if kind == "count":
        return COUNTS[: recipe_of(recipe).max_count]
    return ANSWERS[kind]


@dataclass(frozen=True)
class QA:
    """One question about an example's pixels, with its answer (one word; several words, separated
    by single spaces, for descriptions)."""

    kind: str
    question: str
    answer: str


@dataclass(frozen=True)
class Example:
    """Pixels (uint8 video ``(T, H, W, 3)`` or image ``(H, W, 3)``) and questions about them."""

    pixels: np.ndarray
    qa: tuple[QA, ...]
    seed: int

    @property
    def is_video(self) -> bool:
        """Whether the pixels are a video (4-D) rather than an image."""
        return self.pixels.ndim == 4

    @property
    def kind(self) -> str:
        """Question kind of the example's (first) question."""
        return self.qa[0].kind

    @property
    def question(self) -> str:
        """The example's question."""
        return self.qa[0].question

    @property
    def answer(self) -> str:
        """The example's one-word answer."""
        return self.qa[0].answer


# ------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def motion_scene(rng: np.random.Generator, frames: int = NUM_FRAMES, size: int = FRAME_SIZE,
                 max_distractors: int | None = None, scale: float = 1.0,
                 recipe: str | Recipe | None = None) -> tuple[np.ndarray, list[QA]]:
    """One shape moves in a straight line; 0..``max_distractors`` (default: the recipe's) still
    shapes of other colours."""
    r = recipe_of(recipe)
    max_distractors = r.motion_distractors if max_distractors is None else max_distractors
    colour, shape, direction = _pick(rng, tuple(COLOURS)), _pick(rng, SHAPES), _pick(rng, tuple(DIRECTIONS))
    half = float(rng.uniform(*r.half_size)) * scale
    # the whole path stays inside the frame (binds for large ``scale`` or fast recipes)
    speed = min(float(rng.uniform(*r.speed)) * size, (size - 2 * half - 6) / max(frames - 1, 1))
    travel = speed * (frames - 1)
    dx, dy = DIRECTIONS[direction]
    lo, hi = half + 2, size - half - 2
    # start so that the whole path stays inside the frame
    x0 = rng.uniform(lo - min(dx, 0) * travel, hi - max(dx, 0) * travel)
    y0 = rng.uniform(lo - min(dy, 0) * travel, hi - max(dy, 0) * travel)
    steps = np.arange(frames, dtype=np.float32) * speed
    mover = Sprite(shape, colour, half, x0 + dx * steps, y0 + dy * steps, np.ones(frames, bool))
    sprites = [mover]
    swept = (min(mover.cx) - half, min(mover.cy) - half, max(mover.cx) + half, max(mover.cy) + half)
    avoid = [swept]
    others = [c for c in COLOURS if c != colour]
    for k in range(int(rng.integers(0, max_distractors + 1))):
        still = still_sprite(rng, others[int(rng.integers(len(others)))], frames, size, np.ones(frames, bool), avoid,
                       scale=scale, half_size=r.half_size, tries=r.placement_tries)
        if still is not None:
            sprites.append(still)
            avoid.append(still.box(0))
    pixels = render_frames(rng, sprites, frames, size)
    qa = [
        QA("motion_colour", "what colour is the moving object ?", colour),
        QA("motion_direction", "which direction does the object move ?", direction),
        QA("motion_shape", "what shape is the moving object ?", shape),
    ]
    if r.still_turns and len(sprites) == 2:
        qa.append(QA("still_colour", "what colour is the still object ?", sprites[1].colour))
    if r.describe_turns:
        still = "".join(f" the {s.colour} {s.shape} stays still ." for s in sprites[1:])
        qa.append(_describe(f"a {colour} {shape} moves {direction} in the video .{still}", video=True))
    return pixels, qa


def count_scene(rng: np.random.Generator, frames: int = NUM_FRAMES, size: int = FRAME_SIZE,
                scale: float = 1.0, recipe: str | Recipe | None = None) -> tuple[np.ndarray, list[QA]]:
    """1..``max_count`` shapes of a target colour, each visible in its own frame; fewer of a second
    colour likewise (``max_count - 1`` at most).

    Extra QA (training): the count of the second colour when it appears.
    """
    r = recipe_of(recipe)
    target, second = (list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:2])
    n_target = int(rng.integers(1, r.max_count + 1))
    n_second = int(rng.integers(0, min(r.max_count, frames - n_target)))
    order = rng.permutation(frames)
    sprites, boxes = [], {t: [] for t in range(frames)}
    for k in range(n_target + n_second):
        t = int(order[k])  # every object in its own frame: counting needs the whole clip
        visible = np.zeros(frames, bool)
        visible[t] = True
        sprite = still_sprite(rng, target if k < n_target else second, frames, size, visible, boxes[t], scale=scale,
                        half_size=r.half_size, tries=r.placement_tries)
        assert sprite is not None  # alone in its frame: always placeable
        sprites.append(sprite)
        boxes[t].append(sprite.box(t))
    pixels = render_frames(rng, sprites, frames, size)
    qa = [QA("count", f"how many {target} objects are there in the video ?", str(n_target))]
    if n_second:
        qa.append(QA("count", f"how many {second} objects are there in the video ?", str(n_second)))
    if r.describe_turns:
        others = f" and {n_second} {second} objects" if n_second else ""
        qa.append(_describe(f"there are {n_target} {target} objects{others} in the video .", video=True))
    return pixels, qa


def time_segments(frames: int) -> list[range]:
    """Frame ranges of the beginning, middle and end of a clip (8 frames: 0-2, 3-4, 5-7)."""
    a, b = round(frames / 3), round(2 * frames / 3)
    return [range(0, a), range(a, b), range(b, frames)]


def event_scene(rng: np.random.Generator, frames: int = NUM_FRAMES, size: int = FRAME_SIZE,
                scale: float = 1.0, recipe: str | Recipe | None = None) -> tuple[np.ndarray, list[QA]]:
    """One shape flashes (is visible in a single frame) in the beginning, middle or end of the clip;
    0-1 still shape of another colour is visible throughout."""
    r = recipe_of(recipe)
    when = int(rng.integers(len(TIMES)))
    segment = time_segments(frames)[when]
    visible = np.zeros(frames, bool)
    visible[segment[int(rng.integers(len(segment)))]] = True
    colour = _pick(rng, tuple(COLOURS))
    sprites, avoid = [], []
    with_still = bool(rng.integers(2))
    for _ in range(20):  # a still shape in the middle of the frame can leave no room: place it again
        if with_still:
            still = still_sprite(rng, _pick(rng, [c for c in COLOURS if c != colour]), frames, size, np.ones(frames, bool),
                           [], scale=scale, half_size=r.half_size, tries=r.placement_tries)
            sprites, avoid = [still], [still.box(0)]
        flash = still_sprite(rng, colour, frames, size, visible, avoid, scale=scale, half_size=r.half_size,
                       tries=r.placement_tries)
        if flash is not None:
            break
    else:  # pragma: no cover - practically impossible
        raise RuntimeError("could not place the flashing shape")
    sprites.append(flash)
    pixels = render_frames(rng, sprites, frames, size)
    qa = [QA("event_time", "when does the object flash ?", TIMES[when])]
    if r.event_turns:
        qa.append(QA("event_colour", "what colour is the flashing object ?", colour))
        qa.append(QA("event_shape", "what shape is the flashing object ?", flash.shape))
    if r.describe_turns:
        still = "".join(f" the {s.colour} {s.shape} stays still ." for s in sprites[:-1])
        qa.append(_describe(f"a {colour} {flash.shape} flashes at the {TIMES[when]} of the video .{still}",
                            video=True))
    return pixels, qa


def image_scene(rng: np.random.Generator, size: int = FRAME_SIZE, scale: float = 1.0,
                recipe: str | Recipe | None = None) -> tuple[np.ndarray, list[QA]]:
    """One shape on a textured background, in the left, right, top or bottom part of the image."""
    r = recipe_of(recipe)
    colour, shape, position = _pick(rng, tuple(COLOURS)), _pick(rng, SHAPES), _pick(rng, POSITIONS)
    near, mid = (0.0, size * 0.3), (size * 0.3, size * 0.7)
    far = (size * 0.7, float(size))
    region = {"left": near + mid, "right": far + mid, "top": mid + near, "bottom": mid + far}[position]
    sprite = still_sprite(rng, colour, 1, size, np.ones(1, bool), [], shape=shape, region=region, scale=scale,
                    half_size=r.half_size, tries=r.placement_tries)
    pixels = render_frames(rng, [sprite], 1, size)[0]
    qa = [
        QA("image_colour", "what colour is the object in the image ?", colour),
        QA("image_shape", "what shape is the object in the image ?", shape),
        QA("image_position", "where is the object in the image ?", position),
    ]
    if r.describe_turns:
        qa.append(_describe(f"a {colour} {shape} is at the {position} of the image .", video=False))
    return pixels, qa


def _describe(sentence: str, video: bool) -> QA:
    return QA(DESCRIBE, f"describe the {'video' if video else 'image'} .", sentence)


def description_of(example: Example) -> QA:
    """The example's description question and its templated answer (examples of recipes with
    ``describe_turns``; raises otherwise)."""
    for qa in example.qa:
        if qa.kind == DESCRIBE:
            return qa
    raise ValueError("this example has no description (its recipe has describe_turns=False; v2 has it)")


# ------------------------------------------------------------------------------------------
# Examples and splits
# ------------------------------------------------------------------------------------------


def make_example(seed: int, kind: str, frames: int = NUM_FRAMES, size: int = FRAME_SIZE,
                 scale: float = 1.0, recipe: str | Recipe | None = None) -> Example:
    """The example of ``kind`` generated from ``seed``; its first QA is of ``kind``, the other QA
    are the scene's other questions (in a seeded random order).

    ``scale`` multiplies the shapes' sizes (``MAX_SCALE`` at most; the splits, training and
    evaluation use 1). ``recipe``: a :data:`RECIPES` name (default :data:`DEFAULT_RECIPE`)."""
    if kind not in ANSWERS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if not 0.5 <= scale <= MAX_SCALE:
        raise ValueError(f"scale must be in [0.5, {MAX_SCALE}], got {scale}")
    r = recipe_of(recipe)
    rng = np.random.default_rng(seed)
    if kind.startswith("motion_"):
        pixels, qa = motion_scene(rng, frames, size, scale=scale, recipe=r)
    elif kind == "count":
        pixels, qa = count_scene(rng, frames, size, scale=scale, recipe=r)
    elif kind == "event_time":
        pixels, qa = event_scene(rng, frames, size, scale=scale, recipe=r)
    else:
        pixels, qa = image_scene(rng, size, scale=scale, recipe=r)
    first = next(i for i, q in enumerate(qa) if q.kind == kind)
    rest = [qa[i] for i in rng.permutation(len(qa)) if i != first]
    return Example(pixels=pixels, qa=(qa[first], *rest), seed=seed)


def split_seed(split: str, index: int) -> int:
    """Seed of example ``index`` of ``split`` (``train``, ``val`` or ``test``)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_OFFSETS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index must be in [0, {SPLIT_SIZE}), got {index}")
    return SPLIT_OFFSETS[split] + index


def dataset(split: str, n: int, start: int = 0, kinds: Sequence[str] = KINDS,
            frames: int = NUM_FRAMES, size: int = FRAME_SIZE, recipe: str | Recipe | None = None) -> list[Example]:
    """Examples ``start .. start + n - 1`` of ``split``; example ``i`` has kind ``kinds[i % len(kinds)]``,
    so a split is balanced over the kinds."""
    return list(stream(split, start, kinds, frames, size, stop=start + n, recipe=recipe))


def stream(split: str, start: int = 0, kinds: Sequence[str] = KINDS, frames: int | Sequence[int] = NUM_FRAMES,
           size: int = FRAME_SIZE, stop: int | None = None, recipe: str | Recipe | None = None) -> Iterator[Example]:
    """Examples ``start, start + 1, ...`` of ``split`` (endless unless ``stop`` is given).

    ``frames``: frames per clip, or a sequence of them used in turn (example ``i`` has
    ``frames[i % len(frames)]``; mixing clip lengths in training)."""
    choices = (frames,) if isinstance(frames, int) else tuple(frames)
    index = start
    while stop is None or index < stop:
        yield make_example(split_seed(split, index), kinds[index % len(kinds)],
                           choices[(index // len(kinds)) % len(choices)], size, recipe=recipe)
        index += 1
