"""Merge keep fractions between the calibrated ones: each family of settings as a curve.

Calibration measures every setting at a grid of merge keep fractions (`space.MERGE_KEEPS`). A
budget that falls between two of them would run the cheaper and leave the rest unspent: at a 75%
FLOPs budget the study model's nearest calibrated point below ran at 58%, while merging alone
tuned to the budget (the fixed baseline) spends 73%. Within one family (the setting apart from its
keep fraction) cost grows with the keep fraction and fidelity is monotone in it
(`monotone_fidelity`), so a family is a curve: per request, the selector solves the largest keep
fraction on a `KEEP_STEP` grid whose predicted cost fits, and estimates its fidelity by linear
interpolation between its two calibrated neighbours (agreement and KL each), across gaps of at most `MAX_GAP`. The unchanged model
ends the curve of the family that is the identity at keep 1.0 (merging alone). An interpolated
setting runs only when its estimate is strictly above the most faithful frontier point that fits
and every calibrated member of a curve that fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AIMConfig
from .profile import Fidelity, Point, Profile, keep_families, monotone_fidelity

KEEP_STEP = 0.001  # the grid of solved keep fractions (readable names, repeatable predictions)
# the widest gap between calibrated keep fractions that is interpolated across (the widest of the
# default grid, 0.8 to the unchanged model): across a wider one (the pooling baseline's 0.25 to 1.0)
# a straight line says little about the fidelity in between
MAX_GAP = 0.2


@dataclass(frozen=True)
class Member:
    """A calibrated point of a curve: its keep fraction and pooled (monotone) fidelity."""

    keep: float
    point: Point
    fidelity: Fidelity


@dataclass(frozen=True)
class KeepCurve:
    """One family's calibrated points, by increasing keep fraction (at least two distinct)."""

    members: tuple[Member, ...]
    base: AIMConfig  # a member's config with merging (keep < 1): the family's other knobs

    def config(self, keep: float) -> AIMConfig:
        """The family's setting at merge keep fraction `keep` (< 1)."""
        return self.base.replace(merge_keep=keep)

    def between(self, lower: int, keep: float) -> tuple[Fidelity, float]:
        """``(fidelity, latency scale)`` at `keep`, interpolated linearly between members `lower`
        and ``lower + 1``."""
        lo, hi = self.members[lower], self.members[lower + 1]
        t = (keep - lo.keep) / (hi.keep - lo.keep)
        fidelity = Fidelity(*(a + (b - a) * t for a, b in zip(lo.fidelity, hi.fidelity)))
        if hi.keep < 1.0:
            scale = lo.point.latency_scale + (hi.point.latency_scale - lo.point.latency_scale) * t
        else:  # any keep below 1 runs the merge stage, which a member without merging does not time
            scale = lo.point.latency_scale
        return fidelity, scale

    def spans(self, lower: int) -> bool:
        """Whether keep fractions between members `lower` and ``lower + 1`` may be interpolated."""
        return self.members[lower + 1].keep - self.members[lower].keep <= MAX_GAP + 1e-9


def keep_curves(profile: Profile, num_layers: int) -> list[KeepCurve]:
    """The families of `profile` with at least two distinct calibrated keep fractions."""
    fidelity = monotone_fidelity(profile.points)
    unchanged = next((p for p in profile.points if not p.config.get("enabled", True)), None)
    curves = []
    for family in keep_families(profile.points):
        members: list[Member] = []
        for keep, point in family:
            if not point.config.get("enabled", True):
                continue  # a family of its own (its stored schedule is not applied): ends merging's curve below
            if members and members[-1].keep == keep:
                continue  # equal keep fractions (other schedules): nothing to interpolate between
            members.append(Member(keep, point, fidelity[point.name]))
        merging = [m for m in members if m.keep < 1.0]
        if not merging:
            continue
        base = merging[0].point.aim_config()
        if unchanged is not None and members[-1].keep < 1.0 and base.replace(merge_schedule=()).is_identity(num_layers):
            members.append(Member(1.0, unchanged, fidelity[unchanged.name]))
        if len(members) >= 2:
            curves.append(KeepCurve(tuple(members), base))
    return curves
