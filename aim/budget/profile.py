"""A calibration profile: measured fidelity of each configuration, the Pareto frontier of fidelity
against cost, and a latency model of this machine, saved as JSON.

Latency model: prefill time (seconds) ~= ``c + v * V + sum_l (a * n_l + b * n_l^2)``, where
``n_l`` are the tokens decoder layer ``l`` processes and ``V`` the visual tokens the vision tower
and projector produce (AIM does not change that part). Linear in its four coefficients, fitted by
non-negative least squares on the calibration runs. What the token counts do not show (the
matching of temporal merging, the merge-instead-of-drop steps) is a per-setting scale: each point's
measured mean time over the calibration inputs divided by the model's prediction for them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from ..config import AIMConfig

PROFILE_VERSION = 4
# version 1 had no per-point latency scale (read as 1.0); versions before 3 stored a frontier by raw
# fidelity, versions before 4 one ranked by agreement first (see `Fidelity`): recomputed on reading
READABLE_VERSIONS = (1, 2, 3, 4)
PROFILE_FILE = "aim_profile.json"  # the name aim looks for in a model folder


class Fidelity(NamedTuple):
    """A setting's label-free fidelity as a budget ranks settings: the tuple order is the ranking,
    higher is better. Lower KL first, greedy agreement second. Chosen on validation questions held
    out from calibration, not on test (benchmarks/fidelity_ranking.py): KL tracks held-out accuracy
    more closely than agreement (Spearman 0.93 vs 0.88 on the default model) and does not tie
    where a few dozen calibration inputs resolve agreement only to one input."""

    negative_kl: float  # -KL(unchanged || this) of the next-token distribution, nats
    agreement: float  # greedy next token equal to the unchanged model's, fraction of inputs


# how a model was loaded, not which model it is: the dtype (float32 for calibration on a CPU,
# bfloat16 on a GPU), the path, the library version
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_attn_implementation_autoset", "dtype", "torch_dtype")


def _without_volatile(data: Any) -> Any:
    """`data` (a config dict) without `VOLATILE_CONFIG_KEYS` at any depth (the sub-configs of a
    multimodal model, e.g. ``text_config``, carry their own ``dtype``)."""
    if isinstance(data, dict):
        return {k: _without_volatile(v) for k, v in data.items() if k not in VOLATILE_CONFIG_KEYS}
    return data


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(data: dict) -> dict:
    text = data.get("text_config") or data
    return {
        "model_type": data.get("model_type"),
        "num_layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "config_sha256_16": _digest(data),
    }


def _config_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def model_fingerprint(config: Any, legacy: bool = False) -> dict:
    """What identifies a model for a profile: its type, decoder shape and a hash of its config
    (how it was loaded left out: the same weights loaded in bfloat16 are the same model).

    `legacy`: the hash as profiles written before this rule took it (those keys dropped at the top
    level only, so a sub-config's dtype counted; see `legacy_fingerprints`)."""
    if legacy:
        return _fingerprint(_legacy_data(config))
    return _fingerprint(_without_volatile(_config_dict(config)))


def _legacy_data(config: Any) -> dict:
    """The config dict as the rule before this one hashed it: `VOLATILE_CONFIG_KEYS` dropped at the
    top level only."""
    return {k: v for k, v in _config_dict(config).items() if k not in VOLATILE_CONFIG_KEYS}


LOAD_DTYPES = (None, "float32", "bfloat16", "float16")  # a sub-config's dtype as `to_dict` gives it


def legacy_fingerprints(config: Any) -> list[dict]:
    """The fingerprints profiles written before the current rule would hold for this model,
    loaded in any usual dtype: those hashed a sub-config's ``dtype`` (None when the config was read
    from disk, the loading dtype once the weights were loaded). `Profile.check_model` accepts each:
    the dtype says how the model was loaded, not which model it is."""
    data = _legacy_data(config)
    found = []
    for dtype in LOAD_DTYPES:
        variant = {k: ({**v, **{key: dtype for key in ("dtype", "torch_dtype") if key in v}} if isinstance(v, dict) else v)
                   for k, v in data.items()}
        fingerprint = _fingerprint(variant)
        if fingerprint not in found:
            found.append(fingerprint)
    return found


@dataclass
class LatencyModel:
    """Prefill seconds from token counts (see the module docstring)."""

    constant: float = 0.0
    per_visual_token: float = 0.0
    per_token: float = 0.0
    per_token_squared: float = 0.0

    @staticmethod
    def features(tokens_per_layer: Sequence[int], visual_tokens: int) -> list[float]:
        return [1.0, float(visual_tokens), float(sum(tokens_per_layer)), float(sum(n * n for n in tokens_per_layer))]

    def predict(self, tokens_per_layer: Sequence[int], visual_tokens: int) -> float:
        x = self.features(tokens_per_layer, visual_tokens)
        coef = (self.constant, self.per_visual_token, self.per_token, self.per_token_squared)
        return sum(c * v for c, v in zip(coef, x))

    @classmethod
    def fit(cls, samples: Sequence[tuple[Sequence[int], int, float]]) -> "LatencyModel":
        """Fit on ``(tokens_per_layer, visual_tokens, seconds)`` samples (non-negative coefficients)."""
        import torch

        if len(samples) < 4:
            raise ValueError(f"fitting the latency model needs at least 4 timed runs, got {len(samples)}")
        x = torch.tensor([cls.features(n, v) for n, v, _ in samples], dtype=torch.float64)
        y = torch.tensor([s for _, _, s in samples], dtype=torch.float64)
        scale = x.abs().amax(0).clamp_min(1e-12)  # columns span 1 .. 1e8: scale, solve, unscale
        coef = _nnls(x / scale, y) / scale
        return cls(*coef.tolist())


def _nnls(x, y, iterations: int = 2000):
    """Non-negative least squares by projected gradient (4 unknowns: plenty)."""
    import torch

    coef = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1).clamp_min(0)
    lipschitz = float(torch.linalg.matrix_norm(x.T @ x, ord=2)) or 1.0
    for _ in range(iterations):
        coef = (coef - (x.T @ (x @ coef - y)) / lipschitz).clamp_min(0)
    return coef


