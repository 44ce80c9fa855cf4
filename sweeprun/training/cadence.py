"""The automatic save interval (``every_s="auto"``): Young/Daly from measured costs.

Saving often wastes the time each save blocks training; saving rarely wastes the work
done since the last save when the machine goes away. With saves that block for ``C``
seconds and interruptions ``M`` seconds apart on average, the interval that wastes
least is about ``sqrt(2 * C * M)`` (Young 1974; Daly 2006), as long as ``C`` is small
next to ``M``, which it is here by orders of magnitude.

``C`` is what a save costs the training thread (with asynchronous saves, the snapshot
and any wait for the previous write, not the write itself), smoothed over the last
saves. ``M`` comes from ``SWEEPRUN_MTBI_S``, which the launcher sets from its ledger's
attempts (:meth:`sweeprun.ledger.Ledger.uptime`); without it, a prior of
:data:`PRIOR_MTBI_S` (6 h: a spot/preemptible GPU or a free notebook session lasts
hours, not minutes or weeks). The result is kept within the user's bounds.

Pure arithmetic and one stderr line; the clock belongs to the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..runenv import MTBI as MTBI_ENV
from ..runenv import PRIOR_MTBI_S

__all__ = ["MTBI_ENV", "PRIOR_MTBI_S", "AutoInterval"]

#: Smoothing of the measured save cost: the newest save counts for this much.
COST_WEIGHT = 0.3
#: A change of the interval by more than this fraction is logged.
LOG_CHANGE = 0.25


@dataclass
class AutoInterval:
    """The interval between saves, recomputed after each measured save."""

    min_s: float = 30.0
    max_s: float = 3600.0
    mtbi_s: float = PRIOR_MTBI_S
    mtbi_measured: bool = False
    cost_s: float | None = None
    """Smoothed stall of a save; ``None`` until the first save (then :attr:`min_s` applies,
    so the first save comes early and measures the cost)."""
    logged_s: float | None = None

    def __post_init__(self) -> None:
        if not (0 < self.min_s <= self.max_s and math.isfinite(self.max_s)):
            raise ValueError(f"min_every_s and max_every_s must satisfy 0 < min <= max, "
                             f"got {self.min_s!r} and {self.max_s!r}")

    @property
    def interval_s(self) -> float:
        if self.cost_s is None:
            return self.min_s
        return min(self.max_s, max(self.min_s, self.optimum_s))

    @property
    def optimum_s(self) -> float:
        """Young/Daly's interval, before the bounds."""
        return math.sqrt(2.0 * (self.cost_s or 0.0) * self.mtbi_s)

    def observe(self, cost_s: float) -> str | None:
        """Take the stall of one save; a line saying the new interval and why when it moved
        by more than :data:`LOG_CHANGE` since the last one said."""
        cost_s = max(0.0, cost_s)
        self.cost_s = cost_s if self.cost_s is None else (
            COST_WEIGHT * cost_s + (1 - COST_WEIGHT) * self.cost_s)
        interval = self.interval_s
        if self.logged_s is not None and abs(interval - self.logged_s) <= LOG_CHANGE * self.logged_s:
            return None
        self.logged_s = interval
        return self.explain()

    def explain(self) -> str:
        source = (f"{MTBI_ENV}" if self.mtbi_measured
                  else f"prior; {MTBI_ENV} is unset")
        bound = ""
        if self.optimum_s < self.min_s:
            bound = f", raised to min_every_s={self.min_s:g}"
        elif self.optimum_s > self.max_s:
            bound = f", lowered to max_every_s={self.max_s:g}"
        return (f"checkpoint interval {self.interval_s:.0f} s: sqrt(2 x save stall "
                f"{self.cost_s or 0.0:.3g} s x mean time between interruptions "
                f"{_hours(self.mtbi_s)} ({source})) = {self.optimum_s:.0f} s{bound}")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds:.0f} s"
