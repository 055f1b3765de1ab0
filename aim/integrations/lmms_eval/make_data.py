"""Generate the data of the offline lmms-eval tasks: the study's test split, or synthetic QA.

    python -m aim.integrations.lmms_eval.make_data OUTDIR --study [--limit 800] [--split test]
    python -m aim.integrations.lmms_eval.make_data OUTDIR [--videos 16] [--images 16] [--seed 0]
                                                   [--checkpoint DIR]

``--study`` writes the task ``aim_study``: the first ``--limit`` examples of a split of
:mod:`aim.study.data` (the examples ``aim.study.evaluate --n LIMIT`` scores, in the same order;
deterministic by seed), to be run with the trained default model ``aim/default_model``::

    OUTDIR/aim_study.yaml                       (a copy of the task file)
    OUTDIR/data/aim_study.jsonl                 (one question per line: seed, kind, question, answer)
    OUTDIR/data/study_videos/*.mkv, data/study_images/*.png

Videos are stored losslessly (FFV1 in Matroska, decoded back by decord to the very pixels the
study generates, which ``make_data`` checks clip by clip where decord is installed); images as PNG.
lmms-eval's ``--limit K`` then runs the first K examples, the ones ``aim.study.evaluate --n K``
scores.

Without ``--study``: the synthetic sets, deterministically from the seed::

    OUTDIR/aim_synth_video.yaml, aim_synth_image.yaml, aim_synth.yaml   (copies of the task files)
    OUTDIR/data/aim_synth_video.jsonl, data/aim_synth_image.jsonl     (one question per line)
    OUTDIR/data/videos/*.mp4, data/images/*.png

then ``lmms-eval --include_path OUTDIR --tasks aim_synth ...`` reads them with no hub access
(``dataset_path: json``; lmms-eval anchors the relative ``data_files`` at the yaml's folder).

Videos: a coloured square moves in a straight line (left, right, up or down) across the frames
while other shapes of other colours stand still. Questions: "What colour is the moving square?"
(a single frame cannot tell which square moves) and "Which direction does the square move?"
(needs the frame order). Images: one shape of one colour; questions on its colour and its shape.
All are 4-way multiple choice answered with a letter.

``--checkpoint DIR`` also saves a tiny random-weight LLaVA-OneVision model (``--checkpoint-family
qwen2_vl`` / ``qwen3_vl``: Qwen2-VL / Qwen3-VL) with an offline-built processor (see
:mod:`.checkpoint`), to run the synthetic tasks on any machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from ...optional import MissingDependency, install_hint
from ...study.render import shape_masks

TASKS_DIR = Path(__file__).with_name("tasks")
TASK_FILES = ("aim_synth_video.yaml", "aim_synth_image.yaml", "aim_synth.yaml")
STUDY_TASK_FILES = ("aim_study.yaml",)
STUDY_DATA = "data/aim_study.jsonl"  # the task file's data_files entry, relative to OUTDIR
LETTERS = "ABCD"
COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 230), "yellow": (240, 220, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 20), "cyan": (40, 210, 220), "white": (245, 245, 245),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (20, 20, 20)


# ------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------


def _draw(canvas: np.ndarray, shape: str, cx: float, cy: float, half: int, colour: tuple[int, int, int]) -> None:
    """Draw a filled shape centred at (cx, cy) with half-size `half` into a square HxHx3 uint8 canvas
    (the study data's shapes: `aim.study.render.shape_masks`)."""
    canvas[shape_masks(shape, [cx], [cy], half, canvas.shape[0])[0]] = colour


def _options(rng: np.random.RandomState, answer: str, pool: list[str]) -> tuple[list[str], str]:
    """Four options holding `answer` at a random position; returns (options, letter)."""
    others = [p for p in pool if p != answer]
    picks = [others[i] for i in rng.permutation(len(others))[:3]] + [answer]
    order = rng.permutation(4)
    options = [picks[i] for i in order]
    return options, LETTERS[options.index(answer)]


def make_video(rng: np.random.RandomState, frames: int, size: int) -> tuple[np.ndarray, dict]:
    """One clip: a square of one colour moving in one direction, 1-2 still distractor shapes."""
    colour_names = list(COLOURS)
    picked = [colour_names[i] for i in rng.permutation(len(colour_names))[:3]]
    moving_colour, distractor_colours = picked[0], picked[1: 1 + rng.randint(1, 3)]
    direction = list(DIRECTIONS)[rng.randint(len(DIRECTIONS))]
    dx, dy = DIRECTIONS[direction]
    half = size // 10
    travel = size - 4 * half  # the square crosses most of the frame
    start = size / 2 - dx * travel / 2, size / 2 - dy * travel / 2
    # Perpendicular offset so the mover's lane is not the frame's centre line every time.
    lane = (rng.rand() - 0.5) * size / 3
    start = (start[0] + (lane if dx == 0 else 0), start[1] + (lane if dy == 0 else 0))
    still = [
        (SHAPES[rng.randint(len(SHAPES))], rng.uniform(half * 2, size - half * 2), rng.uniform(half * 2, size - half * 2), c)
        for c in distractor_colours
    ]
    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        frame = np.empty((size, size, 3), dtype=np.uint8)
        frame[:] = BACKGROUND
        for shape, x, y, c in still:
            _draw(frame, shape, x, y, half, COLOURS[c])
        progress = t / max(frames - 1, 1)
        _draw(frame, "square", start[0] + dx * travel * progress, start[1] + dy * travel * progress, half,
              COLOURS[moving_colour])
        clip[t] = frame
    return clip, {"colour": moving_colour, "direction": direction, "distractors": distractor_colours}


def make_image(rng: np.random.RandomState, size: int) -> tuple[np.ndarray, dict]:
    colour = list(COLOURS)[rng.randint(len(COLOURS))]
    shape = SHAPES[rng.randint(len(SHAPES))]
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    half = size // 4
    cx, cy = rng.uniform(half + 2, size - half - 2, size=2)
    _draw(image, shape, cx, cy, half, COLOURS[colour])
    return image, {"colour": colour, "shape": shape}


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def _encode(path: Path, clip: np.ndarray, fps: int, codec: str, pix_fmt: str, fourcc: str,
            container_format: str | None = None, options: dict | None = None) -> None:
    """Encode an (T, H, W, 3) uint8 RGB clip with PyAV (``codec`` / ``pix_fmt``), else OpenCV (``fourcc``)."""
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(str(path), mode="w", format=container_format) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = clip.shape[2], clip.shape[1]
            stream.pix_fmt = pix_fmt
            if options:
                stream.options = options
            for frame in clip:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return
    try:
        import cv2
    except ImportError:
        raise MissingDependency(f"writing the videos needs PyAV or OpenCV, which lmms-eval installs: {install_hint('eval')}") from None
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (clip.shape[2], clip.shape[1]))
    if not writer.isOpened():
        raise MissingDependency(f"this OpenCV cannot write {fourcc} videos; install PyAV: {install_hint('eval')}")
    for frame in clip:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()


