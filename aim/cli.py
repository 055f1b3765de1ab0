"""The `aim` console entry point: ``aim demo``, ``aim flops``, ``aim calibrate``, ``aim visualize``, ``aim models``."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from .cli_options import add_aim_options, aim_overrides
from .budget.cli import add_calibrate_parser
from .flops_cli import add_flops_parser, run_flops
from .optional import MissingDependency, require
from .study.data import NUM_FRAMES, VIDEO_KINDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aim", description="AIM token merging and pruning for multimodal LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what aim does")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="baseline vs AIM on the embedded trained model and synthetic test clips")
    demo.add_argument("--frames", type=int, default=NUM_FRAMES, help="video frames (default %(default)s)")
    demo.add_argument("--repeats", type=int, default=3, help="timed prefill repetitions, median reported")
    demo.add_argument("--questions", type=int, default=40, help="test questions for the accuracy (default 40)")
    add_aim_options(demo)
    demo.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    demo.add_argument("--json", action="store_true", help="print the figures as JSON")

    flops = add_flops_parser(commands)
    calibrate = add_calibrate_parser(commands)

    models = commands.add_parser("models", help="the supported transformers classes, their family and its file")

    vis = commands.add_parser("visualize", help="draw which visual tokens AIM keeps on a test clip (PNG)")
    vis.add_argument("--out", default="aim_kept_tokens.png", help="PNG to write (default %(default)s)")
    vis.add_argument("--index", type=int, default=0, help="test clip index (default 0)")
    vis.add_argument("--kind", default="motion_direction", choices=VIDEO_KINDS, help="question kind of the clip (default %(default)s)")
    vis.add_argument("--stages", type=int, default=6, help="at most this many rows: input, merged, pruning layers")
    add_aim_options(vis)
    for command in (demo, flops, vis, models, calibrate):
        command.set_defaults(_command_parser=command)
    return parser


# the Python names in library error messages, as the options the user typed
_OPTION_NAMES = {
    "merge_keep": "--merge-keep", "prune_start": "--prune-start", "prune_step": "--prune-step",
    "frames": "--frames", "repeats": "--repeats", "questions": "--questions", "index": "--index",
    "examples": "--examples",
}


def _as_options(message: str) -> str:
    return re.sub(r"\b(" + "|".join(_OPTION_NAMES) + r")\b", lambda m: _OPTION_NAMES[m.group(1)], message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    command = args._command_parser
    try:
        return _run(args, command)
    except MissingDependency as error:  # one line naming the extra, no traceback
        print(f"{command.prog}: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as error:
        command.error(_as_options(str(error)))  # the subcommand's usage, exit status 2
    return 2


def models_table() -> str:
    """One row per supported class: class, family (config.model_type), video, the family's file."""
    from .families import all_families

    rows = [(name, f.model_type, "yes" if f.supports_video else "no", f.module)
            for f in all_families() for name in f.class_names]
    head = ("class", "family (model_type)", "video", "file")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _run(args: argparse.Namespace, command: argparse.ArgumentParser) -> int:
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(frames=args.frames, repeats=args.repeats, questions=args.questions,
                        attn_implementation=args.attn, as_json=args.json, **aim_overrides(args))
    if args.command == "visualize":
        from .visualize import visualize_study_clip

        if args.stages < 3:
            command.error(f"--stages must be at least 3 (input, merged, one pruning layer), got {args.stages}")
        require("matplotlib.pyplot", "this command")  # before the model runs
        out, answer = visualize_study_clip(args.out, args.index, args.kind, args.stages, **aim_overrides(args))
        print(f"{out}: {answer['question']} -> {answer['predicted']} (truth: {answer['answer']})")
        return 0
    if args.command == "flops":
        return run_flops(args)
    if args.command == "calibrate":
        from .budget.cli import run_calibrate

        return run_calibrate(args)
    if args.command == "models":
        print(models_table())
        return 0
    command.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
