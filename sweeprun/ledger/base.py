"""The ledger contract: who may run what, right now, and the one definition of a run's state.

The ledger is a coordination index, not the truth: the store says what is done
and what has checkpoints, and :meth:`Ledger.sync` rebuilds the ledger from it.
What the ledger adds is mutual exclusion: a run is claimed by exactly one worker
at a time, under a lease that the worker's heartbeat renews.

Every claim bumps the run's ``attempt`` number, which doubles as a fencing
token: :meth:`Ledger.heartbeat`, :meth:`Ledger.start` and :meth:`Ledger.finish`
only succeed for the current attempt, so a worker that was paused past its lease
(and whose run was taken over) learns it lost the run and writes nothing.

"Runnable", "held" and "settled" are decided in exactly one place,
:func:`judge`, which the claim, the launcher's "is the sweep over" check and
``status`` all use: when they disagreed, a launcher could wait forever for a run
that no claim would ever take.

All methods are safe to call from many threads and processes at once. Losing a
race is not an error: :meth:`Ledger.claim` returns ``None`` and the others
return ``False`` / ``None``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..errors import LedgerError
from ..identity import RunSpec
from ..numbers import worker_pid
from ..procs import ProcessRef
from ..resumes import Resume
from ..rollbacks import RollbackSummary

#: Consecutive attempts lost with their worker (no exit code: the machine died) without a
#: new checkpoint before the run is marked failed. Preemptions that save do not count.
DEFAULT_MAX_LOST = 5


class RunState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # stopped early with a checkpoint; resumes without using an attempt
    FAILED = "failed"            # real failures reached max_attempts (or lost attempts max_lost)
    DONE = "done"
    DIVERGED = "diverged"        # its loss spiked after its last allowed rollback; run again only after reset


class Outcome(str, enum.Enum):
    """How one attempt ended, as the runner saw it."""

    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"  # a loss spike: it goes on at once from an earlier checkpoint
    DIVERGED = "diverged"        # a loss spike past the rollbacks allowed
    OOM = "oom"                  # out of accelerator memory (its step in attempts/<n>.oom)


class Verdict(str, enum.Enum):
    """What a worker may do with a run now: the single answer every caller uses."""

    RUNNABLE = "runnable"    # may be claimed
    HELD = "held"            # a live worker holds it under a lease
    FINISHED = "finished"    # done
    EXHAUSTED = "exhausted"  # failed for good: failures or lost attempts reached their limit


@dataclass(frozen=True)
class Policy:
    """The limits a launcher applies; they come from the sweep file and flags, not the ledger."""

    max_attempts: int = 3
    max_lost: int = DEFAULT_MAX_LOST
    #: Attempts that ran out of memory the run may retry (with SWEEPRUN_OOM_RETRY set, and the
    #: sweep file's ``on_oom: halve:`` parameters halved); past them an OOM fails it for good.
    oom_retries: int = 0


#: What :meth:`Ledger.uptime` asks of the attempts table (``%s``: now, then the sweep), in
#: SQL both backends speak. A lost attempt is closed by the claim that takes it over, so its
#: time runs to that claim: an upper bound, by at most a lease.
_UPTIME_SQL = ("SELECT SUM(COALESCE(ended_at, %s) - started_at), "
               "SUM(CASE WHEN outcome IN ('interrupted', 'lost') THEN 1 ELSE 0 END) "
               "FROM attempts WHERE sweep = %s AND started_at IS NOT NULL")


#: The columns of :class:`AttemptRow`, in its order, as both backends' attempts tables name them.
_ATTEMPT_COLUMNS = "attempt, worker, started_at, ended_at, outcome, exit_code"


@dataclass(frozen=True)
class Uptime:
    """The sweep's running time and its interruptions, from every attempt the ledger knows."""

    running_s: float     # attempts' time from start to end (or to now, for those running)
    interruptions: int   # attempts that ended interrupted (a preemption notice) or lost

    def mtbi_s(self, prior_s: float) -> float:
        """Mean time between interruptions, shrunk toward ``prior_s`` while evidence is thin:
        ``(running + prior) / (interruptions + 1)``, the prior counting as one interruption
        after ``prior_s`` of running. No interruption in a minute of running says little;
        ten in ten hours say an hour."""
        return (self.running_s + prior_s) / (self.interruptions + 1)


