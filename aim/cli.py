"""The `aim` console entry point: ``aim demo``, ``aim flops``."""

from __future__ import annotations

import argparse
import logging
import sys

from .flops_cli import add_flops_parser, run_flops


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aim", description="AIM token merging and pruning for multimodal LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what aim does")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="baseline vs AIM on the embedded default model and a synthetic video")
    demo.add_argument("--frames", type=int, default=8, help="video frames (default 8)")
    demo.add_argument("--repeats", type=int, default=3, help="timed prefill repetitions, median reported")
    demo.add_argument("--new-tokens", type=int, default=8, help="tokens to generate with each model")
    demo.add_argument("--merge-keep", type=float, default=None, help="fraction of each frame's tokens merging keeps")
    demo.add_argument("--prune-start", type=int, default=None, help="first layer with fewer visual tokens")
    demo.add_argument("--prune-step", type=float, default=None, help="fraction of visual tokens dropped per layer")
    demo.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    demo.add_argument("--json", action="store_true", help="print the figures as JSON")

    add_flops_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command == "demo":
        from .demo import run_demo

        overrides = {
            k: v
            for k, v in {
                "merge_keep": args.merge_keep,
                "prune_start": args.prune_start,
                "prune_step": args.prune_step,
            }.items()
            if v is not None
        }
        try:
            return run_demo(
                frames=args.frames,
                repeats=args.repeats,
                new_tokens=args.new_tokens,
                attn_implementation=args.attn,
                as_json=args.json,
                **overrides,
            )
        except ValueError as error:
            parser.error(str(error))
    if args.command == "flops":
        return run_flops(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
