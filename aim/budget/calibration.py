"""Calibration: run unlabeled inputs through the unchanged model and every candidate configuration,
measure a label-free fidelity and the prefill time of each, fit the latency model, keep the frontier.

Fidelity needs no labels: at the position where the answer is due (the prompt's last token) it
compares the next-token distribution with the unchanged model's: greedy agreement (same argmax)
and KL(unchanged || candidate). Whether that tracks labelled accuracy is measured, not assumed
(``benchmarks/budget_accuracy.py`` prints the rank correlation on the study model).
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from ..config import AIMConfig
from ..flops import load_model, prefill_flops
from ..patch import apply_aim, is_applied, last_stats, remove_aim
from .profile import LatencyModel, Point, Profile, model_fingerprint
from .space import Candidate, config_space

logger = logging.getLogger(__name__)


def describe_device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} torch threads"


def _prefill(model, inputs: dict, config: AIMConfig) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(**inputs, use_cache=True, aim_config=config).logits[:, -1].float()
    return logits.log_softmax(-1), time.perf_counter() - start


def calibrate(
    model: torch.nn.Module,
    inputs: Sequence[dict],
    candidates: Iterable[Candidate] | None = None,
    repeats: int = 1,
    description: str = "",
    progress: bool = True,
) -> Profile:
    """Calibrate `model` (a supported transformers model) on `inputs` (model-input dicts of one
    prompt each, as its processor makes them, the answer due after the last token).

    Args:
        candidates: configurations to measure (default `config_space` for the model's depth).
        repeats: timed runs per configuration and input (the median is kept).
        description: what the inputs are (stored in the profile).
    Returns:
        a `Profile` (save it with ``profile.save(path)``).
    """
    if not inputs:
        raise ValueError("calibration needs at least one input")
    if any(int(x["input_ids"].shape[0]) != 1 for x in inputs):
        raise ValueError("calibration inputs must hold one prompt each (a request's latency is per prompt)")
    applied_before = is_applied(model)
    if not applied_before:
        apply_aim(model, enabled=False)  # per-call configs need the patch; removed again at the end
    num_layers = model.config.get_text_config().num_hidden_layers
    video = any("pixel_values_videos" in x for x in inputs)
    candidates = list(candidates) if candidates is not None else config_space(num_layers, video=video)
    spec = load_model(model.config)
    try:
        for x in inputs[:2]:  # warm-up (allocator, kernels)
            _prefill(model, x, AIMConfig(enabled=False))
        reference, base_flops, samples = [], [], []
        for x in inputs:
            logp, took = _prefill(model, x, AIMConfig(enabled=False))
            stats = last_stats(model)
            reference.append(logp)
            base_flops.append(prefill_flops(spec, stats.tokens_per_layer_of(0)))
            samples.append((stats.tokens_per_layer_of(0), stats.visual_tokens_encoded[0], took))
        samples += _fewer_frames_samples(model, inputs, progress, repeats)
        # inputs outside, settings inside: a spell of load on a shared machine then slows every
        # setting alike instead of a few settings entirely
        rows: dict[str, list] = {c.name: [] for c in candidates}
        timed: dict[str, list] = {c.name: [] for c in candidates}  # each setting's (tokens, visual, seconds)
        failed: set[str] = set()
        bar = tqdm(total=len(inputs) * len(candidates), desc="calibrating", disable=not progress, unit="run")
        for x, ref, base in zip(inputs, reference, base_flops):
            for candidate in candidates:
                bar.update()
                if candidate.name in failed:
                    continue
                try:
                    rows[candidate.name].append(_measure(model, spec, candidate, x, ref, base, repeats, timed[candidate.name]))
                except (ValueError, NotImplementedError) as err:  # e.g. pooling on non-square crops
                    logger.info("skipping %s: %s", candidate.name, err)
                    failed.add(candidate.name)
        bar.close()
        kept = [c for c in candidates if c.name not in failed]
        latency = LatencyModel.fit(samples + [s for c in kept for s in timed[c.name]])
        points = [_point(c, rows[c.name], _latency_scale(latency, timed[c.name])) for c in kept]
    finally:
        if not applied_before:
            remove_aim(model)
    return Profile(
        model=model_fingerprint(model.config),
        device=describe_device(),
        points=points,
        latency=latency,
        inputs=description or f"{len(inputs)} inputs",
    )


def _fewer_frames_samples(model, inputs: Sequence[dict], progress: bool, repeats: int = 1) -> list:
    """Timings of the unchanged LLM on fewer frames of each video (`frame_keep` at the fractions a
    latency budget may encode, `aim.budget.select.FRAME_KEEPS`), for families that can encode fewer
    frames: every calibration input holds the same number of visual tokens, so without these the
    latency model could not tell the vision tower's time per visual token from its constant, and
    would mispredict the prefills that encode fewer frames."""
    from ..patch import family_for
    from .inputs import FRAME_KEEPS

    if not family_for(model).encodes_fewer_frames:
        return []
    videos = [x for x in inputs if "pixel_values_videos" in x and x["pixel_values_videos"].shape[1] > 1]
    samples = []
    for x in tqdm(videos, desc="timing fewer frames", disable=not progress or not videos, unit="input"):
        for keep in FRAME_KEEPS[1:]:
            times = [_prefill(model, x, AIMConfig(merge_schedule=(), prune=False, frame_keep=keep))[1]
                     for _ in range(max(1, repeats))]
            took = sorted(times)[len(times) // 2]
            stats = last_stats(model)
            samples.append((stats.tokens_per_layer_of(0), stats.visual_tokens_encoded[0], took))
    return samples


def _latency_scale(latency: LatencyModel, timed: list) -> float:
    """A setting's measured / predicted time over its calibration runs: the cost its token counts do
    not show (e.g. temporal matching), so that a cheap-looking setting is not chosen for a latency
    budget it misses (and the load correction does not mistake that miss for load)."""
    predicted = sum(latency.predict(tokens, visual) for tokens, visual, _ in timed)
    return sum(seconds for _, _, seconds in timed) / predicted if predicted > 0 else 1.0


def _measure(model, spec, candidate: Candidate, x, ref, base, repeats, samples) -> tuple[float, float, float, float]:
    """One setting on one input: (agreement, KL, FLOPs fraction, seconds); the timing joins `samples`."""
    times = []
    for _ in range(max(1, repeats)):
        logp, took = _prefill(model, x, candidate.config)
        times.append(took)
    took = sorted(times)[len(times) // 2]
    stats = last_stats(model)
    tokens = stats.tokens_per_layer_of(0)
    samples.append((tokens, stats.visual_tokens_encoded[0], took))
    agree = float(logp.argmax(-1).eq(ref.argmax(-1)).float().mean())
    kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
    return agree, kl, prefill_flops(spec, tokens) / max(base, 1), took


def _point(candidate: Candidate, rows: list[tuple[float, float, float, float]], latency_scale: float) -> Point:
    n = len(rows)
    agree, kl, fraction, seconds = (sum(column) / n for column in zip(*rows))
    config = candidate.config
    return Point(
        name=candidate.name,
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
        agreement=agree, kl=kl, flops_fraction=fraction, seconds=seconds, latency_scale=latency_scale,
    )
