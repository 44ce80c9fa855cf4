"""A tenure: one attempt's hold on one run, the one owner of "who holds this run, as which
attempt" on the launcher's side (issue 19).

Three records say that a worker holds a run, and they must agree: the ledger's claim (its
attempt number is the ledger's fencing token), the lease in the store (its generation is
the token every machine sees, when store leases run) and the durable attempt record
``attempts/<n>.json`` (what the training side's fence, ``status`` and ``show`` read, and
what names ``logs/attempt-<n>.log`` and the checkpoints). A :class:`Tenure` takes them in
that order, decides the attempt number once, and keeps it equal to the lease generation
wherever store leases run; then it renews, checks and releases them together, and tells
the ledger how the attempt ended.

The number is the lease generation when store leases run. A run never leased starts at the
generation after the highest attempt its files name (a sweep that ran on a shared database
before, see :meth:`~sweeprun.leases.StoreLeases.take`); a generation whose number is taken
already (files of such a sweep above a lease folder's top, or this machine's ledger counting
higher after a reset) is released at once and the next one taken, as any taker would take
a released generation, so that numbers never collide and every machine reads one ``N``.
Without store leases (a shared database keeps machines apart), the ledger's number is
raised above what the store has seen, as before.
"""

from __future__ import annotations

import posixpath
import time
from typing import TYPE_CHECKING

from .errors import LeaseLost, SweeprunError
from .leases import Lease, StoreLeases
from .ledger import Outcome, RunState
from .redact import record_bytes
from .resumes import read_started
from .rollbacks import RollbackSummary, attempt_rollback, oom_attempts, read_rollbacks
from .runenv import PREEMPTED_EXIT
from .slurm import job_label
from .store import RunPaths, create_only, layout, store_errors

if TYPE_CHECKING:
    from .ledger import Claim, Ledger, Policy

#: Generations given back in a row while looking for an attempt number nobody used: more
#: means something keeps writing attempt files without a lease (another tool's sweep).
_NUMBER_TRIES = 50


def folder_names(paths: RunPaths, folder: str) -> list[str]:
    """The names in one of the run's folders (``[]`` when it is not there)."""
    with store_errors("list", folder):
        try:
            found = paths.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
    return [posixpath.basename(p.rstrip("/")) for p in found]


def highest_attempt(paths: RunPaths) -> int:
    """The highest attempt any file of the run names (:func:`.layout.highest_attempt`): attempt
    records, logs, checkpoints, one listing each (a metrics part is never written by an
    attempt without its record)."""
    folders = (layout.ATTEMPTS, layout.LOGS, layout.CHECKPOINTS)
    return layout.highest_attempt(f"{folder}/{name}" for folder in folders
                                  for name in folder_names(paths, posixpath.join(paths.dir, folder)))


def create_json(paths: RunPaths, path: str, obj: object) -> bool:
    """Write ``obj`` as JSON at ``path`` unless the file exists; ``False`` if it did.

    Create-only in the store itself (:func:`~sweeprun.store.create_only`), so two
    workers that read the same highest attempt number can never both take the next one.
    """
    return create_only(paths.fs, path, record_bytes(obj))


