"""Choosing a setting for one request, and correcting latency predictions under load.

For each prefill the engine describes the input by its token counts (`input_spec`), predicts the
cost of every frontier point *for that input* (FLOPs fraction from the FLOPs model; seconds from
the profile's latency model times the load correction), and runs the most faithful point whose
prediction fits the budget, or a merge keep fraction between two calibrated ones of a family when
its interpolated fidelity is higher (`aim.budget.curves`). Below the cheapest point: a clear
error, never a silent overrun.

Load correction (`LoadTracker`): after each budgeted prefill, the ratio measured / predicted
seconds enters an exponential moving average. The factor the choice uses moves to that average
only when it leaves a dead band around the factor in use (hysteresis), so aim moves to cheaper
points when the machine is shared and back when the load ends, without flapping on noise. A
slowdown is followed faster than a speed-up (a deadline cannot wait): when two calls in a row
measure ratios beyond the band and beyond the measured noise (its 90% quantile), the factor moves
to their geometric mean at once, where the moving average would take several calls (and, once the
factor had moved part of the way, leave the rest to the margin below). The
first few measured ratios replace the 1.0 prior outright (their plain mean is the factor): the
profile's latency model was fitted on the machine (and at the moment) of calibration, and the
first calls tell how fast this one is.

A latency budget holds for a quantile of prefills (default 0.9): the typical (load-corrected)
prediction is raised by a margin, the log-normal quantile of the measured spread of the ratio,
estimated from successive differences so that a change of load counts once, not as lasting noise,
times the slowdown the moving average shows beyond the factor in use (inside the dead band).

Until the first measurement, a latency budget below the cheapest point's prediction runs the
cheapest point as a best effort with a warning (the prediction is not yet checked on this
machine). After it, such a budget runs the cheapest as a best effort when its typical time on
the quiet machine (the lowest load factor measured, no margin) fits, and is refused when even
that does not fit.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

from ..config import AIMConfig
from ..flops import InputSpec, ModelSpec
from ..flops.cost import estimate
from .curves import KEEP_STEP, keep_curves
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


class LoadTracker:
    """Moving average of measured / predicted prefill seconds, with hysteresis, and the spread of
    that ratio (module docstring).

    Args:
        alpha: weight of the newest ratio in the moving average.
        band: relative dead band: the factor in use changes only when the average leaves
            ``[factor / (1 + band), factor * (1 + band)]``.
        warmup: the first `warmup` ratios set the factor to their plain mean (no prior, no band).
        spread_alpha: weight of the newest half squared successive difference of log ratios in
            the spread (slower than the average, so a latency quantile's margin does not swing
            with each call).
        confirm: successive calls whose ratios must all pass ``factor * (1 + band)`` times the
            noise quantile `attack_quantile` of the spread for the factor to move to their
            geometric mean at once (a slowdown); 0 turns this off (the moving average alone).
    """

    def __init__(self, alpha: float = 0.3, band: float = 0.25, warmup: int = 5, spread_alpha: float = 0.1,
                 confirm: int = 2, attack_quantile: float = 0.9) -> None:
        self.alpha, self.band, self.warmup, self.spread_alpha = alpha, band, warmup, spread_alpha
        self.confirm, self.attack_z = confirm, NormalDist().inv_cdf(attack_quantile)
        self._above: list[float] = []  # log ratios of the latest calls in a row beyond the attack threshold
        self.average = 1.0
        self.factor = 1.0
        self.quietest = 1.0  # the lowest factor measured: this machine's speed when quiet
        self.spread = 0.0  # variance of log(ratio) from successive differences: how much prefill times vary
        self.level = 0.0  # moving mean of log(ratio) (weight spread_alpha): the typical ratio, less noisy than `average`
        self.observations = 0
        self._warmup_logs: list[float] = []  # log ratios of the warmup calls
        self._last_log: float | None = None  # log ratio of the latest call
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
                logs = self._warmup_logs
                logs.append(math.log(ratio))
                steps = [(b - a) ** 2 / 2 for a, b in zip(logs, logs[1:])]
                self.spread = sum(steps) / len(steps) if steps else 0.0
                self._last_log = logs[-1]
                self.level = sum(logs) / len(logs)
                return
            log = math.log(ratio)
            # the attack threshold: the factor in use and the noise measured before this call (a
            # step of load enters the spread once, as one large successive difference)
            threshold = math.log(self.factor * (1 + self.band)) + self.attack_z * math.sqrt(self.spread)
            self._above = self._above + [log] if self.confirm and log > threshold else []
            self.average = (1 - self.alpha) * self.average + self.alpha * ratio
            # successive differences (von Neumann): a change of load is one large step, not a long
            # run of deviations from a lagging average; for independent noise E[step^2] = 2 var
            if self._last_log is not None:
                step = log - self._last_log
                self.spread = (1 - self.spread_alpha) * self.spread + self.spread_alpha * step * step / 2
            self._last_log = log
            self.level = (1 - self.spread_alpha) * self.level + self.spread_alpha * log
            confirmed = self.confirm and len(self._above) >= self.confirm
            attack = math.exp(sum(self._above) / len(self._above)) if confirmed else 0.0
            if attack > self.factor:
                # a slowdown several calls in a row confirm: follow it now, not over the average's lag
                self.factor = self.average = attack
                self._above = []
            elif not self.factor / (1 + self.band) <= self.average <= self.factor * (1 + self.band):
                if self.average < self.factor:
                    self._above = []  # a speed-up: a slowdown starts counting again
                self.factor = self.average
                self.quietest = min(self.quietest, self.factor)

    def margin(self, quantile: float) -> float:
        """How much a prediction (load factor included) is raised so that `quantile` of prefills
        fit: the log-normal quantile of the measured spread, times how much slower the typical
        ratio (`level`) is than the factor in use when it is, i.e. a slowdown still inside the dead band
        counts at once (a deadline cannot wait for the band to be left; a speed-up still waits).
        1.0 for the median: the typical time, with the band's hysteresis."""
        if quantile <= 0.5:
            return 1.0
        with self._lock:
            drift = max(1.0, math.exp(self.level) / self.factor)
            spread = self.spread
        return drift * math.exp(NormalDist().inv_cdf(quantile) * math.sqrt(spread))


