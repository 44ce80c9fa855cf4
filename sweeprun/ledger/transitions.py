"""The ledger's state transitions: every change it makes to a run, as a pure function.

Given the row as a backend read it inside its transaction, the ledger's time and the
caller's arguments, each function returns the new row and what happens to the attempt
records (a :class:`Change`), or ``None`` when the caller's claim is no longer current. A
backend reads, calls, and writes the result back in the same transaction; it decides
nothing itself, so SQLite and PostgreSQL cannot drift apart. Which runs a claim may take is
:func:`~sweeprun.ledger.base.judge`'s, beside them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from ..procs import ProcessRef
from ..resumes import Resume, newest
from ..rollbacks import RollbackSummary
from .base import Claim, Outcome, Policy, RunRow, RunState, orphan_of


@dataclass(frozen=True)
class AttemptEnd:
    """An attempt record a transition closes: how the attempt ended, and the run's state after."""

    attempt: int
    outcome: str             # done, interrupted, failed, lost (taken over) or lost-limit
    exit_code: int | None
    result: RunState | None  # None for a lost attempt: the run goes on under its new claim


@dataclass(frozen=True)
class Change:
    """One transition's effect, which the backend persists all at once at ``row.updated_at``
    (heartbeats excepted: they leave ``updated_at`` alone) or the transaction's time."""

    row: RunRow
    opened: int | None = None             # an attempt record started now, by ``row.worker``
    closed: AttemptEnd | None = None
    dropped: int | None = None            # an attempt record given back (a released claim)
    moved: tuple[int, int] | None = None  # an attempt record renumbered: (old, new)


def _current(row: RunRow | None, claim: Claim) -> bool:
    """Is ``claim`` the run's current attempt? The fencing check every holder's call makes."""
    return row is not None and row.state is RunState.RUNNING and row.attempts == claim.attempt


def take(row: RunRow, worker: ProcessRef, now: float, lease_s: float) -> tuple[Change, Claim]:
    """Claim ``row`` (which :func:`judge` found runnable) for ``worker`` as the next attempt.

    A row still marked running was abandoned: its attempt is closed as lost, and a child its
    dead holder left on this host is named so that the runner kills it before starting.
    """
    took_over = row.state is RunState.RUNNING
    attempt = row.attempts + 1
    new = replace(row, state=RunState.RUNNING, attempts=attempt, worker=worker.label,
                  worker_start=worker.start, child_pid=None, child_start=None,
                  lease_until=now + lease_s, heartbeat_at=now, updated_at=now)
    closed = AttemptEnd(row.attempts, "lost", None, None) if took_over else None
    claim = Claim(run_id=row.run_id, attempt=attempt, params=row.params, worker=worker,
                  orphan=orphan_of(row) if took_over else None, took_over=took_over)
    return Change(new, opened=attempt, closed=closed), claim


def released(row: RunRow | None, claim: Claim, now: float) -> Change | None:
    """Give ``claim`` back before its run started: runnable again, the attempt number unused."""
    if not _current(row, claim):
        return None
    assert row is not None
    new = replace(row, state=RunState.INTERRUPTED, attempts=row.attempts - 1, worker=None,
                  worker_start=None, child_pid=None, child_start=None, lease_until=None,
                  updated_at=now)
    return Change(new, dropped=claim.attempt)


def renumbered(row: RunRow | None, claim: Claim, at_least: int, now: float) -> Change | None:
    """Move ``claim``'s attempt number up to ``at_least`` (the store saw higher ones)."""
    if not _current(row, claim):
        return None
    assert row is not None
    return Change(replace(row, attempts=at_least, updated_at=now), moved=(claim.attempt, at_least))


def started(row: RunRow | None, claim: Claim, now: float, lease_s: float, progress: str | None,
            policy: Policy) -> tuple[Change, RunState] | None:
    """The child is about to start: renew the lease and count a loss without progress.

    A loss counts when the previous attempt was lost with its worker and the newest
    checkpoint is the one it started from; ``policy.max_lost`` of them in a row fail the run.
    """
    if not _current(row, claim):
        return None
    assert row is not None
    lost = (row.lost + 1 if progress == row.progress else 0) if claim.took_over else 0
    if lost >= policy.max_lost:
        new = replace(row, state=RunState.FAILED, lost=lost, progress=progress, worker=None,
                      worker_start=None, lease_until=None, updated_at=now)
        return Change(new, closed=AttemptEnd(claim.attempt, "lost-limit", None, RunState.FAILED)), \
            RunState.FAILED
    new = replace(row, lost=lost, progress=progress, lease_until=now + lease_s, heartbeat_at=now,
                  updated_at=now)
    return Change(new), RunState.RUNNING


def renewed(row: RunRow | None, claim: Claim, now: float, lease_s: float,
            child: ProcessRef | None = None) -> Change | None:
    """A heartbeat: the lease runs ``lease_s`` from now; ``child`` is recorded when given."""
    if not _current(row, claim):
        return None
    assert row is not None
    new = replace(row, lease_until=now + lease_s, heartbeat_at=now)
    if child is not None:
        new = replace(new, child_pid=child.pid, child_start=child.start)
    return Change(new)


