"""``aim flops``: analytic prefill FLOPs and KV-cache memory, baseline vs AIM.

    aim flops --model llava-onevision-qwen2-7b --frames 32 --tokens-per-frame 196 --text-tokens 100
    aim flops --model path/to/config.json --images 1 --tokens-per-image 576 --json
    aim flops --model qwen2-vl-7b --frames 32 --tokens-per-frame 256 --sweep
    aim flops --plot flops.png

Also runnable on its own: ``python -m aim.flops_cli ...``.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import flops as F
from .cli_options import add_aim_options, aim_config
from .counts import kept_frames
from .config import AIMConfig
from .optional import MissingDependency, require

MiB = 2**20


def add_flops_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``flops`` sub-command to an argparse sub-parsers object; returns its parser."""
    names = ", ".join(F.builtin_models())
    p = subparsers.add_parser(
        "flops",
        help="analytic prefill FLOPs / KV-cache memory, baseline vs AIM",
        description=(
            f"{F.CONVENTION[0].upper()}{F.CONVENTION[1:]}; KV-cache bytes and decode FLOPs per token, "
            "baseline vs AIM. The vision tower is estimated separately."
        ),
    )
    p.add_argument("--model", default="llava-onevision-qwen2-7b",
                   help=f"built-in name ({names}) or a config.json path / model folder (default: %(default)s)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--frames", type=int, default=None, help="video frames (default 32 for video models)")
    what.add_argument("--images", type=int, default=None, help="images (or any-resolution crops)")
    p.add_argument("--tokens-per-frame", type=int, default=None,
                   help="visual tokens per frame after the model's pooling (default: the model's own, 196 for "
                        "LLaVA-OneVision; Qwen-VL: per temporal slice of 2 frames)")
    p.add_argument("--tokens-per-image", type=int, default=None, help="visual tokens per image / crop")
    p.add_argument("--text-tokens", type=int, default=100, help="text tokens, never pruned (default %(default)s)")
    add_aim_options(p)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(F.DTYPE_BYTES), help="KV-cache dtype (default %(default)s)")
    p.add_argument("--attention", default="full", choices=["full", "causal"],
                   help="count QK^T/AV over every query-key pair (full: the paper's convention, default) or only "
                        "the causal lower triangle that flash / is_causal kernels compute")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--plot", metavar="PNG", default=None, help="write tokens per layer and cumulative FLOPs to a PNG")
    p.add_argument("--sweep", action="store_true", help="sweep merge keep ratios x pruning spans: FLOPs / KV frontier")
    p.set_defaults(_flops_parser=p)
    return p


def _inputs(args, spec: F.ModelSpec) -> F.InputSpec:
    if args.images is None and args.tokens_per_image is not None and args.frames is None:
        args.images = 1
    if args.images is not None:
        if args.tokens_per_frame is not None:
            raise ValueError("--tokens-per-frame goes with --frames; use --tokens-per-image with --images")
        return F.image_input(spec, args.images, args.tokens_per_image, args.text_tokens)
    if args.tokens_per_image is not None:
        raise ValueError("--tokens-per-image goes with --images; use --tokens-per-frame with --frames")
    if args.frames is None:
        if not spec.supports_video:
            return F.image_input(spec, 1, None, args.text_tokens)
        args.frames = 32
    return F.video_input(spec, args.frames, args.tokens_per_frame, args.text_tokens)


def _t(flops: int | float) -> str:
    return f"{flops / F.TERA:.3f}"