@dataclass(frozen=True)
class Claim:
    """A worker's right to run ``run_id`` as attempt number ``attempt`` until the lease ends."""

    run_id: str
    attempt: int
    params: dict[str, Any]
    worker: ProcessRef
    #: A child left running by a dead holder on this host; the runner kills it before starting.
    orphan: ProcessRef | None = None
    #: The previous attempt was lost with its worker (not ended by one).
    took_over: bool = False


@dataclass(frozen=True)
class RunRow:
    """What the ledger knows of one run, for status and for the launcher's exit code."""

    run_id: str
    index: int
    params: dict[str, Any]
    state: RunState
    attempts: int        # how many times the run was started (the fencing token)
    failures: int        # real failures among them (preemptions do not count)
    worker: str | None   # host:pid of the holder while running
    heartbeat_at: float | None
    lease_until: float | None
    last_exit: int | None
    updated_at: float
    lost: int = 0        # consecutive attempts lost with their worker, without checkpoint progress
    worker_start: int | None = None  # the holder's process start time, to tell a reused pid
    #: The newest checkpoint when the current attempt started: a lost attempt that leaves it
    #: unchanged counts toward ``max_lost`` (:func:`~sweeprun.ledger.transitions.started`).
    progress: str | None = None
    child_pid: int | None = None     # the holder's child, to kill it if the holder died
    child_start: int | None = None
    #: The run's latest resume at another world size (RNG and data position approximate), as
    #: an ended attempt reported it; kept by later exact resumes (see
    #: :func:`~sweeprun.ledger.transitions.resume_after`). ``None``: none known, or unreadable.
    resumed: Resume | None = None
    #: The run's loss-spike rollbacks as its attempts reported them (:mod:`sweeprun.rollbacks`).
    rollbacks: RollbackSummary | None = None

    @property
    def holder(self) -> ProcessRef | None:
        if not self.worker:
            return None
        host, pid = worker_pid(self.worker)  # a row edited by hand may hold '²' or 10**30
        return ProcessRef(host, pid, self.worker_start) if pid is not None else None


@dataclass(frozen=True)
class AttemptRow:
    """One start of a run as the ledger recorded it (``sweeprun show``)."""

    attempt: int
    worker: str | None          # host:pid of the launcher that ran it
    started_at: float | None    # ledger time
    ended_at: float | None      # None while it runs, or when its worker vanished unnoticed
    #: How it ended: done, interrupted, failed, lost (its worker died; closed by the claim
    #: that took the run over) or lost-limit; None while it runs.
    outcome: str | None
    exit_code: int | None


#: The columns of a backend's ``runs`` table that :func:`decode_row` reads, in its order.
RUN_COLUMNS = ("run_id", "idx", "params", "state", "attempts", "failures", "lost", "progress",
               "worker", "worker_start", "child_pid", "child_start", "lease_until", "heartbeat_at",
               "last_exit", "updated_at", "resumed", "rollbacks")
#: The columns a transition may change (never the run's identity, index or params): what a
#: backend writes back for a :class:`Change`.
MUTABLE_COLUMNS = RUN_COLUMNS[3:]


def grouped_attempts(found: Iterable[tuple[Any, ...]]) -> dict[str, list[AttemptRow]]:
    """``(run_id, *attempt columns)`` rows, ordered by run and attempt, as :meth:`Ledger.every_attempt` returns them."""
    out: dict[str, list[AttemptRow]] = {}
    for run_id, *columns in found:
        out.setdefault(run_id, []).append(AttemptRow(*columns))
    return out


def decode_row(r: tuple[Any, ...], where: str, remedy: str) -> RunRow:
    """A row of a backend's ``runs`` table, in :data:`RUN_COLUMNS` order.

    A damaged row is a one-line :class:`LedgerError` naming ``where`` (the ledger) and
    ``remedy`` (how to rebuild it from the store).
    """
    (run_id, idx, params, state, attempts, failures, lost, progress, worker, worker_start,
     child_pid, child_start, lease_until, heartbeat_at, last_exit, updated_at, resumed, rollbacks) = r
    try:
        run_state = RunState(state)
    except ValueError:
        raise LedgerError(f"ledger {where}: run {run_id} has an unknown state {state!r}; "
                          f"{remedy}") from None
    try:
        decoded = json.loads(params)
        if not isinstance(decoded, dict):
            raise ValueError("not an object")
    except (TypeError, ValueError):
        raise LedgerError(f"ledger {where}: run {run_id} has unreadable params; {remedy}") from None
    return RunRow(run_id=run_id, index=idx or 0, params=decoded, state=run_state,
                  attempts=attempts or 0, failures=failures or 0, worker=worker,
                  heartbeat_at=heartbeat_at, lease_until=lease_until, last_exit=last_exit,
                  updated_at=updated_at or 0.0, lost=lost or 0, worker_start=worker_start,
                  progress=progress, child_pid=child_pid, child_start=child_start,
                  resumed=Resume.from_json(resumed),  # only shown: a damaged one reads as none
                  rollbacks=RollbackSummary.from_json(rollbacks))


