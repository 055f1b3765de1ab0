"""``aim calibrate``: build a budget profile for a model (default: the embedded default model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .profile import PROFILE_FILE, Profile, monotone_fidelity


def add_calibrate_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "calibrate", help="measure fidelity, FLOPs and prefill time of every AIM setting; write a budget profile",
        description="Runs unlabeled inputs through the unchanged model and every candidate AIM setting, "
                    "records the agreement / KL of the next-token distribution with the unchanged model and "
                    "the prefill time, fits this machine's latency model and keeps the Pareto frontier.",
    )
    parser.add_argument("model_path", nargs="?", default=None,
                        help="a saved model folder (default: the embedded default model)")
    parser.add_argument("--data", default=None,
                        help="a torch file (torch.save) holding a list of model-input dicts, one prompt each, as "
                             "your processor makes them (default for the default model: study clips of the "
                             "validation split)")
    parser.add_argument("--examples", type=int, default=24, help="validation clips for the default model (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting and input (median kept)")
    parser.add_argument("--out", default=None, help=f"profile to write (default: MODEL_PATH/{PROFILE_FILE})")
    parser.add_argument("--show", nargs="?", const="", default=None, metavar="PROFILE",
                        help=f"print a profile's frontier and latency model instead of calibrating "
                             f"(default: MODEL_PATH/{PROFILE_FILE}); runs nothing")
    return parser


def _default_inputs(model, processor, count: int) -> list[dict]:
    from ..study import data
    from ..study.model import model_inputs, to_inputs

    if count < 4:
        raise ValueError(f"examples must be at least 4 (the latency model has 4 coefficients), got {count}")
    # validation clips, never the test split: the profile is a choice made before testing
    examples = data.dataset("val", count, kinds=data.VIDEO_KINDS)
    return [model_inputs(to_inputs([e], processor, model.config)) for e in examples]


def run_calibrate(args: argparse.Namespace) -> int:
    import torch
    import transformers as tf

    from ..study.model import DEFAULT_MODEL_DIR, load_default_model
    from .calibration import calibrate

    path = Path(args.model_path) if args.model_path else DEFAULT_MODEL_DIR
    if args.show is not None:
        shown = Path(args.show) if args.show else path / PROFILE_FILE
        if not shown.is_file():
            raise ValueError(f"no AIM profile at {shown}: run `aim calibrate` to make one, or give its path to --show")
        print(format_profile(Profile.load(shown)))
        return 0
    if args.data is None:
        if not (path / "training.json").is_file():
            raise ValueError(f"{path} is not a study model: give your inputs with --data inputs.pt")
        model, processor = load_default_model(path)
        inputs = _default_inputs(model, processor, args.examples)
        what = f"{len(inputs)} validation clips of the study data ({path.name})"
    else:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        from ..families import family_for_model_type

        family = family_for_model_type(config.model_type)
        if family is None:
            raise ValueError(f"AIM does not support model_type {config.model_type!r}; see `aim models`")
        model = family.model_class().from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
        inputs = torch.load(args.data, weights_only=True)
        if not isinstance(inputs, list) or not all(isinstance(x, dict) for x in inputs):
            raise ValueError(f"--data must hold a list of model-input dicts (torch.save), got {type(inputs).__name__}")
        what = f"{len(inputs)} inputs from {args.data}"
    profile = calibrate(model, inputs, repeats=args.repeats, description=what)
    out = Path(args.out) if args.out else path / PROFILE_FILE
    profile.save(out)
    print(format_profile(profile))
    print(f"\nwrote {out}")
    return 0


def format_profile(profile: Profile) -> str:
    lines = [f"Profile of {profile.model['model_type']} ({profile.model['num_layers']} layers) on {profile.device}, "
             f"from {profile.inputs}: {len(profile.points)} settings, {len(profile.frontier)} on the frontier",
             "",
             "KL and agreement as the frontier ranks them (lower KL first): made monotone in the merge keep fraction within each "
             "setting (measured values in brackets where they differ)",
             "",
             f"{'frontier setting':<46} {'FLOPs':>7} {'agreement':>17} {'KL (nats)':>19} {'prefill ms':>11} {'time scale':>11}"]
    fidelity = monotone_fidelity(profile.points)
    for point in profile.frontier:
        agreement, kl = fidelity[point.name].agreement, -fidelity[point.name].negative_kl
        measured_agreement = f"({point.agreement:.1%})" if abs(agreement - point.agreement) > 5e-4 else ""
        measured_kl = f"({point.kl:.4f})" if abs(kl - point.kl) > 5e-5 else ""
        lines.append(f"{point.name:<46} {point.flops_fraction:>7.1%} {agreement:>8.1%} {measured_agreement:>8} "
                     f"{kl:>9.4f} {measured_kl:>9} {point.seconds * 1000:>11.1f} {point.latency_scale:>11.2f}")
    lat = profile.latency
    lines.append(f"\nLatency model: {lat.constant * 1e3:.2f} ms + {lat.per_visual_token * 1e6:.2f} us x visual tokens "
                 f"+ sum over layers ({lat.per_token * 1e6:.3f} us x n + {lat.per_token_squared * 1e9:.4f} ns x n^2), "
                 "times each setting's time scale (its measured / predicted time on the calibration inputs)")
    return "\n".join(lines)
