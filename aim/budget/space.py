"""The configurations a budget chooses from, and their analytic cost on one input.

Every point is an `AIMConfig` with a short name. Its cost for an input is read from the FLOPs
model (`aim.flops`) for that input's token layout, so a point's cost follows the input: the same
point is cheaper, relative to the unchanged model, on a long video than on a short image prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AIMConfig, default_prune_start_end
from ..flops import InputSpec, ModelSpec
from ..flops.cost import estimate

# Finer where a small change of keep fraction moves the cost most: between 0.5 (~44% of the LLM
# prefill FLOPs on the study model) and none, a space without 0.8 / 0.65 / 0.55 left a 75% budget
# running at 44%; 0.2 and 0.075 fill the gaps below 0.25 and 0.1.
MERGE_KEEPS = (1.0, 0.8, 0.65, 0.55, 0.5, 0.35, 0.25, 0.2, 0.15, 0.1, 0.075, 0.05)
TEMPORAL_KEEPS = (1.0, 0.5, 0.25)


@dataclass(frozen=True)
class Candidate:
    """One configuration of the space: a name and the config."""

    name: str
    config: AIMConfig


def setting_name(config: AIMConfig, num_layers: int) -> str:
    if not config.enabled:
        return "off"
    parts = []
    if config.temporal_merging:
        parts.append(f"temporal {config.temporal_keep:g}")
    keep = config.merge_schedule[-1] if config.merge_schedule else 1.0
    if keep < 1.0:
        parts.append(f"merge {keep:g}" + ("" if config.merge_method == "bipartite" else f" ({config.merge_method})"))
    ratios = config.keep_ratios(num_layers)
    start = next((i for i, r in enumerate(ratios) if r < 1.0), None)
    if start is not None:
        gone = next((i for i, r in enumerate(ratios) if r <= 0.0), num_layers)
        parts.append(f"prune {start}-{gone}" + (" merged" if config.prune_action == "merge" else ""))
    if config.proportional_attention and parts:
        parts.append("proportional")
    return ", ".join(parts) or "off"


def config_space(num_layers: int, video: bool = True) -> list[Candidate]:
    """The candidate configurations for a model of `num_layers` decoder layers: merge keep
    fractions (none to 5%), temporal merging for video, pruning from half, a quarter or three
    quarters of depth (dropped or merged into kept tokens), merging without pruning also with
    proportional attention to the merged tokens, and the pooling baseline; plus the unchanged
    model ("off"). Names are unique."""
    half, end = default_prune_start_end(num_layers)
    prunes: list[dict] = [dict(prune=False)]
    for start in sorted({max(1, num_layers // 4), half, max(1, (3 * num_layers) // 4)}):
        if start >= num_layers:
            continue
        stop = max(end, start + 1) if start < end else num_layers
        step = 1.0 / max(stop - start, 1)
        for action in ("drop", "merge"):
            prunes.append(dict(prune_start=start, prune_step=step, prune_action=action))
    temporals = TEMPORAL_KEEPS if video else (1.0,)
    seen: dict[str, Candidate] = {"off": Candidate("off", AIMConfig(enabled=False))}
    for temporal in temporals:
        for keep in MERGE_KEEPS:
            for prune in prunes:
                schedule = dict(merge_keep=keep) if keep < 1.0 else dict(merge_schedule=())
                config = AIMConfig(temporal_keep=temporal, **schedule, **prune)
                if config.is_identity(num_layers):
                    continue
                # proportional attention with merging alone: where it pays on the study model
                # (benchmarks/proportional_attention.py); with pruning it would double the space
                variants = (config, config.replace(proportional_attention=True)) if not config.prune else (config,)
                for variant in variants:
                    name = setting_name(variant, num_layers)
                    seen.setdefault(name, Candidate(name, variant))
    for keep in (0.25, 0.1):  # the pooling baseline, where it helps (square frame grids)
        config = AIMConfig(merge_keep=keep, merge_method="pool", prune=False)
        seen.setdefault(setting_name(config, num_layers), Candidate(setting_name(config, num_layers), config))
    return list(seen.values())


def costs(spec: ModelSpec, inputs: InputSpec, config: AIMConfig, base=None) -> tuple[float, list[int]]:
    """``(FLOPs fraction, tokens per layer)`` of `config` on `inputs` (one estimate of each model;
    `base`: the unchanged model's estimate on `inputs`, when already made)."""
    base = base if base is not None else estimate(spec, inputs, None, dtype="float32")
    if not config.enabled:
        return 1.0, base.tokens_per_layer
    mine = estimate(spec, inputs, config, dtype="float32")
    return mine.prefill_flops / max(base.prefill_flops, 1), mine.tokens_per_layer
