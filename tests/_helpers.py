"""Small helpers shared by tests of every area (no torch here: any test file may import this)."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock that moves only when the test says so: time-driven behaviour
    (cadence, time budgets, lease expiry) is tested without sleeping and without asserting
    anything about wall time. ``offset_s`` plays a machine whose clock is off."""

    def __init__(self, offset_s: float = 0.0) -> None:
        self.now = 1000.0 + offset_s

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