def _aim_summary(config: AIMConfig, report: F.CostReport, num_layers: int) -> str:
    merge = f"merge keep {config.merge_schedule[-1]:g} (steps {', '.join(f'{k:g}' for k in config.merge_schedule)})" \
        if config.merge_schedule else "no merging"
    if config.temporal_merging:
        merge = f"temporal merging keeps {config.temporal_keep:g} of each later frame, then {merge}"
    if config.drops_frames and report.input.videos:
        frames = sum(report.input.videos)
        encoded = sum(len(kept_frames(count, config.frame_keep)) for count in report.input.videos)
        merge = f"{encoded} of {frames} frames encoded (evenly spaced), then {merge}"
    if not config.prune:
        prune = "no pruning"
    else:
        ratios = config.keep_ratios(num_layers)
        start = next((i for i, r in enumerate(ratios) if r < 1.0), None)
        gone = next((i for i, r in enumerate(ratios) if r <= 0.0), None)
        prune = "no pruning" if start is None else (
            f"pruning from layer {start}" + (f", no visual token from layer {gone}" if gone is not None else ""))
        if start is not None and config.prune_action == "merge":
            prune += " (pruned tokens merged into kept ones)"
    return f"AIM: {merge}; {prune}; {report.visual_tokens_in_llm} visual tokens enter the LLM"


def format_report(comparison: F.Comparison, spec: F.ModelSpec, config: AIMConfig) -> str:
    base, aim = comparison.baseline, comparison.aim
    lines = [
        f"Model  {spec.describe()}",
        f"Input  {base.input.description} = {base.input.total_tokens} tokens",
        _aim_summary(config, aim, spec.llm.num_layers),
        "",
        f"{'':>5} | {'tokens':^15} | {'prefill TFLOPs':^17} | {'KV cache MiB':^17}",
        f"{'layer':>5} | {'base':>7} {'AIM':>7} | {'base':>8} {'AIM':>8} | {'base':>8} {'AIM':>8}",
        "-" * 65,
    ]
    for b, a in zip(base.layers, aim.layers):
        lines.append(
            f"{b.layer:>5} | {b.tokens:>7} {a.tokens:>7} | {_t(b.prefill_flops):>8} {_t(a.prefill_flops):>8} | "
            f"{b.kv_cache_bytes / MiB:>8.2f} {a.kv_cache_bytes / MiB:>8.2f}"
        )
    lines += [
        "-" * 65,
        f"{'total':>5} | {sum(base.tokens_per_layer):>7} {sum(aim.tokens_per_layer):>7} | "
        f"{_t(base.prefill_flops):>8} {_t(aim.prefill_flops):>8} | "
        f"{base.kv_cache_bytes / MiB:>8.2f} {aim.kv_cache_bytes / MiB:>8.2f}",
        "",
        f"Prefill TFLOPs (LLM decoder layers, {base.attention} attention): baseline {base.prefill_tflops:.2f}  AIM {aim.prefill_tflops:.2f}  "
        f"ratio {comparison.prefill_ratio:.2f}x",
        f"KV cache ({base.dtype}): baseline {base.kv_cache_bytes / MiB:.1f} MiB  AIM {aim.kv_cache_bytes / MiB:.1f} MiB  "
        f"ratio {comparison.kv_ratio:.2f}x",
        f"Decode GFLOPs per generated token: baseline {base.decode_flops_per_token / 1e9:.2f}  "
        f"AIM {aim.decode_flops_per_token / 1e9:.2f}  ratio {comparison.decode_ratio:.2f}x",
    ]
    if base.vision_flops is not None and aim.vision_flops != base.vision_flops:
        lines.append(
            f"Vision tower + projector (estimate, not in the totals; frame_keep encodes fewer frames): "
            f"baseline {base.vision_flops / F.TERA:.2f}  AIM {aim.vision_flops / F.TERA:.2f} TFLOPs"
        )
    elif base.vision_flops is not None:
        lines.append(
            f"Vision tower + projector (estimate, not in the totals; AIM leaves it unchanged): "
            f"{base.vision_flops / F.TERA:.2f} TFLOPs"
        )
    lines += [f"note: {n}" for n in aim.notes]
    return "\n".join(lines)