def mutable_values(row: RunRow) -> list[Any]:
    """``row``'s :data:`MUTABLE_COLUMNS`, as a backend stores them."""
    return [row.state.value, row.attempts, row.failures, row.lost, row.progress, row.worker,
            row.worker_start, row.child_pid, row.child_start, row.lease_until, row.heartbeat_at,
            row.last_exit, row.updated_at,
            json.dumps(row.resumed.as_json()) if row.resumed is not None else None,
            json.dumps(row.rollbacks.as_json()) if row.rollbacks is not None else None]


def orphan_of(row: RunRow) -> ProcessRef | None:
    """The child a dead holder of ``row`` may have left running, when it is provably that
    child: only one whose pid AND start time were recorded, and which is alive."""
    holder = row.holder
    if holder is None or not row.child_pid or row.child_start is None:
        return None
    child = ProcessRef(holder.host, row.child_pid, row.child_start)
    return child if child.alive() else None


def judge(row: RunRow, now: float, policy: Policy) -> Verdict:
    """The one definition of what can happen to ``row`` at ledger time ``now``.

    A running run is held while its lease lasts and its holder is alive (a holder
    on this host is checked by pid and start time, so a killed launcher's runs are
    free at once); past that it is abandoned and runnable like an interrupted one,
    unless its failures or lost attempts already reached their limit.
    """
    if row.state is RunState.DONE:
        return Verdict.FINISHED
    if row.state is RunState.DIVERGED:
        return Verdict.EXHAUSTED
    if row.state is RunState.RUNNING and (row.lease_until or 0.0) > now:
        holder = row.holder
        if holder is None or holder.alive():
            return Verdict.HELD
    if row.failures >= policy.max_attempts or row.lost >= policy.max_lost:
        return Verdict.EXHAUSTED
    return Verdict.RUNNABLE


def shown_state(row: RunRow, now: float, policy: Policy) -> RunState:
    """The state a user should see: an abandoned run is interrupted, an exhausted one failed."""
    verdict = judge(row, now, policy)
    if row.state is RunState.DIVERGED:
        return RunState.DIVERGED
    if verdict is Verdict.EXHAUSTED:
        return RunState.FAILED
    if row.state is RunState.RUNNING and verdict is not Verdict.HELD:
        return RunState.INTERRUPTED
    if row.state is RunState.FAILED:
        return RunState.PENDING  # failed before, but the limit allows another try
    return row.state


def settled(rows: Iterable[RunRow], now: float, policy: Policy) -> bool:
    """True when no run can make progress any more: each one finished or exhausted."""
    return all(judge(r, now, policy) in (Verdict.FINISHED, Verdict.EXHAUSTED) for r in rows)


def grid_key(runs: Iterable[RunSpec]) -> str:
    """Names the set of runs one launcher read, so it claims only those.

    Two launchers of one sweep name with different grids (or a grid edited while a
    launcher runs) share the ledger; each claims from its own grid and neither
    removes the other's rows.
    """
    digest = hashlib.sha256()
    for run_id in sorted(run.run_id for run in runs):
        digest.update(run_id.encode() + b"\0")
    return digest.hexdigest()[:16]


def check_lease(lease_s: float) -> float:
    if not (isinstance(lease_s, (int, float)) and math.isfinite(lease_s)):
        raise ValueError(f"lease_s must be a finite number of seconds, got {lease_s!r}")
    return float(lease_s)


