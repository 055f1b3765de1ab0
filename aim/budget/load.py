"""Load correction for latency budgets (`aim.budget.select` uses it to choose a setting).

After each budgeted prefill, the ratio measured / predicted seconds enters an exponential moving
average. The factor the choice uses moves to that average only when it leaves a dead band around
the factor in use (hysteresis), so aim moves to cheaper points when the machine is shared and back
when the load ends, without flapping on noise. A slowdown is followed faster than a speed-up (a
deadline cannot wait): when two calls in a row measure ratios beyond the band and beyond the
measured noise (its 90% quantile), the factor moves to their geometric mean at once, where the
moving average would take several calls (and, once the factor had moved part of the way, leave
the rest to the margin below). One call far beyond it (`jump` times the factor, beyond the
noise's 99% quantile, so that a rare tail of steady noise does not move it) moves it to that
call's ratio at once. It was meant for the request after a load arrives; measured, it did not
save those (the first seconds of a load are the heaviest, where even the cheapest setting
misses), but the factor then comes down from the onset's level through the dead band, and the
rest of the load missed about half as often (README, "Latency budgets under contention"). The
price: one isolated outlier (a pause of the process) also moves the factor, and cheaper settings
run for the few calls the moving average takes to bring it back. The first few measured ratios
replace the 1.0 prior outright (their plain mean is the factor): the profile's latency model was
fitted on the machine (and at the moment) of calibration, and the first calls tell how fast this
one is.

A latency budget holds for a quantile of prefills (default 0.9): the typical (load-corrected)
prediction is raised by a margin, the log-normal quantile of the measured spread of the ratio,
estimated from successive differences so that a change of load counts once, not as lasting noise,
times the slowdown the typical ratio shows beyond the factor in use (inside the dead band). When
the factor moves down (the load ended), the typical ratio, a slower moving mean, is brought down
with it: lagging above the new factor it read as a slowdown and raised the margin by 1.2-1.6x
over the 15 calls after a 4.5x load (simulated, 12% noise).
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
            geometric mean at once (a slowdown); 0 turns this off.
        jump: one call whose ratio passes ``factor * jump`` times the noise quantile
            `jump_quantile` of the spread moves the factor to its ratio at once (a slowdown too
            large to wait for a second call); 0 turns this off. With both off, the moving average
            alone follows a slowdown.
    """

    def __init__(self, alpha: float = 0.3, band: float = 0.25, warmup: int = 5, spread_alpha: float = 0.1,
                 confirm: int = 2, attack_quantile: float = 0.9, jump: float = 1.5,
                 jump_quantile: float = 0.99) -> None:
        if jump != 0 and not jump > 1 + band:
            raise ValueError(f"a one-call jump must need a larger slowdown than the dead band's 1 + band = "
                             f"{1 + band:g}, got jump={jump!r} (0 turns it off)")
        if not 0.5 < jump_quantile < 1.0:
            raise ValueError(f"jump_quantile is the noise quantile a one-call jump must pass, in (0.5, 1), "
                             f"got {jump_quantile!r}")
        self.alpha, self.band, self.warmup, self.spread_alpha = alpha, band, warmup, spread_alpha
        self.confirm, self.attack_z = confirm, NormalDist().inv_cdf(attack_quantile)
        self.jump, self.jump_z = jump, NormalDist().inv_cdf(jump_quantile)
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
        if not (predicted > 0 and measured > 0 and math.isfinite(measured / predicted)):
            return  # (also NaN and inf: one would hold the factor there for good)
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
            # the attack thresholds: the factor in use and the noise measured before this call (a
            # step of load enters the spread once, as one large successive difference)
            deviation = math.sqrt(self.spread)
            threshold = math.log(self.factor * (1 + self.band)) + self.attack_z * deviation
            far = bool(self.jump) and log > math.log(self.factor * self.jump) + self.jump_z * deviation
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
            # a far call moves the factor to its own ratio, also when a milder slow call came before it
            attack = max(math.exp(sum(self._above) / len(self._above)) if confirmed else 0.0, ratio if far else 0.0)
            if attack > self.factor:
                # a slowdown several calls in a row confirm, or one call far beyond the factor:
                # follow it now, not over the average's lag
                self.factor = self.average = attack
                self._above = []
            elif not self.factor / (1 + self.band) <= self.average <= self.factor * (1 + self.band):
                if self.average < self.factor:
                    # a speed-up: a slowdown starts counting again, and the typical ratio (a slower
                    # moving mean) lagging above the new factor would read as a slowdown in the margin
                    self._above = []
                    self.level = min(self.level, math.log(self.average))
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
