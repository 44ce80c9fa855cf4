"""GPU packing: which of ``--gpus`` a run takes, all or nothing, without starving the big runs.

A pure class (no threads, no clock, no I/O) so its rules are tested on their own; the
launcher holds it under a lock and waits on its answers.

The rules, in the order they are applied:

* a run of ``n`` processes takes ``n`` distinct indices at once, or none: a 2-process run
  given one GPU would fail or share it;
* no index is held by two runs at once;
* a run that asked and could not be served waits in line (first come, first served), and
  the oldest in line is protected: another run is served only if what it takes still leaves
  enough free indices for that oldest one. Free indices then only accumulate toward the
  waiting run's need as the runs on the others end, so a 4-GPU run is served after at most
  the runs that held GPUs when it asked, never behind an endless stream of 1-GPU runs.
  Smaller runs still fill what the waiting one cannot use (backfilling).
"""

from __future__ import annotations

from collections.abc import Sequence


class GpuPool:
    """The GPU indices of one launcher (``--gpus``), lent to runs by key (a run id)."""

    def __init__(self, indices: Sequence[str]) -> None:
        if len(set(indices)) != len(indices) or not indices:
            raise ValueError(f"GPU indices must be distinct and at least one: {list(indices)}")
        self.indices = tuple(indices)
        self._free = list(indices)
        self._held: dict[str, tuple[str, ...]] = {}
        self._waiting: dict[str, int] = {}  # key -> GPUs needed, oldest first

    @property
    def free(self) -> tuple[str, ...]:
        return tuple(self._free)

    def held(self) -> dict[str, tuple[str, ...]]:
        return dict(self._held)

    def waiting(self) -> list[str]:
        return list(self._waiting)

    def admits(self, n: int) -> bool:
        """Would a new run of ``n`` GPUs be served now? (What a launcher asks before it claims
        a run: one that would only wait is left for later.)"""
        return self._grantable(None, n)

    def take(self, key: str, n: int) -> tuple[str, ...] | None:
        """``n`` indices for ``key``, or ``None`` and ``key`` waits in line (ask again when
        :meth:`give_back` freed some). Asking again keeps the place in line."""
        if not 1 <= n <= len(self.indices):
            raise ValueError(f"{key} needs {n} GPUs; this launcher has {len(self.indices)}")
        if key in self._held:
            raise ValueError(f"{key} holds GPUs {','.join(self._held[key])} already")
        if not self._grantable(key, n):
            self._waiting.setdefault(key, n)
            return None
        self._waiting.pop(key, None)
        got, self._free = tuple(self._free[:n]), self._free[n:]
        self._held[key] = got
        return got

    def give_back(self, key: str) -> None:
        """``key``'s run ended: its indices are free (in the order ``--gpus`` gave them)."""
        got = self._held.pop(key, ())
        order = {g: i for i, g in enumerate(self.indices)}
        self._free = sorted([*self._free, *got], key=order.__getitem__)

    def withdraw(self, key: str) -> None:
        """``key`` stops waiting (its launcher is stopping, or it lost the run)."""
        self._waiting.pop(key, None)

    def _grantable(self, key: str | None, n: int) -> bool:
        if len(self._free) < n:
            return False
        head = next(iter(self._waiting), None)
        if head is None or head == key:
            return True
        return len(self._free) - n >= self._waiting[head]
