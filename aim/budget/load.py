"""Load correction for latency budgets (`aim.budget.select` uses it to choose a setting).

After each budgeted prefill, the ratio measured / predicted seconds enters an exponential moving
average. The factor the choice uses moves to that average only when it leaves a dead band around
the factor in use (hysteresis), so aim moves to cheaper points when the machine is shared and back
when the load ends, without flapping on noise. A change of load is followed faster than the
moving average would: when two calls in a row measure ratios beyond the band and beyond the
measured noise (its 90% quantile), the factor moves to their geometric mean at once, up (a
slowdown: a deadline cannot wait; once the factor had moved part of the way, the margin below
covers the rest) or down (the load ended: each call run cheaper than needed costs accuracy). The
first few measured ratios replace the 1.0 prior outright (their plain mean is the factor): the
profile's latency model was fitted on the machine (and at the moment) of calibration, and the
first calls tell how fast this one is.

A latency budget holds for a quantile of prefills (default 0.9): the typical (load-corrected)
prediction is raised by a margin, the log-normal quantile of the measured spread of the ratio,
times the slowdown the typical ratio shows beyond the factor in use (inside the dead band). The
spread is estimated from successive differences, so that a change of load counts once, not as
lasting noise, and as a bounded outlier (at most three of the spread's standard deviations): a
step from 4.5x load back to quiet, counted in full, held the margin near 2x for a dozen calls.
"""

from __future__ import annotations

import math
import threading
from statistics import NormalDist


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
        release: the same for a speed-up: successive calls whose ratios are all below
            ``factor / (1 + band)`` divided by that noise quantile move the factor down to their
            geometric mean at once (the load has ended); 0: a speed-up waits for the moving average.
        outlier: a successive difference enters the spread as at most this many of the spread's
            standard deviations (at least `SPREAD_FLOOR`'s): a change of load is one such step,
            and counted in full it would hold the margin high for dozens of calls after the load
            ended (a spread weight of 0.1 forgets a step in ~20 calls). None: counted in full.
    """

    SPREAD_FLOOR = 0.05 ** 2  # a successive difference of 5% (in log ratio) always counts in full

    def __init__(self, alpha: float = 0.3, band: float = 0.25, warmup: int = 5, spread_alpha: float = 0.1,
                 confirm: int = 2, attack_quantile: float = 0.9, release: int = 2,
                 outlier: float | None = 3.0) -> None:
        self.alpha, self.band, self.warmup, self.spread_alpha = alpha, band, warmup, spread_alpha
        self.confirm, self.release, self.attack_z = confirm, release, NormalDist().inv_cdf(attack_quantile)
        self.outlier = outlier
        self._above: list[float] = []  # log ratios of the latest calls in a row beyond the attack threshold
        self._below: list[float] = []  # ... and below the release threshold
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
            # the attack and release thresholds: the factor in use and the noise measured before
            # this call (a step of load enters the spread once, as one bounded successive difference)
            noise = self.attack_z * math.sqrt(self.spread)
            above = log > math.log(self.factor * (1 + self.band)) + noise
            below = log < math.log(self.factor / (1 + self.band)) - noise
            self._above = self._above + [log] if self.confirm and above else []
            self._below = self._below + [log] if self.release and below else []
            self.average = (1 - self.alpha) * self.average + self.alpha * ratio
            # successive differences (von Neumann): a change of load is one large step, not a long
            # run of deviations from a lagging average; for independent noise E[step^2] = 2 var
            if self._last_log is not None:
                half_square = (log - self._last_log) ** 2 / 2
                if self.outlier is not None:
                    half_square = min(half_square, max(self.outlier ** 2 * self.spread, self.SPREAD_FLOOR))
                self.spread = (1 - self.spread_alpha) * self.spread + self.spread_alpha * half_square
            self._last_log = log
            self.level = (1 - self.spread_alpha) * self.level + self.spread_alpha * log
            attack = self._confirmed(self._above, self.confirm)
            release = self._confirmed(self._below, self.release)
            if attack > self.factor:
                # a slowdown several calls in a row confirm: follow it now, not over the average's lag
                self.factor = self.average = attack
                self._above = []
            elif 0.0 < release < self.factor:
                # the load ended, several calls in a row confirm: come back now
                self._move_down(release)
                self._below = []
            elif not self.factor / (1 + self.band) <= self.average <= self.factor * (1 + self.band):
                if self.average < self.factor:
                    self._move_down(self.average)
                else:
                    self.factor = self.average

    @staticmethod
    def _confirmed(logs: list[float], calls: int) -> float:
        """The geometric mean of `logs` (ratios) when `calls` of them in a row confirm a change, else 0."""
        return math.exp(sum(logs) / len(logs)) if calls and len(logs) >= calls else 0.0

    def _move_down(self, factor: float) -> None:
        """A speed-up to `factor`: a slowdown starts counting again, and the typical ratio, which lags
        behind (weight spread_alpha), is at most the new factor (else the margin would read the lag as
        a slowdown inside the band)."""
        self.factor = self.average = factor
        self._above = []
        self.level = min(self.level, math.log(factor))
        self.quietest = min(self.quietest, factor)

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