def write_mp4(path: Path, clip: np.ndarray, fps: int = 4) -> None:
    """Encode an (T, H, W, 3) uint8 clip as MPEG-4 Part 2 in an .mp4 (PyAV, else OpenCV)."""
    # qscale 2: near-lossless, colours survive
    _encode(path, clip, fps, codec="mpeg4", pix_fmt="yuv420p", fourcc="mp4v", options={"qscale": "2"})


def _prompt(question: str, options: list[str]) -> str:
    return question + "\n" + "\n".join(f"({letter}) {text}" for letter, text in zip(LETTERS, options))


def generate(
    outdir: str | Path, videos: int = 16, images: int = 16, frames: int = 8, size: int = 96, seed: int = 0,
    copy_tasks: bool = True,
) -> dict[str, Path]:
    """Write the two QA sets (and, by default, the task yaml files) under `outdir`.

    Each video yields one question (colour or direction, alternating); each image one question
    (colour or shape, alternating). Returns the paths of the two JSONL files.
    """
    if videos < 0 or images < 0 or frames < 2 or size < 32:
        raise ValueError("need videos, images >= 0, frames >= 2 and size >= 32")
    outdir = Path(outdir).resolve()
    data = outdir / "data"
    (data / "videos").mkdir(parents=True, exist_ok=True)
    (data / "images").mkdir(parents=True, exist_ok=True)

    rng = np.random.RandomState(seed)
    video_rows = []
    for i in range(videos):
        clip, facts = make_video(rng, frames, size)
        path = data / "videos" / f"synth_{i:04d}.mp4"
        write_mp4(path, clip)
        if i % 2 == 0:
            question, answer, category = "What colour is the moving square?", facts["colour"], "colour"
            # The still shapes' colours are the wrong options first: one frame cannot tell them apart.
            others = [c for c in facts["distractors"] + list(COLOURS) if c != answer]
            options = list(dict.fromkeys(others))[:3] + [answer]
            options = [options[j] for j in rng.permutation(4)]
            letter = LETTERS[options.index(answer)]
        else:
            question, answer, category = "Which direction does the square move?", facts["direction"], "direction"
            options = list(DIRECTIONS)
            letter = LETTERS[options.index(answer)]
        video_rows.append({
            "id": f"video_{i:04d}", "video": str(path), "category": category, "question": question,
            "options": options, "answer": letter, "answer_text": answer, "prompt": _prompt(question, options),
            "frames": frames,
        })

    from PIL import Image

    image_rows = []
    for i in range(images):
        image, facts = make_image(rng, size)
        path = data / "images" / f"synth_{i:04d}.png"
        Image.fromarray(image).save(path)
        if i % 2 == 0:
            question, answer, category = "What colour is the shape?", facts["colour"], "colour"
            options, letter = _options(rng, answer, list(COLOURS))
        else:
            question, answer, category = "What shape is in the image?", facts["shape"], "shape"
            options, letter = _options(rng, answer, list(SHAPES) + ["star"])
        image_rows.append({
            "id": f"image_{i:04d}", "image": str(path), "category": category, "question": question,
            "options": options, "answer": letter, "answer_text": answer, "prompt": _prompt(question, options),
        })

    files = {"video": data / "aim_synth_video.jsonl", "image": data / "aim_synth_image.jsonl"}
    for key, rows in (("video", video_rows), ("image", image_rows)):
        with open(files[key], "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    if copy_tasks:
        for name in TASK_FILES:
            shutil.copyfile(TASKS_DIR / name, outdir / name)
    return files


# ------------------------------------------------------------------------------------------
# The study's test split (task aim_study)
# ------------------------------------------------------------------------------------------


def write_lossless_video(path: Path, clip: np.ndarray, fps: int = 4) -> None:
    """Encode an (T, H, W, 3) uint8 clip losslessly: FFV1 (RGB) in Matroska (PyAV, else OpenCV).

    decord, which lmms-eval's ``llava_hf`` and the aim models decode videos with, reads such a file
    back to exactly these pixels (an MPEG-4 file would change them a little)."""
    # bgr0: FFV1's RGB layout, no chroma subsampling, no rounding
    _encode(path, clip, fps, codec="ffv1", pix_fmt="bgr0", fourcc="FFV1", container_format="matroska")


def _decoder():
    """decord's VideoReader where installed (the decoder of the video paths), else None."""
    try:
        from decord import VideoReader, cpu
    except ImportError:
        return None

    def decode(path: Path) -> np.ndarray:
        reader = VideoReader(str(path), ctx=cpu(0))
        return reader.get_batch(list(range(len(reader)))).asnumpy()

    return decode


def generate_study(
    outdir: str | Path, limit: int = 800, split: str = "test", start: int = 0, copy_tasks: bool = True,
    verify: bool = True,
) -> Path:
    """Write examples ``start .. start + limit - 1`` of ``split`` of :mod:`aim.study.data` (the
    examples of ``aim.study.data.dataset(split, limit, start)``, in that order) as the data of the
    task ``aim_study``, and (by default) its task file. Returns the JSONL file.

    Each line: ``id``, ``index``, ``seed``, ``split``, ``kind``, ``modality`` (video / image),
    ``question``, ``answer`` (one word) and ``visual`` (the absolute path of the clip or image).
    ``verify``: decode every clip back with decord (where installed) and require the exact pixels.
    """
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependency(f"writing the images needs Pillow, which lmms-eval installs: {install_hint('eval')}") from None

    from ...study import data as study

    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    outdir = Path(outdir).resolve()
    folders = {"video": outdir / "data" / "study_videos", "image": outdir / "data" / "study_images"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    decode = _decoder() if verify else None
    rows = []
    for offset, example in enumerate(study.stream(split, start, stop=start + limit)):
        index = start + offset
        name = f"{split}_{index:06d}"
        if example.is_video:
            path = folders["video"] / f"{name}.mkv"
            write_lossless_video(path, example.pixels)
            if decode is not None and not np.array_equal(decode(path), example.pixels):
                raise RuntimeError(f"{path} does not decode to the study's pixels: its video codec is not lossless here")
        else:
            path = folders["image"] / f"{name}.png"
            Image.fromarray(example.pixels).save(path)
        rows.append({
            "id": name, "index": index, "seed": example.seed, "split": split, "kind": example.kind,
            "modality": "video" if example.is_video else "image", "question": example.question,
            "answer": example.answer, "visual": str(path),
        })
    target = outdir / STUDY_DATA
    with open(target, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if copy_tasks:
        for name in STUDY_TASK_FILES:
            shutil.copyfile(TASKS_DIR / name, outdir / name)
    return target


TASK_NAMES = ("aim_synth", "aim_synth_video", "aim_synth_image", "aim_study")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aim.integrations.lmms_eval.make_data",
        description="Write the data and task files of the offline lmms-eval tasks: the study's test split "
        "(--study, task aim_study) or the synthetic QA sets (task aim_synth).",
    )
    parser.add_argument("outdir", help="folder to write (give it to lmms-eval as --include_path)")
    study = parser.add_argument_group("the study's examples (task aim_study, for the trained aim/default_model)")
    study.add_argument("--study", action="store_true", help="write the study's examples instead of the synthetic sets")
    study.add_argument("--limit", type=int, default=800, help="examples (default 800: aim.study.evaluate's default --n)")
    study.add_argument("--split", default="test", choices=("train", "val", "test"), help="split (default test)")
    study.add_argument("--start", type=int, default=0, help="index of the first example (default 0)")
    synth = parser.add_argument_group("the synthetic sets (task aim_synth)")
    synth.add_argument("--videos", type=int, default=None, help="video questions (default 16)")
    synth.add_argument("--images", type=int, default=None, help="image questions (default 16)")
    synth.add_argument("--frames", type=int, default=None, help="frames per video (default 8)")
    synth.add_argument("--size", type=int, default=None, help="frame / image side in pixels (default 96)")
    synth.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    synth.add_argument("--checkpoint", metavar="DIR", help="also save a tiny random-weight model with an "
                       "offline processor into DIR (a local `pretrained=` path)")
    synth.add_argument("--checkpoint-family", default=None, choices=("llava_onevision", "qwen2_vl", "qwen3_vl"),
                       help="model class of --checkpoint: llava_onevision (for aim_llava_hf, default), "
                       "qwen2_vl (for aim_qwen2_vl) or qwen3_vl (for aim_qwen3_vl)")
    args = parser.parse_args(argv)
    if Path(args.outdir).resolve().name in TASK_NAMES:
        # lmms-eval takes a task name that is also a folder in the working directory for that
        # folder, and then builds plain-prompt requests that its chat model classes cannot read
        parser.error(f"name the folder something other than a task name ({', '.join(TASK_NAMES)}), "
                     f"e.g. out/synth_eval: lmms-eval would mistake {args.outdir!r} for the task")
    synth_options = ("videos", "images", "frames", "size", "seed", "checkpoint", "checkpoint_family")
    if args.study:
        given = [f"--{name.replace('_', '-')}" for name in synth_options if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)}: options of the synthetic sets, not of --study (the study's clips "
                         "are 8 frames of 96x96, for the shipped default model)")
        try:
            path = generate_study(args.outdir, args.limit, args.split, args.start)
        except (MissingDependency, RuntimeError) as error:
            parser.exit(1, f"{parser.prog}: {error}\n")
        except ValueError as error:
            parser.error(str(error))
        from ...study.model import DEFAULT_MODEL_DIR

        print(f"wrote {args.limit} examples of the {args.split} split to {path}; task file aim_study.yaml in "
              f"{path.parent.parent}; run it with pretrained={DEFAULT_MODEL_DIR}")
        return 0
    defaults = dict(videos=16, images=16, frames=8, size=96, seed=0, checkpoint_family="llava_onevision")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        files = generate(args.outdir, args.videos, args.images, args.frames, args.size, args.seed)
    except MissingDependency as error:
        parser.exit(1, f"{parser.prog}: {error}\n")
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {files['video']} and {files['image']}; task files in {Path(args.outdir).resolve()}")
    if args.checkpoint:
        from .checkpoint import build_checkpoint

        print(f"wrote tiny checkpoint {build_checkpoint(args.checkpoint, family=args.checkpoint_family)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
