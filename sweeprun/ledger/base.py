"""The ledger contract: who may run what, right now.

The ledger is a coordination index, not the truth: the store says what is done
and what has checkpoints, and :meth:`Ledger.sync` rebuilds the ledger from it.
What the ledger adds is mutual exclusion: a run is claimed by exactly one worker
at a time, under a lease that the worker's heartbeat renews.

Every claim bumps the run's ``attempt`` number, which doubles as a fencing
token: :meth:`heartbeat` and :meth:`finish` only succeed for the current
attempt, so a worker that was paused past its lease (and whose run was taken
over) learns it lost the run and writes nothing.

All methods are safe to call from many threads and processes at once. Losing a
race is not an error: :meth:`claim` returns ``None`` and :meth:`heartbeat` /
:meth:`finish` return ``False`` / ``None``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..identity import RunSpec
from ..procs import ProcessRef


class RunState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # stopped early with a checkpoint; resumes without using an attempt
    FAILED = "failed"            # real failures reached max_attempts
    DONE = "done"


class Outcome(str, enum.Enum):
    """How one attempt ended, as the runner saw it."""

    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


@dataclass(frozen=True)
class Claim:
    """A worker's right to run ``run_id`` as attempt number ``attempt`` until the lease ends."""

    run_id: str
    attempt: int
    params: dict[str, Any]
    worker: ProcessRef
    #: A child left running by a dead holder on this host; the runner kills it before starting.
    orphan: ProcessRef | None = None


@dataclass(frozen=True)
class RunRow:
    """What the ledger knows of one run, for status and for the launcher's exit code."""

    run_id: str
    index: int
    params: dict[str, Any]
    state: RunState
    attempts: int        # how many times the run was started
    failures: int        # real failures among them (preemptions do not count)
    worker: str | None   # host:pid of the holder while running
    heartbeat_at: float | None
    lease_until: float | None
    last_exit: int | None
    updated_at: float


class Ledger(ABC):
    """One sweep's coordination state. Backends: :class:`~sweeprun.ledger.sqlite.SqliteLedger`."""

    @abstractmethod
    def sync(self, runs: Iterable[RunSpec], done: set[str], started: set[str]) -> None:
        """Make the ledger agree with the store.

        Adds missing runs (``interrupted`` if ``started``, i.e. they have files
        in the store, else ``pending``), marks runs in ``done`` as done, and
        puts a run the ledger thinks done but whose ``DONE`` is gone back to
        ``pending`` (deleting a run's folder is how a user asks for a re-run).
        Runs held under a live lease are left alone.
        """

    @abstractmethod
    def claim(self, worker: ProcessRef, max_attempts: int, lease_s: float) -> Claim | None:
        """Atomically take the next runnable run, or return ``None`` if there is none.

        Runnable: ``pending`` or ``interrupted``; ``failed`` runs with fewer
        failures than ``max_attempts`` (so raising it re-opens them); and
        ``running`` runs whose lease expired or whose holder on this host is
        gone. Interrupted runs come first (their checkpoints hold work), then
        grid order.
        """

    @abstractmethod
    def heartbeat(self, claim: Claim, lease_s: float, child: ProcessRef | None = None) -> bool:
        """Extend the lease; ``False`` means the run was taken over and the caller must stop."""

    @abstractmethod
    def finish(self, claim: Claim, outcome: Outcome, max_attempts: int,
               exit_code: int | None = None) -> RunState | None:
        """Record how the attempt ended and return the run's new state.

        Returns ``None`` (and changes nothing) when ``claim`` is no longer the
        current attempt. A failure counts toward ``max_attempts``; an
        interruption does not.
        """

    @abstractmethod
    def rows(self) -> list[RunRow]:
        """Every run of the sweep, in grid order."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the ledger may not be used afterwards."""
