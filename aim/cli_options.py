"""The AIM options every ``aim`` subcommand takes, defined once (demo, visualize, flops)."""

from __future__ import annotations

import argparse

from .config import AIMConfig


def add_aim_options(parser: argparse.ArgumentParser) -> None:
    """``--merge-keep``, ``--prune-start``, ``--prune-step``, ``--temporal-keep``, ``--frame-keep``, ``--prune-action``,
    ``--proportional-attention``, ``--no-merge``, ``--no-prune``."""
    parser.add_argument("--merge-keep", type=float, default=None,
                        help="fraction of each frame's tokens merging keeps (default 0.25)")
    parser.add_argument("--prune-start", type=int, default=None,
                        help="first layer with fewer visual tokens (default: half depth); alone, the visual "
                             "tokens then fall in equal steps to none at three quarters of depth")
    parser.add_argument("--prune-step", type=float, default=None,
                        help="fraction of the LLM's visual tokens dropped per layer from --prune-start on "
                             "(default: none left at three quarters of depth)")
    parser.add_argument("--temporal-keep", type=float, default=None,
                        help="temporal merging of videos: fraction of each later frame's tokens kept, the "
                             "rest merged into the frame before (default: off)")
    parser.add_argument("--frame-keep", type=float, default=None,
                        help="fraction of each video's frames the vision tower encodes, evenly spaced "
                             "(LLaVA-OneVision / LLaVA-NeXT-Video; default 1: all)")
    parser.add_argument("--prune-action", choices=("drop", "merge"), default=None,
                        help="what happens to pruned visual tokens: drop (default) or merge into the most "
                             "similar kept one")
    parser.add_argument("--proportional-attention", action="store_true",
                        help="attention to a merged token gets log(its size) added, as ToMe does (default: off)")
    parser.add_argument("--no-merge", action="store_true", help="no merging before the LLM (pruning only)")
    parser.add_argument("--no-prune", action="store_true", help="no pruning inside the LLM (merging only)")


def aim_overrides(args: argparse.Namespace) -> dict:
    """The `AIMConfig` fields the options set (the others keep their defaults); contradictions are errors."""
    overrides: dict = {}
    if args.no_merge:
        if args.merge_keep is not None:
            raise ValueError("--no-merge and --merge-keep contradict each other")
        overrides["merge_schedule"] = ()
    elif args.merge_keep is not None:
        overrides["merge_keep"] = args.merge_keep
    if args.no_prune:
        if args.prune_start is not None or args.prune_step is not None:
            raise ValueError("--no-prune and --prune-start / --prune-step contradict each other")
        overrides["prune"] = False
    else:
        overrides.update({k: v for k, v in (("prune_start", args.prune_start), ("prune_step", args.prune_step))
                          if v is not None})
    if args.temporal_keep is not None:
        overrides["temporal_keep"] = args.temporal_keep
    if args.frame_keep is not None:
        overrides["frame_keep"] = args.frame_keep
    if args.prune_action is not None:
        overrides["prune_action"] = args.prune_action
    if args.proportional_attention:
        overrides["proportional_attention"] = True
    return overrides


def aim_config(args: argparse.Namespace) -> AIMConfig:
    return AIMConfig(**aim_overrides(args))