class Ledger(ABC):
    """One sweep's coordination state. Backends: :class:`~sweeprun.ledger.sqlite.SqliteLedger`,
    :class:`~sweeprun.ledger.postgres.PostgresLedger`.

    Time is the ledger's own (:meth:`now`): the process clock for SQLite, the server's
    clock for a database server, so that leases never compare two machines' clocks. A
    ``clock`` given to the backend's constructor (or to :func:`~sweeprun.ledger.open_ledger`)
    replaces it: tests move time with it without sleeping.

    Every change to a run is one of :mod:`sweeprun.ledger.transitions`; a backend reads the
    rows, calls it and persists the result in one transaction.
    """

    #: Whether machines that share a store must also take leases in it to stay apart. True
    #: for a ledger only one machine sees (SQLite on local disk): it cannot keep another
    #: machine's workers out. False for one every machine shares, which keeps them apart
    #: itself (PostgreSQL); it then names itself with :meth:`shared`. The launcher decides
    #: from this alone (:class:`sweeprun.fleet.Coordination`), never from the class. True
    #: unless a backend says otherwise: the safe answer for a backend that does not know.
    store_leases: bool = True
    #: The ledger's time in seconds; ``None``: the backend's own (see :meth:`now`).
    clock: Callable[[], float] | None = None
    #: The key of this sweep's rows: one ledger (a database) holds many sweeps. A launcher
    #: opens the ledger first (so a bad ledger writes nothing to the store), then sets it.
    sweep: str

    def now(self) -> float:
        return self.clock() if self.clock is not None else self.own_now()

    def own_now(self) -> float:
        """The backend's own clock, used when no ``clock`` was given: this process's."""
        return time.time()

    def shared(self) -> tuple[str, str, str]:
        """``(backend, id, where)`` of a ledger every machine shares (``store_leases`` False): the
        id is random and held by the database (every URL that reaches it agrees, another
        database differs), ``where`` names it without credentials. Asked only of such a ledger;
        one that declares itself shared must say which it is."""
        raise LedgerError(f"the {type(self).__name__} ledger declares that it keeps machines apart "
                          "(store_leases False) but does not name its database (shared()); set "
                          "store_leases True on it, or give --ledger a SQLite file or a PostgreSQL URL")

    @abstractmethod
    def sync(self, runs: Iterable[RunSpec], done: set[str], started: set[str],
             still_done: Callable[[str], bool] | None = None) -> None:
        """Make the ledger agree with the store and remember ``runs`` as one grid.

        Adds missing runs (``interrupted`` if ``started``, i.e. they have files in the
        store, else ``pending``) and marks runs in ``done`` as done, whatever the ledger
        said, even under a live lease (``DONE`` in the store is the truth). A run the
        ledger has as done but that is not in ``done`` goes back to pending (deleting a
        run's folder is how a user asks for a re-run) only if ``still_done(run_id)``
        says it is not done: ``done`` may have been listed before another worker
        finished the run. It is asked after the ledger was read, outside the write
        transaction (the store may be slow), and only about such runs; a run that
        becomes done after that read is left done. Rows are never deleted: another
        launcher with another grid may run them.
        """

    @abstractmethod
    def forget(self, resets: Mapping[str, str]) -> set[str]:
        """Honour resets made on any machine: ``run id -> reset token``, the newest marker
        ``sweeprun reset`` left for each run in the store (see :meth:`sweeprun.sweep.Sweep.resets`).

        Each run whose row last honoured another token (or none) takes this one: its
        failures and lost attempts are forgotten and, if it had failed, it is pending
        again. A done run stays done and a running one keeps its lease; runs the ledger
        has no row for are passed over (a row added later starts with nothing to forget,
        and the caller honours the markers right after each :meth:`sync`). One
        transaction, and idempotent: a token is honoured once per ledger, so failures
        after the reset count again, and a retried or repeated call changes nothing more.
        Returns the runs that took a new token.
        """

    @abstractmethod
    def honoured(self) -> dict[str, str]:
        """``run id -> reset token`` each run of the sweep last honoured (:meth:`forget`), read-only:
        ``status`` shows a failed run whose newer reset this ledger has not seen yet as pending."""

    @abstractmethod
    def claim(self, worker: ProcessRef, policy: Policy, lease_s: float,
              grid: str | None = None, skip: Collection[str] = ()) -> Claim | None:
        """Atomically take the next :data:`Verdict.RUNNABLE` run of ``grid`` (a :func:`grid_key`
        given to :meth:`sync`; ``None``: any run), or return ``None``. Interrupted runs
        come first (their checkpoints hold work), then grid order. Runs in ``skip`` are
        passed over (another machine holds them, by the store's leases)."""

    @abstractmethod
    def release(self, claim: Claim) -> bool:
        """Undo ``claim`` before its run started: the run is runnable again and its attempt
        number is not used up (another machine holds the run, by the store's leases).
        ``False`` when the claim is no longer current."""

    @abstractmethod
    def renumber(self, claim: Claim, at_least: int) -> Claim | None:
        """Raise the claim's attempt number to ``at_least`` (the store has seen attempts this
        ledger has not: it was rebuilt); ``None`` if the claim is no longer current."""

    @abstractmethod
    def start(self, claim: Claim, lease_s: float, progress: str | None,
              policy: Policy) -> RunState | None:
        """Renew the lease as the child is about to start and record checkpoint ``progress``.

        Returns ``RUNNING`` to go ahead. When the previous attempt was lost with its worker
        and ``progress`` is what it was then, the loss counts toward ``policy.max_lost``;
        reaching it marks the run failed and returns ``FAILED`` (a run that kills its
        machine every time, out of memory say, must not be retried forever). ``None``:
        the claim is no longer current.
        """

    @abstractmethod
    def heartbeat(self, claim: Claim, lease_s: float, child: ProcessRef | None = None) -> bool:
        """Extend the lease; ``False`` means the run was taken over and the caller must stop."""

    @abstractmethod
    def finish(self, claim: Claim, outcome: Outcome, policy: Policy,
               exit_code: int | None = None, resumed: Resume | None = None,
               rollbacks: RollbackSummary | None = None, ooms: int = 0) -> RunState | None:
        """Record how the attempt ended and return the run's new state.

        Returns ``None`` (and changes nothing) when ``claim`` is no longer the current
        attempt, except that a ``DONE`` outcome is always accepted for a run that sync
        already marked done from its ``DONE`` file. A failure counts toward
        ``max_attempts``; an interruption does not.

        ``resumed``: the attempt resumed from a checkpoint saved at another world size
        (what its start record says, ``attempts/<n>.started``). The row keeps the run's latest
        such resume (:attr:`RunRow.resumed`) through later exact resumes, and forgets it when
        an attempt starts with no checkpoint (:func:`~sweeprun.ledger.transitions.resume_after`).
        ``rollbacks``: the run's loss-spike rollbacks as of this attempt's end (kept when not
        given); ``ooms``: its attempts that ran out of memory, this one included (an ``OOM``
        outcome is retried while they are within ``policy.oom_retries``).
        """

    @abstractmethod
    def rows(self, grid: str | None = None, *, params: bool = True) -> list[RunRow]:
        """Every run of the sweep (or of one grid), in grid order. ``params=False`` leaves
        each row's params empty: a caller that only counts states (the launcher's exit
        code) skips decoding 10,000 JSON objects."""

    @abstractmethod
    def uptime(self) -> Uptime:
        """How long this sweep's attempts have run and how many were cut short (interrupted
        or lost with their worker): what an automatic checkpoint interval is chosen from."""

    @abstractmethod
    def attempts(self, run_id: str) -> list[AttemptRow]:
        """Every attempt of ``run_id`` the ledger knows, oldest first; read-only, and ``[]``
        for a run it never started (a new machine: the store's attempt records then tell)."""

    @abstractmethod
    def every_attempt(self) -> dict[str, list[AttemptRow]]:
        """:meth:`attempts` of every run of the sweep at once (one query: ``sweeprun report``
        draws the attempts of 10,000 runs); runs never started are absent."""

    def settled(self, policy: Policy, grid: str | None = None) -> bool:
        """See :func:`settled`; for the runs of ``grid``."""
        return settled(self.rows(grid), self.now(), policy)

    def stop_waiting(self) -> None:  # noqa: B027 - a no-op where waits are short (SQLite's busy timeout)
        """Make calls that wait for an unreachable ledger give up now, with a LedgerError.

        A launcher that is stopping (Ctrl-C, a preemption notice) must not sit out a
        database outage: its runs save and exit, and their leases simply run out.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections; the ledger may not be used afterwards."""


def with_attempt(claim: Claim, attempt: int) -> Claim:
    return replace(claim, attempt=attempt)
