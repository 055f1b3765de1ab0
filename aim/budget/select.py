"""Choosing a setting for one request.

For each prefill the engine describes the input by its token counts (`aim.budget.inputs`),
predicts the cost of every frontier point *for that input* (FLOPs fraction from the FLOPs model; seconds from
the profile's latency model times the load correction), and runs the most faithful point whose
prediction fits the budget, or a merge keep fraction between two calibrated ones of a family when
its interpolated fidelity is higher (`aim.budget.curves`). Below the cheapest point: a clear
error, never a silent overrun.

Load correction (`aim.budget.load.LoadTracker`): after each budgeted prefill the ratio measured /
predicted seconds corrects the predictions, so aim moves to cheaper points when the machine is
shared and back when the load ends; a latency budget holds for a quantile of prefills (default
0.9) through a margin from the measured spread of that ratio.

Until the first measurement, a latency budget below the cheapest point's prediction runs the
cheapest point as a best effort with a warning (the prediction is not yet checked on this
machine). After it, such a budget runs the cheapest as a best effort when its typical time on
the quiet machine (the lowest load factor measured, no margin) fits, and is refused when even
that does not fit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

from ..config import AIMConfig
from ..flops import InputSpec, ModelSpec
from ..flops.cost import estimate
from .curves import KEEP_STEP, keep_curves
from .load import LoadTracker
from .profile import Fidelity, Point, Profile, monotone_fidelity
from .space import costs, setting_name

logger = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.9  # a latency budget holds for nine prefills in ten


@dataclass(frozen=True)
class Budget:
    """A request's budget: a fraction of the unchanged model's LLM prefill FLOPs, or prefill
    milliseconds (time to first token). A latency budget holds for the `quantile` of prefills
    (default 0.9: nine in ten within it), from the measured spread of prefill times (`LoadTracker`);
    0.5 predicts the typical time, which half of the prefills exceed."""

    flops: float | None = None
    ms: float | None = None
    quantile: float | None = None  # latency budgets only; None: `DEFAULT_QUANTILE`

    def __post_init__(self) -> None:
        if (self.flops is None) == (self.ms is None):
            raise ValueError("give exactly one budget: a FLOPs fraction (budget=0.3) or milliseconds (budget_ms=250)")
        if self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise ValueError(f"a FLOPs budget is a fraction of the unchanged model's prefill FLOPs in (0, 1], got {self.flops!r}")
        if self.ms is not None and not self.ms > 0:
            raise ValueError(f"a latency budget is a positive number of milliseconds, got {self.ms!r}")
        if self.quantile is not None and self.ms is None:
            raise ValueError("a budget quantile applies to latency budgets (budget_ms / aim_budget_ms), not FLOPs budgets")
        if self.quantile is not None and not 0.5 <= self.quantile < 1.0:
            raise ValueError(f"a latency budget's quantile is the share of prefills it should hold for, in "
                             f"[0.5, 1), got {self.quantile!r}")

    @property
    def share(self) -> float:
        """The quantile of prefills a latency budget holds for."""
        return DEFAULT_QUANTILE if self.quantile is None else self.quantile

    def describe(self) -> str:
        if self.flops is not None:
            return f"{self.flops:.0%} of the prefill FLOPs"
        return f"{self.ms:g} ms prefill (p{100 * self.share:g})"


@dataclass(frozen=True)
class Choice:
    """What a budgeted prefill ran: the point, its predicted cost (`predicted_seconds`: the typical
    time, load-corrected; a latency budget compared it times `margin`), and (after the call) the
    measured prefill seconds."""

    budget: Budget
    point: str
    config: AIMConfig
    predicted_flops_fraction: float
    predicted_seconds: float
    load_factor: float
    margin: float = 1.0
    measured_seconds: float | None = None


class Selector:
    """Chooses a frontier point per request for one model (`profile` calibrated for it)."""

    MEMO_SIZE = 4096  # remembered (point, input layout) predictions; cleared when full

    def __init__(self, profile: Profile, spec: ModelSpec, clock: Callable[[], float] | None = None,
                 interpolate: bool = True) -> None:
        import time

        self.profile = profile
        self.spec = spec
        self.load = LoadTracker()
        self.clock = clock or time.perf_counter
        self._predictions: dict[tuple[str, InputSpec], tuple[float, float]] = {}
        self._unchanged: dict[InputSpec, object] = {}  # the unchanged model's cost estimate per layout
        self._fidelity = monotone_fidelity(profile.points)
        # keep fractions between the calibrated ones (aim.budget.curves); off: calibrated points only
        self.curves = keep_curves(profile, spec.llm.num_layers) if interpolate else []

    def predict(self, point: Point, inputs: InputSpec) -> tuple[float, float]:
        """``(FLOPs fraction, seconds before load correction)`` of `point` on `inputs`.

        Memoised per (point, input layout): the estimate costs ~0.1 ms per point, the choice runs
        inside the timed prefill for every point of the frontier, and requests repeat layouts."""
        return self._predict(point.name, point.aim_config, point.latency_scale, inputs)

    def _predict(self, key: str, config: Callable[[], AIMConfig], latency_scale: float,
                 inputs: InputSpec) -> tuple[float, float]:
        """`predict` for any setting, memoised under `key` (unique per setting: a point's name)."""
        key = (key, inputs)
        found = self._predictions.get(key)
        if found is None:
            base = self._unchanged.get(inputs)
            if base is None:
                if len(self._unchanged) >= self.MEMO_SIZE:
                    self._unchanged.clear()
                base = self._unchanged[inputs] = estimate(self.spec, inputs, None, dtype="float32")
            fraction, tokens = costs(self.spec, inputs, config(), base)
            found = (fraction, self.profile.latency.predict(tokens, inputs.visual_tokens) * latency_scale)
            if len(self._predictions) >= self.MEMO_SIZE:
                self._predictions.clear()
            self._predictions[key] = found
        return found

    def frames_for(self, budget: Budget, inputs_by_keep: dict[float, list[InputSpec]]) -> float:
        """The fraction of each video's frames a latency-budgeted prefill encodes, chosen before the
        vision tower runs: the largest of `inputs_by_keep` (frame fraction -> the batch's prompts
        with that many frames) for which a calibrated setting fits `budget` under the load measured
        now, else the smallest. FLOPs budgets count the LLM only, where merging beats encoding fewer
        frames: they always encode every frame. The setting itself is chosen after the vision tower,
        on the frames encoded (`choose`); fidelity was calibrated on whole videos, so fewer frames
        are a last resort, taken only where no setting fits the whole video."""
        if budget.ms is None or len(inputs_by_keep) < 2 or self.load.observations == 0:
            return 1.0  # (before any prefill is measured here, the predictions are another machine's)
        keeps = sorted(inputs_by_keep, reverse=True)
        for keep in keeps:
            if self._search(budget, inputs_by_keep[keep])[0] is not None:
                return keep
        return keeps[-1]

    def choose(self, budget: Budget, inputs: list[InputSpec]) -> Choice:
        """The most faithful frontier point (the dearest among equally faithful ones) whose
        predicted cost fits `budget` on every prompt of the batch (`inputs`), or a setting of a
        family's curve when its (interpolated) fidelity is higher (`aim.budget.curves`); a clear
        error when even the cheapest point does not fit."""
        return self._finish(budget, *self._search(budget, inputs))

    def _search(self, budget: Budget, inputs: list[InputSpec]):
        """``(best, cheapest, load, margin, limit)``: the most faithful setting that fits (None when
        none does) and the cheapest, as ``(name, config factory, FLOPs fraction, seconds)`` (the
        cheapest with what the budget limits first); no warning, no error."""
        load = self.load.factor
        # a latency budget holds for a quantile of prefills: the typical time times this margin fits
        margin = self.load.margin(budget.share) if budget.ms is not None else 1.0
        best = None
        cheapest = None
        limit = budget.flops if budget.flops is not None else budget.ms

        def cost(key: str, config: Callable[[], AIMConfig], scale: float) -> tuple[float, float, float]:
            """(what the budget limits, FLOPs fraction, typical load-corrected seconds)"""
            per_prompt = [self._predict(key, config, scale, spec) for spec in inputs]
            fraction = max(c[0] for c in per_prompt)
            seconds = max(c[1] for c in per_prompt) * load
            return (fraction if budget.flops is not None else seconds * margin * 1000.0), fraction, seconds

        # the frontier only (fidelity against FLOPs): predicting every calibrated setting per request
        # costs more time than a latency budget can spare (289 settings on the default model)
        for point in self.profile.frontier:
            value, fraction, seconds = cost(point.name, point.aim_config, point.latency_scale)
            # configs are built once, for the setting that runs: this loop is inside the timed prefill
            if cheapest is None or value < cheapest[0]:
                cheapest = (value, point.name, point.aim_config, fraction, seconds)
            if value <= limit + 1e-12:  # the frontier is ordered by fidelity: the last that fits is the most faithful
                best = (point.name, point.aim_config, fraction, seconds)
        if self.curves:
            # also a calibrated point off the frontier: the frontier ranks settings by their mean cost
            # on the calibration inputs, and this input may order them otherwise
            floor = self._fidelity[best[0]] if best is not None else Fidelity(-math.inf, -math.inf)
            best = self._between_calibrated(cost, limit, floor) or best
        return best, cheapest, load, margin, limit

    def _finish(self, budget: Budget, best, cheapest, load: float, margin: float, limit: float) -> Choice:
        """`choose`'s answer from its search: the best setting, a best effort with a warning, or
        a clear error."""
        if best is None and budget.ms is not None and self.load.observations == 0:
            # no prefill measured on this machine yet: the prediction comes from the calibrating
            # machine, so run the cheapest (best effort, with a warning) and let its time tell
            logger.warning("latency budget %s: the cheapest calibrated setting '%s' is predicted to need %.0f ms "
                           "on the machine that calibrated the profile; running it as the best effort until this "
                           "machine's prefill times are measured", budget.describe(), cheapest[1], cheapest[0])
            best = cheapest[1:]
        quiet = self.load.quietest
        if (best is None and budget.ms is not None and (load > quiet or margin > 1.0)
                and 1000.0 * cheapest[4] / load * quiet <= limit + 1e-12):
            # the cheapest setting's typical time fits this machine when quiet, not under the load
            # (or with the margin) measured now: run it (best effort, with a warning) rather than
            # refuse, so that its measured time keeps updating the estimates and the choice comes
            # back when the load ends
            logger.warning("latency budget %s: under the current load (x%.2f) and the p%g margin (x%.2f) even the "
                           "cheapest calibrated setting '%s' is predicted to need %.0f ms; running it as the best "
                           "effort", budget.describe(), load, 100 * budget.share, margin, cheapest[1], cheapest[0])
            best = cheapest[1:]
        if best is None:
            unit = "of the prefill FLOPs" if budget.flops is not None else "ms"
            value = f"{cheapest[0]:.1%}" if budget.flops is not None else f"{cheapest[0]:.0f}"
            raise ValueError(
                f"budget {budget.describe()} is below the cheapest calibrated setting for this input "
                f"('{cheapest[1]}' needs {value} {unit}"
                + ("" if budget.flops is not None else f", load factor {load:.2f}, p{100 * budget.share:g} margin "
                   f"{margin:.2f}") + "); "
                "allowed: a budget at least that large"
            )
        name, make_config, fraction, seconds = best
        return Choice(budget, name, make_config(), fraction, seconds, load, margin)

    def _between_calibrated(self, cost, limit: float, floor: Fidelity):
        """The most faithful setting on a family's curve that fits `limit`, when its (interpolated)
        fidelity is strictly above `floor`: ``(name, config factory, FLOPs fraction, seconds)`` or
        None.

        Per curve: skip it when no member beats `floor`; else find the dearest member that fits
        and solve the largest keep on the `KEEP_STEP` grid between it and the next member. Both
        searches are binary, taking cost to grow with the keep fraction: FLOPs do; a predicted
        time may not quite (each member has its own time scale), and then a search can settle on
        a cheaper setting than the dearest that fits, never on one that does not fit.
        Predictions are memoised like the frontier's."""
        best = None
        num_layers = self.spec.llm.num_layers
        for curve in self.curves:
            members = curve.members
            above = next((i for i, m in enumerate(members) if m.fidelity > floor), None)
            if above is None:
                continue
            lowest = max(above - 1, 0)  # below it every member is at most as faithful as `floor`

            def fits(i: int) -> tuple[float, float, float] | None:
                m = members[i]
                found = cost(m.point.name, m.point.aim_config, m.point.latency_scale)
                return found if found[0] <= limit + 1e-12 else None

            if fits(lowest) is None:
                continue
            lo, hi = lowest, len(members) - 1  # binary search: lo fits; the dearest member that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(mid) is not None else (lo, mid - 1)
            dearest = members[lo]
            if dearest.fidelity > floor:
                _, fraction, seconds = fits(lo)
                best, floor = (dearest.point.name, dearest.point.aim_config, fraction, seconds), dearest.fidelity
            if lo + 1 >= len(members) or not members[lo + 1].fidelity > floor or not curve.spans(lo):
                continue
            # the largest keep on the grid strictly between the two members that fits
            first = int(dearest.keep / KEEP_STEP + 1e-9) + 1
            last = math.ceil(members[lo + 1].keep / KEEP_STEP - 1e-9) - 1
            solved = None
            while first <= last:
                mid = (first + last + 1) // 2
                keep = round(mid * KEEP_STEP, 6)
                config = curve.config(keep)
                _, scale = curve.between(lo, keep)
                # keyed by the whole config: a name omits knobs such as tau or the seed
                found = cost(repr(config), lambda c=config: c, scale)
                if found[0] <= limit + 1e-12:
                    solved, first = (keep, config, found), mid + 1
                else:
                    last = mid - 1
            if solved is None:
                continue
            keep, config, found = solved
            fidelity, _ = curve.between(lo, keep)
            if fidelity > floor:
                best, floor = (setting_name(config, num_layers), lambda c=config: c, found[1], found[2]), fidelity
        return best
