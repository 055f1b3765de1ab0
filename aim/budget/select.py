"""Choosing a frontier point for one request, and correcting latency predictions under load.

For each prefill the engine describes the input by its token counts (`input_spec`), predicts the
cost of every frontier point *for that input* (FLOPs fraction from the FLOPs model; seconds from
the profile's latency model times the load correction), and runs the most faithful point whose
prediction fits the budget. Below the cheapest point: a clear error, never a silent overrun.

Load correction (`LoadTracker`): after each budgeted prefill, the ratio measured / predicted
seconds enters an exponential moving average. The factor the choice uses moves to that average
only when it leaves a dead band around the factor in use (hysteresis), so aim moves to cheaper
points when the machine is shared and back when the load ends, without flapping on noise. The
first few measured ratios replace the 1.0 prior outright (their plain mean is the factor): the
profile's latency model was fitted on the machine (and at the moment) of calibration, and the
first calls tell how fast this one is. Until the first measurement, a latency budget below the cheapest point's prediction runs the cheapest point as a
best effort with a warning (the prediction is not yet checked on this machine); after it, such a
budget runs the cheapest only when the current load explains the shortfall, and is refused when
it would not fit even on the quiet machine.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from ..config import AIMConfig
from ..flops import InputSpec, ModelSpec
from .profile import Point, Profile
from .space import costs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """A request's budget: a fraction of the unchanged model's LLM prefill FLOPs, or prefill
    milliseconds (time to first token)."""

    flops: float | None = None
    ms: float | None = None

    def __post_init__(self) -> None:
        if (self.flops is None) == (self.ms is None):
            raise ValueError("give exactly one budget: a FLOPs fraction (budget=0.3) or milliseconds (budget_ms=250)")
        if self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise ValueError(f"a FLOPs budget is a fraction of the unchanged model's prefill FLOPs in (0, 1], got {self.flops!r}")
        if self.ms is not None and not self.ms > 0:
            raise ValueError(f"a latency budget is a positive number of milliseconds, got {self.ms!r}")

    def describe(self) -> str:
        return f"{self.flops:.0%} of the prefill FLOPs" if self.flops is not None else f"{self.ms:g} ms prefill"


@dataclass(frozen=True)
class Choice:
    """What a budgeted prefill ran: the point, its predicted cost, and (after the call) the
    measured prefill seconds."""

    budget: Budget
    point: str
    config: AIMConfig
    predicted_flops_fraction: float
    predicted_seconds: float
    load_factor: float
    measured_seconds: float | None = None


class LoadTracker:
    """Moving average of measured / predicted prefill seconds, with hysteresis (module docstring).

    Args:
        alpha: weight of the newest ratio in the moving average.
        warmup: the first `warmup` ratios set the factor to their plain mean (no prior, no band).
        band: relative dead band: the factor in use changes only when the average leaves
            ``[factor / (1 + band), factor * (1 + band)]``.
    """

    def __init__(self, alpha: float = 0.3, band: float = 0.25, warmup: int = 5) -> None:
        self.alpha, self.band, self.warmup = alpha, band, warmup
        self.average = 1.0
        self.factor = 1.0
        self.quietest = 1.0  # the lowest factor measured: this machine's speed when quiet
        self.observations = 0
        self._lock = threading.Lock()  # one model, many threads

    def observe(self, measured: float, predicted: float) -> None:
        if predicted <= 0 or measured <= 0:
            return
        with self._lock:
            ratio = measured / predicted
            self.observations += 1
            if self.observations <= self.warmup:
                # the 1.0 before them is a prior (the calibrating machine's speed), not a measurement;
                # a mean of several, since the first call after patching is often slow
                previous = 0.0 if self.observations == 1 else self.average
                self.average = self.factor = previous + (ratio - previous) / self.observations
                self.quietest = self.factor if self.observations == 1 else min(self.quietest, self.factor)
                return
            self.average = (1 - self.alpha) * self.average + self.alpha * ratio
            if not self.factor / (1 + self.band) <= self.average <= self.factor * (1 + self.band):
                self.factor = self.average
                self.quietest = min(self.quietest, self.factor)


def input_spec(text_tokens: int, groups: list[int], markers: int, video_groups: list[int]) -> InputSpec:
    """An `InputSpec` from one prompt's counts: `groups` are its frame / crop sizes, of which the
    runs in `video_groups` (groups per video) are videos (their groups must come first)."""
    return InputSpec(text_tokens=text_tokens, visual_groups=tuple(groups), marker_tokens=markers, videos=tuple(video_groups))


class Selector:
    """Chooses a frontier point per request for one model (`profile` calibrated for it)."""

    MEMO_SIZE = 4096  # remembered (point, input layout) predictions; cleared when full

    def __init__(self, profile: Profile, spec: ModelSpec, clock: Callable[[], float] | None = None) -> None:
        import time

        self.profile = profile
        self.spec = spec
        self.load = LoadTracker()
        self.clock = clock or time.perf_counter
        self._predictions: dict[tuple[str, InputSpec], tuple[float, float]] = {}

    def predict(self, point: Point, inputs: InputSpec) -> tuple[float, float]:
        """``(FLOPs fraction, seconds before load correction)`` of `point` on `inputs`.

        Memoised per (point, input layout): the estimate costs ~0.1 ms per point, the choice runs
        inside the timed prefill for every point of the frontier, and requests repeat layouts."""
        key = (point.name, inputs)
        found = self._predictions.get(key)
        if found is None:
            fraction, tokens = costs(self.spec, inputs, point.aim_config())
            found = (fraction, self.profile.latency.predict(tokens, inputs.visual_tokens) * point.latency_scale)
            if len(self._predictions) >= self.MEMO_SIZE:
                self._predictions.clear()
            self._predictions[key] = found
        return found

    def choose(self, budget: Budget, inputs: list[InputSpec]) -> Choice:
        """The most faithful frontier point (the dearest among equally faithful ones) whose
        predicted cost fits `budget` on every prompt of the batch (`inputs`); a clear error when
        even the cheapest does not."""
        factor = self.load.factor
        best = None
        cheapest = None
        limit = budget.flops if budget.flops is not None else budget.ms
        # the frontier only (fidelity against FLOPs): predicting every calibrated setting per request
        # costs more time than a latency budget can spare (254 settings on the default model)
        for point in self.profile.frontier:
            per_prompt = [self.predict(point, spec) for spec in inputs]
            fraction = max(c[0] for c in per_prompt)
            seconds = max(c[1] for c in per_prompt) * factor
            cost = fraction if budget.flops is not None else seconds * 1000.0
            if cheapest is None or cost < cheapest[0]:
                cheapest = (cost, point, fraction, seconds)
            if cost <= limit + 1e-12:  # the frontier is ordered by fidelity: the last that fits is the most faithful
                best = (point, fraction, seconds)
        if best is None and budget.ms is not None and self.load.observations == 0:
            # no prefill measured on this machine yet: the prediction comes from the calibrating
            # machine, so run the cheapest (best effort, with a warning) and let its time tell
            logger.warning("latency budget %s: the cheapest calibrated setting '%s' is predicted to need %.0f ms "
                           "on the machine that calibrated the profile; running it as the best effort until this "
                           "machine's prefill times are measured", budget.describe(), cheapest[1].name, cheapest[0])
            best = cheapest[1:]
        quiet = self.load.quietest
        if best is None and budget.ms is not None and factor > quiet and cheapest[0] / factor * quiet <= limit + 1e-12:
            # the budget fits this machine when quiet, not under the load measured now: run the
            # cheapest setting (best effort, with a warning) rather than refuse, so that its measured
            # time keeps updating the load estimate and the choice comes back when the load ends
            logger.warning("latency budget %s: under the current load (x%.2f) even the cheapest calibrated setting "
                           "'%s' is predicted to need %.0f ms; running it as the best effort", budget.describe(),
                           factor, cheapest[1].name, cheapest[0])
            best = cheapest[1:]
        if best is None:
            unit = "of the prefill FLOPs" if budget.flops is not None else "ms"
            value = f"{cheapest[0]:.1%}" if budget.flops is not None else f"{cheapest[0]:.0f}"
            raise ValueError(
                f"budget {budget.describe()} is below the cheapest calibrated setting for this input "
                f"('{cheapest[1].name}' needs {value} {unit}"
                + ("" if budget.flops is not None else f", load factor {factor:.2f}") + "); "
                "allowed: a budget at least that large"
            )
        point, fraction, seconds = best
        return Choice(budget, point.name, point.aim_config(), fraction, seconds, factor)


def layout_specs(layout, valid) -> list[InputSpec]:
    """One `InputSpec` per prompt of a chunk, from its visual layout (`aim.layout.VisualLayout`)
    and ``(batch, seq)`` padding mask: text tokens, frame / crop sizes (videos first), markers."""
    visual = layout.visual.to(valid.device) & valid
    specs = []
    for sample in range(valid.shape[0]):
        groups = layout.groups[sample] if sample < len(layout.groups) else []
        videos = layout.videos[sample] if sample < len(layout.videos) else []
        in_video = [i for video in videos for i in video]
        rest = [i for i in range(len(groups)) if i not in set(in_video)]
        sizes = [int(groups[i].numel()) for i in in_video + rest]
        n_visual = int(visual[sample].sum())
        specs.append(input_spec(int(valid[sample].sum()) - n_visual, sizes, n_visual - sum(sizes), [len(v) for v in videos]))
    return specs