@dataclass
class Point:
    """One calibrated configuration."""

    name: str
    config: dict  # AIMConfig fields
    agreement: float  # greedy next token equal to the unchanged model's, fraction of inputs
    kl: float  # mean KL(unchanged || this) of the next-token distribution, nats
    flops_fraction: float  # mean LLM prefill FLOPs / the unchanged model's, calibration inputs
    seconds: float  # mean measured prefill time on the calibration inputs
    latency_scale: float = 1.0  # measured / latency-model-predicted time on the calibration inputs

    def aim_config(self) -> AIMConfig:
        return AIMConfig(**self.config)

    @property
    def fidelity(self) -> Fidelity:
        """Sort key, higher is better (`Fidelity`: lower KL first, then agreement)."""
        return Fidelity(-self.kl, self.agreement)


@dataclass
class Profile:
    """Calibration of one model on one machine (see `aim.budget.calibrate`)."""

    model: dict
    device: str
    points: list[Point]
    latency: LatencyModel
    inputs: str = ""  # what the calibration ran on
    version: int = PROFILE_VERSION
    frontier_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.frontier_names:
            self.frontier_names = [p.name for p in pareto_frontier(self.points)]

    @property
    def frontier(self) -> list[Point]:
        """The points not strictly dominated (ties kept), cheapest first (see `pareto_frontier`)."""
        by_name = {p.name: p for p in self.points}
        return [by_name[n] for n in self.frontier_names]

    def check_model(self, config: Any) -> None:
        """A clear error when this profile was made for another model."""
        mine = model_fingerprint(config)
        if mine != self.model and self.model not in legacy_fingerprints(config):
            raise ValueError(
                f"this AIM profile was calibrated for another model ({self.model}), not this one ({mine}); "
                "run `aim calibrate MODEL_PATH --out profile.json` for this model"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = dataclasses.asdict(self)
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read an AIM profile from {path}: {err}") from err
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"{path} is an AIM profile of version {data.get('version')}, this aim reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; run `aim calibrate` again")
        if data["version"] < 4:
            data.pop("frontier_names", None)
        data["version"] = PROFILE_VERSION
        data["points"] = [Point(**p) for p in data["points"]]
        data["latency"] = LatencyModel(**data["latency"])
        return cls(**data)


