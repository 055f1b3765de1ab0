"""The `aim` console entry point: ``aim demo``, ``aim flops``, ``aim visualize``."""

from __future__ import annotations

import argparse
import logging
import sys

from .flops_cli import add_flops_parser, run_flops
from .study.data import NUM_FRAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aim", description="AIM token merging and pruning for multimodal LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what aim does")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="baseline vs AIM on the embedded trained model and synthetic test clips")
    demo.add_argument("--frames", type=int, default=NUM_FRAMES, help="video frames (default %(default)s)")
    demo.add_argument("--repeats", type=int, default=3, help="timed prefill repetitions, median reported")
    demo.add_argument("--questions", type=int, default=40, help="test questions for the accuracy (default 40)")
    _add_aim_options(demo)
    demo.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    demo.add_argument("--json", action="store_true", help="print the figures as JSON")

    add_flops_parser(commands)

    vis = commands.add_parser("visualize", help="draw which visual tokens AIM keeps on a test clip (PNG)")
    vis.add_argument("--out", default="aim_kept_tokens.png", help="PNG to write (default %(default)s)")
    vis.add_argument("--index", type=int, default=0, help="test clip index (default 0)")
    vis.add_argument("--kind", default="motion_direction", help="question kind of the clip (default %(default)s)")
    vis.add_argument("--stages", type=int, default=6, help="at most this many rows: input, merged, pruning layers")
    _add_aim_options(vis)
    return parser


def _add_aim_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--merge-keep", type=float, default=None, help="fraction of each frame's tokens merging keeps")
    parser.add_argument("--prune-start", type=int, default=None, help="first layer with fewer visual tokens")
    parser.add_argument("--prune-step", type=float, default=None, help="fraction of visual tokens dropped per layer")
    parser.add_argument("--no-prune", action="store_true", help="merge only: no pruning inside the LLM")


def _aim_overrides(args: argparse.Namespace) -> dict:
    """The AIM options given on the command line (the others keep AIMConfig's defaults)."""
    given = {"merge_keep": args.merge_keep, "prune_start": args.prune_start, "prune_step": args.prune_step}
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.no_prune:
        overrides["prune"] = False
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command == "demo":
        from .demo import run_demo

        overrides = _aim_overrides(args)
        try:
            return run_demo(
                frames=args.frames,
                repeats=args.repeats,
                questions=args.questions,
                attn_implementation=args.attn,
                as_json=args.json,
                **overrides,
            )
        except ValueError as error:
            parser.error(str(error))
    if args.command == "visualize":
        from .visualize import visualize_study_clip

        try:
            out, answer = visualize_study_clip(args.out, args.index, args.kind, args.stages, **_aim_overrides(args))
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
        print(f"{out}: {answer['question']} -> {answer['predicted']} (truth: {answer['answer']})")
        return 0
    if args.command == "flops":
        return run_flops(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
