"""Per-layer prefill FLOPs, KV-cache bytes and decode FLOPs, baseline vs AIM, and the sweep over
AIM settings. The counting convention is in the package docstring (``aim.flops``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..config import AIMConfig, visual_tokens_kept
from ..counts import evs_kept_tokens, group_size_after_merge, kept_frames, temporal_frame_sizes
from .inputs import InputSpec
from .model_spec import ModelSpec, load_model

DTYPE_BYTES = {
    "float32": 4, "fp32": 4,
    "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
    "float8": 1, "fp8": 1, "int8": 1,
}
TERA = 1e12


# --------------------------------------------------------------------------------------------


@dataclass
class LayerCost:
    """One decoder layer in one configuration (batch size 1)."""

    layer: int
    tokens: int
    visual_tokens: int
    linear_flops: int
    attention_flops: int
    prefill_flops: int
    kv_cache_bytes: int
    decode_flops: int  # one generated token right after the prefill, attending to this layer's cache

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CostReport:
    """Prefill / decode FLOPs and KV-cache size of one configuration."""

    model: str
    input: InputSpec
    aim: dict | None  # the AIMConfig as a dict, None for the baseline
    dtype: str
    attention: str  # "full" (the paper's convention) or "causal"
    visual_tokens_in_llm: int
    layers: list[LayerCost]
    vision_flops: int | None  # vision tower + projector estimate, not included in the totals
    notes: list[str] = field(default_factory=list)

    @property
    def prefill_flops(self) -> int:
        return sum(layer.prefill_flops for layer in self.layers)

    @property
    def prefill_tflops(self) -> float:
        return self.prefill_flops / TERA

    @property
    def decode_flops_per_token(self) -> int:
        return sum(layer.decode_flops for layer in self.layers)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(layer.kv_cache_bytes for layer in self.layers)

    @property
    def tokens_per_layer(self) -> list[int]:
        return [layer.tokens for layer in self.layers]

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "input": self.input.as_dict(),
            "aim": self.aim,
            "dtype": self.dtype,
            "attention": self.attention,
            "visual_tokens_in_llm": self.visual_tokens_in_llm,
            "prefill_flops": self.prefill_flops,
            "prefill_tflops": self.prefill_tflops,
            "decode_flops_per_token": self.decode_flops_per_token,
            "kv_cache_bytes": self.kv_cache_bytes,
            "vision_flops": self.vision_flops,
            "layers": [layer.as_dict() for layer in self.layers],
            "notes": list(self.notes),
        }


@dataclass
class Comparison:
    """Baseline vs AIM for one model and input."""

    baseline: CostReport
    aim: CostReport

    @property
    def prefill_ratio(self) -> float:
        """Baseline prefill FLOPs / AIM prefill FLOPs (6.8x in the paper)."""
        return self.baseline.prefill_flops / max(self.aim.prefill_flops, 1)

    @property
    def kv_ratio(self) -> float:
        return self.baseline.kv_cache_bytes / max(self.aim.kv_cache_bytes, 1)

    @property
    def decode_ratio(self) -> float:
        return self.baseline.decode_flops_per_token / max(self.aim.decode_flops_per_token, 1)

    def as_dict(self) -> dict:
        return {
            "baseline": self.baseline.as_dict(),
            "aim": self.aim.as_dict(),
            "prefill_ratio": self.prefill_ratio,
            "kv_cache_ratio": self.kv_ratio,
            "decode_ratio": self.decode_ratio,
        }


def _dtype_bytes(dtype: str) -> int:
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def frames_encoded(spec: ModelSpec, inputs: InputSpec, config: AIMConfig | None) -> InputSpec:
    """`inputs` as the vision tower and the LLM see them with ``config.frame_keep``: each video
    keeps the groups (frames) and vision passes of its kept frames (`aim.counts.kept_frames`)."""
    if config is None or not config.drops_frames or not inputs.videos:
        return inputs
    family = spec.family
    if family is None or not family.encodes_fewer_frames or spec.frames_per_group != 1:
        raise ValueError(
            f"frame_keep (fewer video frames through the vision tower) is not available for {spec.name} "
            f"({spec.model_type}); the engine refuses it there too"
        )
    groups, patches, videos, start = [], [], [], 0
    passes = list(inputs.vision_patches)
    for count in inputs.videos:
        kept = [start + i for i in kept_frames(count, config.frame_keep)]
        groups += [inputs.visual_groups[i] for i in kept]
        patches += [passes[i] for i in kept if i < len(passes)]
        videos.append(len(kept))
        start += count
    groups += inputs.visual_groups[start:]
    patches += passes[start:]
    return replace(inputs, visual_groups=tuple(groups), vision_patches=tuple(patches), videos=tuple(videos))


def visual_tokens_per_layer(spec: ModelSpec, inputs: InputSpec, config: AIMConfig | None) -> tuple[int, list[int]]:
    """``(visual tokens entering the LLM, [visual tokens each decoder layer sees])``, engine rounding."""
    num_layers = spec.llm.num_layers
    if config is None or not config.enabled:
        return inputs.visual_tokens, [inputs.visual_tokens] * num_layers
    ratios = config.keep_ratios(num_layers)
    inputs = frames_encoded(spec, inputs, config)
    groups = inputs.visual_groups
    if config.temporal_threshold is not None:
        raise ValueError(
            "temporal_threshold merges as many tokens as the video repeats: its counts depend on the "
            "pixels. Estimate with temporal_keep (a fraction), or count a real run with aim.last_stats"
        )
    if config.temporal_merging:
        start, merged = 0, []
        for count in inputs.videos:
            merged.extend(temporal_frame_sizes(groups[start : start + count], config.temporal_keep))
            start += count
        groups = tuple(merged) + groups[start:]
    if config.merge_schedule and config.merge_method == "evs":  # per video; images stay as they are
        start, pruned = 0, []
        for count in inputs.videos:
            pruned.append(evs_kept_tokens(groups[start], count, config.merge_schedule[-1]))
            start += count
        groups = tuple(pruned) + groups[start:]
    elif config.merge_schedule:
        groups = tuple(group_size_after_merge(g, config.merge_schedule, config.merge_method) for g in groups)
    visual_in_llm = sum(groups) + inputs.marker_tokens
    return visual_in_llm, [visual_tokens_kept(visual_in_llm, r) for r in ratios]


def prefill_flops(model: Any, tokens_per_layer: list[int], attention: str = "full") -> int:
    """Prefill FLOPs of the LLM decoder layers when layer ``l`` processes ``tokens_per_layer[l]``
    tokens (e.g. one sample's column of ``aim.last_stats(model).tokens_per_layer``)."""
    llm = load_model(model).llm
    if len(tokens_per_layer) != llm.num_layers:
        raise ValueError(f"got {len(tokens_per_layer)} token counts for {llm.num_layers} decoder layers")
    if attention not in ("full", "causal"):
        raise ValueError(f"attention must be 'full' (the paper's convention) or 'causal', got {attention!r}")
    return sum(llm.prefill_flops(int(n), attention == "causal") for n in tokens_per_layer)


def estimate(
    model: Any, inputs: InputSpec, config: AIMConfig | None = None, dtype: str = "bfloat16", attention: str = "full"
) -> CostReport:
    """Per-layer prefill FLOPs, KV-cache bytes and decode FLOPs of `model` on `inputs`.

    Args:
        model: anything `load_model` takes (built-in name, config.json path, config, ModelSpec).
        inputs: an `InputSpec` (see `video_input` / `image_input`).
        config: an `AIMConfig`; None (or ``enabled=False``) for the unchanged model.
        dtype: KV-cache element type, e.g. ``"bfloat16"`` or ``"float32"``.
        attention: ``"full"`` counts QK^T and AV over every (query, key) pair, the paper's convention
            (and what torch's FLOP counter counts); ``"causal"`` only the lower triangle, what causal
            attention kernels (flash, sdpa ``is_causal``) actually compute in a prefill.
    """
    spec = load_model(model)
    if not isinstance(inputs, InputSpec):
        raise ValueError(f"inputs must be an InputSpec (see video_input / image_input), got {type(inputs).__name__}")
    if config is not None and not isinstance(config, AIMConfig):
        raise ValueError(f"config must be an AIMConfig or None, got {type(config).__name__}")
    elem = _dtype_bytes(dtype)
    if attention not in ("full", "causal"):
        raise ValueError(f"attention must be 'full' (the paper's convention) or 'causal', got {attention!r}")
    causal = attention == "causal"
    llm = spec.llm
    active = config is not None and config.enabled
    visual_in_llm, visual = visual_tokens_per_layer(spec, inputs, config)
    notes = []
    masked = active and config.prune_mode == "mask"
    if masked:
        notes.append("prune_mode='mask' hides merged / pruned tokens but keeps computing them: no FLOPs saved")
    linear = llm.linear_macs_per_token()
    layers = []
    for idx, v in enumerate(visual):
        tokens = inputs.text_tokens + v
        width = inputs.total_tokens if masked else tokens  # what the layer really computes on
        layers.append(
            LayerCost(
                layer=idx,
                tokens=tokens,
                visual_tokens=v,
                linear_flops=2 * width * linear,
                attention_flops=2 * llm.attention_macs(width, width, causal),
                prefill_flops=llm.prefill_flops(width, causal),
                kv_cache_bytes=width * llm.kv_bytes_per_token(elem),
                decode_flops=2 * (linear + llm.attention_macs(1, width + 1)),
            )
        )
    return CostReport(
        model=spec.name,
        input=inputs,
        # shallow (its fields are scalars and tuples): a deep asdict was a third of a budget's estimate
        aim={f.name: getattr(config, f.name) for f in fields(config)} if active else None,
        dtype=str(dtype),
        attention=attention,
        visual_tokens_in_llm=visual_in_llm,
        layers=layers,
        vision_flops=vision_flops(spec, inputs, config),
        notes=notes,
    )


def compare(
    model: Any, inputs: InputSpec, config: AIMConfig | None = None, dtype: str = "bfloat16", attention: str = "full"
) -> Comparison:
    """Baseline and AIM (`config`, default: the paper's settings) side by side."""
    spec = load_model(model)
    return Comparison(
        baseline=estimate(spec, inputs, None, dtype, attention),
        aim=estimate(spec, inputs, config if config is not None else AIMConfig(), dtype, attention),
    )


def vision_flops(model: Any, inputs: InputSpec, config: AIMConfig | None = None) -> int | None:
    """Analytic vision tower + projector FLOPs (2 x MACs of its matmuls and attention) for the
    passes described by ``inputs.vision_patches``; None when unknown. AIM changes it only with
    ``config.frame_keep`` (fewer frames encoded)."""
    spec = load_model(model)
    inputs = frames_encoded(spec, inputs, config)
    v = spec.vision
    if v is None or not inputs.vision_patches:
        return None
    macs = 0
    tokens = list(inputs.visual_groups) or [0] * len(inputs.vision_patches)
    for patches, group_tokens in zip(inputs.vision_patches, tokens):
        macs += v.tower_macs(patches) + v.projector_macs(patches, group_tokens)
    return 2 * macs


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    merge_keep: float
    prune: str  # "off" or "start-end" layers
    config: AIMConfig
    visual_tokens_in_llm: int
    prefill_flops: int
    kv_cache_bytes: int
    decode_flops_per_token: int
    frontier: bool = False

    def as_dict(self) -> dict:
        out = asdict(self)
        out["config"] = asdict(self.config)
        return out


def sweep(
    model: Any,
    inputs: InputSpec,
    merge_keeps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.125),
    prune_spans: tuple[tuple[float, float] | None, ...] = (None, (0.25, 0.5), (0.25, 0.75), (0.5, 0.75), (0.5, 1.0), (0.75, 1.0)),
    dtype: str = "bfloat16",
    attention: str = "full",
) -> list[SweepPoint]:
    """Prefill FLOPs / KV memory over merge keep ratios x pruning spans, sorted by FLOPs.

    A pruning span ``(a, b)`` starts pruning at layer ``round(a * L)`` and reaches zero visual
    tokens at layer ``round(b * L)`` (``b = 1``: a few stay to the last layer), in equal steps;
    the paper's default is ``(0.5, 0.75)``.

    The KV cache holds exactly the token-layers the prefill computed on (every layer's tokens), so
    it measures how much the LLM keeps, and prefill FLOPs what it pays. At equal KV size the
    settings differ in FLOPs through the quadratic attention term: tokens concentrated in the
    first layers (less merging, early pruning) cost more than the same token-layers spread over
    many layers (more merging, later pruning). A point is on the frontier when no
    setting with fewer prefill FLOPs keeps at least as many KV entries.
    """
    spec = load_model(model)
    num_layers = spec.llm.num_layers
    points = []
    for keep in merge_keeps:
        for span in prune_spans:
            if span is None:
                config, label = AIMConfig(merge_keep=keep, prune=False), "off"
            else:
                start = min(max(1, round(span[0] * num_layers)), num_layers - 1)
                end = max(start, round(span[1] * num_layers))
                config = AIMConfig(merge_keep=keep, prune_start=start, prune_step=1.0 / (end - start + 1))
                label = f"{start}-{end}"
            report = estimate(spec, inputs, config, dtype, attention)
            points.append(SweepPoint(keep, label, config, report.visual_tokens_in_llm, report.prefill_flops,
                                     report.kv_cache_bytes, report.decode_flops_per_token))
    points.sort(key=lambda p: (p.prefill_flops, -p.kv_cache_bytes))  # at equal FLOPs the larger cache dominates

    best_kv = -1
    for point in points:  # cheapest first: on the frontier when it keeps more than every cheaper setting
        if point.kv_cache_bytes > best_kv:
            point.frontier = True
            best_kv = point.kv_cache_bytes
    return points