def _family_and_keep(point: Point) -> tuple[str, float]:
    """The setting a point belongs to apart from its merge keep fraction, and that fraction."""
    config = {k: v for k, v in point.config.items() if k not in ("merge_keep", "merge_schedule")}
    schedule = point.config.get("merge_schedule") or ()
    keep = point.config.get("merge_keep") or (schedule[-1] if schedule else 1.0)
    return json.dumps(config, sort_keys=True, default=str), float(keep)


def keep_families(points: Sequence[Point]) -> list[list[tuple[float, Point]]]:
    """The points grouped by family (the setting apart from the merge keep fraction), each family
    as ``(keep fraction, point)`` by increasing keep; equal keeps in a fixed order."""
    families: dict[str, list[tuple[float, Point]]] = {}
    for point in points:
        family, keep = _family_and_keep(point)
        families.setdefault(family, []).append((keep, point))
    for members in families.values():
        members.sort(key=lambda m: (m[0], json.dumps(m[1].config.get("merge_schedule"))))
    return list(families.values())


def _increasing(values: list[float]) -> list[float]:
    """Pool adjacent violators: the non-decreasing sequence closest to `values` (least squares)."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in values:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def monotone_fidelity(points: Sequence[Point]) -> dict[str, Fidelity]:
    """Each point's fidelity made monotone in its merge keep fraction within its family (the
    points that differ only in that fraction): keeping more tokens of the same setting does not
    lose fidelity in expectation, while a calibration of a few dozen inputs resolves agreement only
    to one input (~1-2%) and ranks neighbouring keep fractions by noise. Agreement is made
    non-decreasing and KL non-increasing in the keep fraction by pooling adjacent violators; a
    family of one point keeps its measured values."""
    fidelity: dict[str, Fidelity] = {}
    for members in keep_families(points):
        agreement = _increasing([p.agreement for _, p in members])
        negative_kl = _increasing([-p.kl for _, p in members])
        for (_, point), a, k in zip(members, agreement, negative_kl):
            # rounded: a pooled mean and the same fraction measured elsewhere may differ in the last
            # bit, which would decide a tie on KL before agreement is looked at
            fidelity[point.name] = Fidelity(negative_kl=round(k, 12), agreement=round(a, 12))
    return fidelity


def pareto_frontier(points: Sequence[Point]) -> list[Point]:
    """Points no other point strictly beats on both cost (FLOPs fraction) and fidelity
    (`monotone_fidelity`), cheapest first, ties kept: walking from the cheapest up, a point joins
    when it is at least as faithful as every cheaper point. Ties join so that a budget spends what it allows: a dearer setting of the
    same family is never expected to be less faithful, and the selector runs the dearest frontier
    point that fits."""
    fidelity = monotone_fidelity(points)
    ordered = sorted(points, key=lambda p: (p.flops_fraction, tuple(-v for v in fidelity[p.name])))
    frontier: list[Point] = []
    for point in ordered:
        if not frontier or fidelity[point.name] >= fidelity[frontier[-1].name]:
            if frontier and point.flops_fraction == frontier[-1].flops_fraction:
                frontier[-1] = point
            else:
                frontier.append(point)
    return frontier