def input_spec(text_tokens: int, groups: list[int], markers: int, video_groups: list[int]) -> InputSpec:
    """An `InputSpec` from one prompt's counts: `groups` are its frame / crop sizes, of which the
    runs in `video_groups` (groups per video) are videos (their groups must come first)."""
    return InputSpec(text_tokens=text_tokens, visual_groups=tuple(groups), marker_tokens=markers, videos=tuple(video_groups))


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


FRAME_KEEPS = (1.0, 0.5, 0.25)  # the fractions of each video's frames a latency budget may encode


def video_prompt_specs(input_ids, attention_mask, image_token: int | None, video_token: int, videos: int, frames: int,
                       markers: int, keeps: tuple[float, ...] = FRAME_KEEPS) -> dict[float, list[InputSpec]] | None:
    """Before the vision tower runs: for each frame fraction of `keeps`, one `InputSpec` per prompt
    of ``(batch, seq)`` `input_ids` as the LLM would see it with that many frames of each of the
    `videos` videos of `frames` frames (`markers` placeholders per video outside its frames).
    A prompt's image placeholders count as one merge group (their crops are not known here): the
    estimate errs on the cheap side, so frames are dropped only when even that does not fit.
    Fractions that keep as many frames as a larger one are left out. None when the placeholders
    do not split into equal videos (the model's own placeholder check then reports the mismatch)."""
    import torch

    from ..counts import kept_frames

    valid = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape == input_ids.shape:
        valid = attention_mask.to(input_ids.device).bool()
    is_video = (input_ids == video_token) & valid
    is_image = (input_ids == image_token) & valid if image_token is not None else torch.zeros_like(valid)
    total = int(is_video.sum())
    if videos < 1 or frames < 1 or total % videos or total // videos <= markers or (total // videos - markers) % frames:
        return None
    per_video = total // videos
    per_frame = (per_video - markers) // frames
    counts = [(int(is_video[row].sum()), int(is_image[row].sum()), int(valid[row].sum())) for row in range(input_ids.shape[0])]
    if any(n_video % per_video for n_video, _, _ in counts):
        return None
    out, seen = {}, set()
    for keep in sorted(keeps, reverse=True):
        kept = len(kept_frames(frames, keep))
        if kept in seen:
            continue
        seen.add(kept)
        out[keep] = [
            input_spec(n_valid - n_video - n_image,
                       [per_frame] * (kept * (n_video // per_video)) + ([n_image] if n_image else []),
                       markers * (n_video // per_video), [kept] * (n_video // per_video))
            for n_video, n_image, n_valid in counts
        ]
    return out


def layout_specs(layout, valid) -> list[InputSpec]:
    """One `InputSpec` per prompt of a chunk, from its visual layout (`aim.layout.VisualLayout`)
    and ``(batch, seq)`` padding mask: text tokens, frame / crop sizes (videos first), markers."""
    placeholders = layout.visual.to(valid.device) & valid
    # frames the vision tower did not encode (frame_keep) never reach the LLM: neither text nor visual
    visual = placeholders & ~layout.dropped.to(valid.device) if layout.dropped is not None else placeholders
    specs = []
    for sample in range(valid.shape[0]):
        groups = layout.groups[sample] if sample < len(layout.groups) else []
        videos = layout.videos[sample] if sample < len(layout.videos) else []
        in_video = [i for video in videos for i in video]
        rest = [i for i in range(len(groups)) if i not in set(in_video)]
        sizes = [int(groups[i].numel()) for i in in_video + rest]
        n_visual = int(visual[sample].sum())
        text = int(valid[sample].sum()) - int(placeholders[sample].sum())
        specs.append(input_spec(text, sizes, n_visual - sum(sizes), [len(v) for v in videos]))
    return specs