def resume_after(row: RunRow, resumed: Resume | None) -> Resume | None:
    """The resume at another world size a run's row keeps after an attempt that reported
    ``resumed`` (``None``: it resumed exactly, started afresh, or its record did not read).

    The history is kept: a run resumed approximately once goes on from that approximation,
    and a later exact resume (from a checkpoint saved since, at the same world size) does
    not make its result the one an uninterrupted run would give, so ``status`` keeps the
    mark. It is forgotten only when the attempt started with no checkpoint at all (the
    row's ``progress``, recorded at the start, is ``None``): the run began anew.
    """
    if resumed is not None:
        return resumed
    return None if row.progress is None else row.resumed


def finished(row: RunRow | None, claim: Claim, outcome: Outcome, policy: Policy,
             exit_code: int | None, now: float, resumed: Resume | None = None,
             rollbacks: RollbackSummary | None = None, ooms: int = 0) -> tuple[Change, RunState] | None:
    """Record how ``claim``'s attempt ended, the run's resume at another world size
    (:func:`resume_after`) and its rollbacks. ``DONE`` is accepted for a run a sync already
    marked done from its ``DONE`` file; a failure counts toward ``policy.max_attempts``. A
    rollback is an interruption (the run goes on at once); a divergence ends the run
    ``diverged``; an OOM is retried while ``ooms`` is within ``policy.oom_retries``, and past
    them fails the run for good (the same attempt would run out of memory again)."""
    if row is None:
        return None
    if outcome is Outcome.DONE and row.state is RunState.DONE:
        # the claim may be stale here: what it reports is added, never what it lacks taken away
        return Change(replace(row, resumed=newest(row.resumed, resumed), rollbacks=rollbacks or row.rollbacks),
                      closed=AttemptEnd(claim.attempt, outcome.value, exit_code, RunState.DONE)), RunState.DONE
    if not _current(row, claim):
        return None
    failures = row.failures + (outcome is Outcome.FAILED)
    if outcome is Outcome.OOM and ooms > policy.oom_retries:  # retries are on_oom's, not max_attempts
        failures = max(failures, policy.max_attempts)
    state = {Outcome.DONE: RunState.DONE, Outcome.INTERRUPTED: RunState.INTERRUPTED,
             Outcome.ROLLED_BACK: RunState.INTERRUPTED, Outcome.DIVERGED: RunState.DIVERGED,
             Outcome.FAILED: RunState.FAILED if failures >= policy.max_attempts else RunState.PENDING,
             Outcome.OOM: RunState.FAILED if failures >= policy.max_attempts else RunState.PENDING,
             }[outcome]
    new = replace(row, state=state, failures=failures, lost=0, last_exit=exit_code, worker=None,
                  worker_start=None, child_pid=None, child_start=None, lease_until=None,
                  updated_at=now, resumed=resume_after(row, resumed), rollbacks=rollbacks or row.rollbacks)
    return Change(new, closed=AttemptEnd(claim.attempt, outcome.value, exit_code, state)), state


def forgotten(row: RunRow, honoured: str | None, token: str, now: float) -> RunRow | None:
    """Honour reset ``token`` for ``row``, whose last honoured token is ``honoured``: failures
    and lost attempts are forgotten and a failed run is pending again; a done run stays done
    and a running one keeps its lease. ``None`` when this token was honoured already."""
    if honoured == token:
        return None
    state = RunState.PENDING if row.state in (RunState.FAILED, RunState.DIVERGED) else row.state
    return replace(row, failures=0, lost=0, state=state, updated_at=now, rollbacks=None)


def first_state(run_id: str, done: Collection[str], started: Collection[str]) -> RunState:
    """The state of a run the ledger has no row for yet: done, or interrupted when it has
    files in the store (``started``), else pending."""
    return (RunState.DONE if run_id in done else
            RunState.INTERRUPTED if run_id in started else RunState.PENDING)


def synced(state: str | None, run_id: str, done: Collection[str], started: Collection[str],
           gone: Collection[str] | None) -> RunState | None:
    """The state :meth:`~sweeprun.ledger.base.Ledger.sync` gives a run whose row holds ``state``
    (``None``: no row yet; a damaged row's unknown state is not done), or ``None`` to leave it.
    ``gone``: the runs the store confirmed are no longer done (``None``: trust ``done``)."""
    if state is None:
        return first_state(run_id, done, started)
    if run_id in done and state != RunState.DONE:
        return RunState.DONE
    if run_id not in done and state == RunState.DONE and (gone is None or run_id in gone):
        return RunState.INTERRUPTED if run_id in started else RunState.PENDING
    return None


def synced_columns(target: RunState) -> dict[str, Any]:
    """What a row moved to ``target`` by :func:`synced` changes (besides ``updated_at``), written
    without reading the row (sync touches a whole grid at once). DONE in the store is the truth,
    even under a live lease: the holder's finish is accepted for a done run. A run whose
    ``DONE`` was deleted (a re-run asked for) starts over with no failures counted; one with
    no files left in the store (pending) has no resume at another world size to tell of."""
    if target is RunState.DONE:
        return {"state": target.value, "worker": None, "worker_start": None, "child_pid": None,
                "child_start": None, "lease_until": None}
    cleared = {"resumed": None, "rollbacks": None} if target is RunState.PENDING else {}
    return {"state": target.value, "failures": 0, "lost": 0, **cleared}