def format_sweep(points: list[F.SweepPoint], baseline: F.CostReport) -> str:
    lines = [
        "Sweep: merge keep x pruning span (layers: pruning starts - no visual token left; 'off': no pruning)",
        "* = frontier: no setting with fewer prefill FLOPs keeps as many KV-cache entries (token-layers); at "
        "equal KV size, tokens spread over many layers (more merging, later pruning) cost fewer FLOPs than "
        "tokens concentrated in the first layers (less merging, early pruning)",
        f"{'merge':>6} {'prune':>7} {'visual':>7} | {'TFLOPs':>8} {'x':>6} | {'KV MiB':>8} {'x':>6} | {'decode GF':>9} |",
        "-" * 74,
    ]
    for p in points:
        lines.append(
            f"{p.merge_keep:>6g} {p.prune:>7} {p.visual_tokens_in_llm:>7} | {_t(p.prefill_flops):>8} "
            f"{baseline.prefill_flops / p.prefill_flops:>5.2f}x | "
            f"{p.kv_cache_bytes / MiB:>8.1f} {baseline.kv_cache_bytes / max(p.kv_cache_bytes, 1):>5.2f}x | "
            f"{p.decode_flops_per_token / 1e9:>9.2f} | {'*' if p.frontier else ''}"
        )
    return "\n".join(lines)


def write_plot(comparison: F.Comparison, path: str, title: str = "") -> None:
    """Tokens per layer and cumulative prefill FLOPs, baseline vs AIM, as a PNG (matplotlib, Agg)."""
    plt = require("matplotlib.pyplot", "--plot")
    base, aim = comparison.baseline, comparison.aim
    layers = [layer.layer for layer in base.layers]

    def cumulative(report):
        total, out = 0, []
        for layer in report.layers:
            total += layer.prefill_flops
            out.append(total / F.TERA)
        return out

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.step(layers, base.tokens_per_layer, where="mid", label="baseline")
    left.step(layers, aim.tokens_per_layer, where="mid", label="AIM")
    left.set_xlabel("decoder layer")
    left.set_ylabel("tokens")
    left.set_ylim(bottom=0)
    left.set_title("tokens per layer")
    left.legend()
    right.plot(layers, cumulative(base), marker=".", label=f"baseline ({base.prefill_tflops:.2f} T)")
    right.plot(layers, cumulative(aim), marker=".", label=f"AIM ({aim.prefill_tflops:.2f} T)")
    right.set_xlabel("decoder layer")
    right.set_ylabel("cumulative prefill TFLOPs")
    right.set_title(f"prefill FLOPs ({comparison.prefill_ratio:.2f}x fewer)")
    right.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as error:
        raise ValueError(f"cannot write the plot to {path}: {error}") from error
    finally:
        plt.close(fig)


def run_flops(args) -> int:
    """Run ``aim flops`` from parsed arguments; returns the exit status (bad input: argparse error)."""
    try:
        return _run(args)
    except MissingDependency as error:
        print(f"aim flops: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        parser = getattr(args, "_flops_parser", None)
        if parser is not None:
            parser.error(str(error))  # exits with status 2
        print(f"aim flops: error: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    spec = F.load_model(args.model)
    inputs = _inputs(args, spec)
    config = aim_config(args)
    comparison = F.compare(spec, inputs, config, args.dtype, args.attention)
    points = F.sweep(spec, inputs, dtype=args.dtype, attention=args.attention) if args.sweep else None
    if args.plot:
        write_plot(comparison, args.plot, title=f"{spec.name}: {inputs.description}")
    if args.json:
        out = {"model": spec.name, **comparison.as_dict()}
        if points is not None:
            out["sweep"] = [p.as_dict() for p in points]
        print(json.dumps(out, indent=2))
        return 0
    print(format_report(comparison, spec, config))
    if points is not None:
        print()
        print(format_sweep(points, comparison.baseline))
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aim")
    add_flops_parser(parser.add_subparsers(dest="command", required=True))
    return run_flops(parser.parse_args(["flops", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