class Tenure:
    """The ledger claim, the store lease and the attempt record of one attempt, together.

    Not thread-safe on its own: the attempt's slot takes and numbers it, then the
    heartbeat renews it; :class:`~sweeprun.attempt.Attempt` keeps them apart.
    """

    def __init__(self, ledger: Ledger, leases: StoreLeases | None, paths: RunPaths, claim: Claim,
                 nproc: int = 1) -> None:
        self.ledger = ledger
        self.nproc = nproc  # the attempt's world size, in its record: what resumed at another one
        self.leases = leases
        self.paths = paths
        self.claim = claim
        self.lease: Lease | None = None

    @property
    def attempt(self) -> int:
        return self.claim.attempt

    # -- taking -----------------------------------------------------------------------------

    def take_lease(self) -> bool:
        """Take the run's lease in the store (a no-op without store leases); ``False`` when
        another machine holds it. A store failure is a :class:`SweeprunError`."""
        if self.leases is None:
            return True
        self.lease = self.leases.take(self.paths.dir, floor=lambda: highest_attempt(self.paths))
        return self.lease is not None

    def due_s(self) -> float | None:
        """After a take that found the run held: when a look may find its lease free (see
        :meth:`~sweeprun.leases.StoreLeases.due_s`)."""
        return self.leases.due_s(self.paths.dir) if self.leases is not None else None

    def take_number(self) -> bool | None:
        """Decide the attempt number and make it durable (``attempts/<n>.json``, create-only).

        ``True``: this attempt holds the run as :attr:`attempt`. ``False``: another machine
        took the lease while a used number was given back. ``None``: the ledger's claim is
        no longer current (lost).
        """
        for _ in range(_NUMBER_TRIES):
            seen = highest_attempt(self.paths)
            if self.lease is not None and self.leases is not None:
                if self.lease.generation <= max(seen, self.claim.attempt - 1):
                    self.leases.release(self.lease)  # its number is used: the next generation
                    self.lease = self.leases.take(self.paths.dir)
                    if self.lease is None:
                        return False
                    continue
                target = self.lease.generation
            else:
                target = max(seen + 1, self.claim.attempt)
            if target > self.claim.attempt:
                renumbered = self.ledger.renumber(self.claim, target)
                if renumbered is None:
                    return None
                self.claim = renumbered
            record = {"attempt": target, "worker": self.claim.worker.label, "started_at": time.time(),
                      "nproc": self.nproc}
            job = job_label()
            if job is not None:  # status names the scheduler's job running the run
                record["job"] = job
            if create_json(self.paths, self.paths.attempt_record(target), record):
                return True
        raise SweeprunError(f"run {self.claim.run_id}: could not take a fresh attempt number in "
                            f"{self.paths.attempts}; is another sweeprun of another ledger running it?")

    # -- holding ----------------------------------------------------------------------------

    def renew_lease(self) -> bool:
        """Renew the store lease (after the ledger's heartbeat); ``False`` when another machine
        took the run over. A store failure is a :class:`SweeprunError`."""
        if self.lease is None or self.leases is None:
            return True
        try:
            self.leases.renew(self.lease)
        except LeaseLost:
            return False
        return True

    def lease_still_mine(self) -> bool:
        """The store lease's last word before ``DONE``: another machine may have taken the run
        over since the last heartbeat. An unreadable store is no news (``DONE`` is
        create-only: two finishers cannot both write it)."""
        try:
            return self.renew_lease()
        except SweeprunError:
            return True

    def start(self, lease_s: float, progress: str | None, policy: Policy) -> RunState | None:
        """The child is about to start (:meth:`~sweeprun.ledger.base.Ledger.start`): ``FAILED``
        when the run's attempts were lost with their worker too often (its tracker run, if it
        has one, then ends failed too), ``None`` when the run is no longer this worker's."""
        state = self.ledger.start(self.claim, lease_s, progress, policy)
        if state is RunState.FAILED:
            from .trackers import follow
            follow(self.paths, state)
        return state

    def finish(self, outcome: Outcome, policy: Policy, exit_code: int | None,
               child_started: bool) -> RunState | None:
        """Record the attempt's end in the ledger (:meth:`~sweeprun.ledger.base.Ledger.finish`),
        with what its child recorded in the run's folder: a resume at another world size
        (``attempts/<n>.started``), the run's loss-spike rollbacks (``rollbacks/``) and, for an
        attempt out of memory, how many ran out so far (``attempts/<n>.oom``). The ledger keeps
        them with the run, for ``status``; and the run's tracker run, if it has one, takes the
        status the ledger now gives the run (:func:`sweeprun.trackers.follow`). No child, no
        record to read."""
        resumed, rollbacks, ooms = None, None, 0
        if child_started:  # a missing or damaged record is no resume (read_started never raises)
            resumed = read_started(self.paths.fs, self.paths.api_started(self.attempt), self.attempt).resume
            try:
                rollbacks = RollbackSummary.of(read_rollbacks(self.paths.fs, self.paths.rollbacks))
            except SweeprunError:
                pass  # only shown: the ledger keeps what it had
        if outcome is Outcome.OOM:
            try:
                ooms = len(oom_attempts(self.paths))
            except SweeprunError:
                ooms = 1 + policy.oom_retries      # unknown: no retry rather than one too many
        state = self.ledger.finish(self.claim, outcome, policy, exit_code, resumed=resumed,
                                   rollbacks=rollbacks, ooms=ooms)
        if child_started and state is not None:   # its tracker run's status follows the ledger
            from .trackers import follow
            follow(self.paths, state)
        return state

    def reported_end(self, rc: int) -> Outcome | None:
        """How the training API said this attempt ended, where that is more than its exit
        code: a loss spike past the rollbacks allowed (``attempts/<n>.diverged``), out of
        memory (``.oom``), or a rollback (exit 75 with a record of this attempt in
        ``rollbacks/``, :mod:`sweeprun.rollbacks`). ``None``: the exit code says it all."""
        fs, attempt = self.paths.fs, self.attempt
        try:
            with store_errors("read", self.paths.attempts):
                if fs.exists(self.paths.api_diverged(attempt)):
                    return Outcome.DIVERGED
                if fs.exists(self.paths.api_oom(attempt)):
                    return Outcome.OOM
            if rc == PREEMPTED_EXIT and attempt_rollback(read_rollbacks(fs, self.paths.rollbacks), attempt):
                return Outcome.ROLLED_BACK
        except SweeprunError:
            pass   # the store is out of reach: the exit code decides (the next attempt reports again)
        return None

    def release(self, done: bool) -> None:
        """Let the next taker in at once (the run ended, was stopped, or was given up); a done
        run's older lease generations are cleared away."""
        lease, self.lease = self.lease, None
        if lease is None or self.leases is None:
            return
        try:
            if done:
                self.leases.retire(lease)
            else:
                self.leases.release(lease)
        except SweeprunError:
            pass  # its beat stops; the next taker waits out lease_s instead
