"""One attempt of one run: from its claim to its recorded end.

Split from :mod:`sweeprun.runner` so that the launcher reads as the loop it is
(slots claim, a heartbeat renews, signals stop) and everything that can happen to a
single start of a run (store writes, the child, its output, the outcome) reads in
one place.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from typing import IO, TYPE_CHECKING, Protocol

from . import settings
from .errors import SweeprunError
from .faults import crash_point
from .ledger import Claim, Outcome, Policy, RunState
from .procs import ProcessRef, boot_clock, spawn
from .ranks import Processes, agent_argv
from .redact import redact
from .runenv import PREEMPTED_EXIT
from .store import RunPaths, StoreLinkError, backend_for, confine, store_errors
from .store.layout import TRAINER
from .tenure import Tenure, folder_names
from .tenure import create_json as _create_only  # noqa: F401  (the name tests import)

if TYPE_CHECKING:
    from .leases import StoreLeases
    from .ledger import Ledger
    from .spec import SweepSpec
    from .sweep import Sweep

#: Exit statuses that mean "stopped by a preemption-like signal", not "broken".
_PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Events(Protocol):
    """What the launcher reports; :mod:`sweeprun.render` draws it. Called from any thread."""

    def started(self, run_id: str, attempt: int, slot: int) -> None: ...
    def output(self, run_id: str, line: str) -> None: ...
    def ended(self, run_id: str, attempt: int, state: RunState | None, exit_code: int | None,
              elapsed_s: float) -> None: ...
    def note(self, message: str) -> None: ...
    def progress(self, run_id: str, step: int | None, metric: tuple[str, float] | None) -> None: ...
    #: Whether :meth:`progress` shows anything: reading every running run's metrics each
    #: heartbeat (a LIST and a read on object stores) is worth it only for a live view.
    wants_progress: bool


class Host(Protocol):
    """What an attempt asks of the launcher that runs it (:class:`~sweeprun.runner.Launcher`):
    this and nothing else, so the launcher's own state stays its own."""

    sweep: Sweep
    spec: SweepSpec
    ledger: Ledger
    events: Events
    policy: Policy
    leases: StoreLeases | None
    heartbeat_s: float

    @property
    def stopping(self) -> bool: ...
    def register(self, attempt: Attempt) -> bool: ...
    def unregister(self, attempt: Attempt) -> None: ...
    def count_start(self) -> None: ...
    def pass_over(self, run_id: str, store_failed: bool = False, due_s: float | None = None) -> None: ...
    def took_lease(self, run_id: str) -> None: ...
    def env(self, claim: Claim, paths: RunPaths, gpus: tuple[str, ...] | None) -> dict[str, str]: ...
    def take_gpus(self, attempt: Attempt) -> tuple[str, ...] | None: ...
    def give_gpus(self, attempt: Attempt) -> None: ...


class Attempt:
    """One start of one run, from its claim to its recorded end.

    It owns everything that happens in between: the lease (the heartbeat covers it
    from the claim, before any slow store write), the durable attempt number, the
    child, its log, the events, and the one place where the outcome is decided and
    recorded. Whatever goes wrong in this thread, the child is asked to save and
    stop (SIGTERM, then SIGKILL after the grace period) and the ledger hears of it.
    """

    def __init__(self, launcher: Host, claim: Claim, slot: int) -> None:
        self.launcher = launcher
        self.ledger = launcher.ledger
        self.events = launcher.events
        self.slot = slot
        self.paths = launcher.sweep.paths.run(claim.run_id)
        #: Processes (ranks) of this attempt: more than one starts them through torchrun.
        self.nproc = launcher.spec.nproc_of(launcher.sweep.runs_by_id[claim.run_id])
        self.gpus: tuple[str, ...] | None = None  # the --gpus indices this attempt holds
        self.processes = Processes(self.nproc, self.paths.url, claim.run_id, ranked=launcher.spec.ranked)
        #: The claim, the store lease and the attempt record: who holds the run, as which attempt.
        self.tenure = Tenure(launcher.ledger, launcher.leases, self.paths, claim, self.nproc)
        self.proc: subprocess.Popen[bytes] | None = None
        self.lost = False             # the lease is gone: write nothing more
        self.gave_up = False          # ... or may be: this machine's clock ran past it
        self.terminated = False       # the launcher sent SIGTERM (a preemption, not a failure)
        self.killed = False           # the launcher sent SIGKILL after the grace period
        self.recorded = False         # the ledger has this attempt's end
        self.wrote_done = False
        self.started_at = time.monotonic()
        self._renewed_at = boot_clock()
        self._renew_failing = False
        self._lock = threading.Lock()

    @property
    def claim(self) -> Claim:
        return self.tenure.claim

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        launcher = self.launcher
        self._kill_orphan()  # first: a stop now would leave no record of it for the next claim
        if not launcher.register(self):
            self._record(Outcome.INTERRUPTED, None)  # a stop arrived with the claim
            launcher.unregister(self)
            return
        log: _AttemptLog | None = None
        try:
            if not self._take_gpus():
                return
            if not self._prepare():
                return
            log = _AttemptLog(self.paths, self.claim.attempt)
            rc = self._execute(log)
            if rc is not None:
                self._conclude(rc)
        except BaseException:
            self._abort(log)
            raise
        finally:
            launcher.unregister(self)
            if self.gpus:
                launcher.give_gpus(self)
            if not self.lost or self.gave_up or self.proc is None:
                self.release_store_lease()  # a lease taken for a child that never started goes back
            if log is not None:
                log.close()

    def _kill_orphan(self) -> None:
        """End what a dead worker left running of this run: its child and the child's group."""
        orphan = self.claim.orphan
        if orphan is None:
            return
        if orphan.kill_group():
            self.events.note(f"{self.claim.run_id}: killed pid {orphan.pid} and its group, left "
                             "running by a dead worker")
        else:
            self.events.note(f"{self.claim.run_id}: pid {orphan.pid} cannot be proven to be the "
                             "run's old child; left alone")

    def _take_gpus(self) -> bool:
        """Wait, holding the claim under the heartbeat, for this run's ``nproc`` GPUs (``--gpus``;
        none without it). A stop meanwhile gives the claim back unused."""
        self.gpus = self.launcher.take_gpus(self)
        if self.gpus is None and not self.lost:
            self._give_claim_back()
        return self.gpus is not None

    def _prepare(self) -> bool:
        """Everything between the claim and the child; ``False`` when nothing is to be started."""
        claim = self.claim
        if self.paths.is_done():
            return self._found_done()
        if not self._take_store_lease():
            return False
        if self.tenure.lease is not None and self.paths.is_done():  # finished elsewhere meanwhile
            self.wrote_done = True  # ... so its lease is retired, not released
            return self._found_done()
        numbered = self.tenure.take_number()
        if numbered is None:
            self._lose()
            return False
        if not numbered:  # a used number given back, and another machine took the next one
            return self._held_elsewhere()
        self.launcher.sweep.write_params(claim.run_id, claim.params)
        state = self.tenure.start(self.launcher.spec.lease_s, self._progress(), self.launcher.policy)
        if state is None:
            self._lose()
            return False
        if state is RunState.FAILED:
            self.recorded = True
            self.events.note(
                f"{claim.run_id}: {self.launcher.policy.max_lost} attempts in a row were lost with "
                "their worker without a new checkpoint (does it kill its machine, out of memory?); "
                "marked failed. Check its logs, then delete its folder or raise max_lost to retry")
            self.events.ended(claim.run_id, claim.attempt, RunState.FAILED, None, 0.0)
            return False
        with self._lock:
            # start() renewed the lease under the fencing token: whatever the heartbeat
            # feared while the store was slow, this attempt holds the run now.
            self.lost = False
            self._renew_failing = False
            self._renewed_at = boot_clock()
        return True

    def _found_done(self) -> bool:
        """Another worker (or a launcher killed before it could record it) finished the run."""
        self.paths.index_done()
        self._record(Outcome.DONE, 0, quiet=True)
        self.events.note(f"{self.claim.run_id}: already done in the store; not started again")
        return False

    def _take_store_lease(self) -> bool:
        """Take the run's lease in the store (when store leases run): what keeps machines
        apart when their ledgers cannot see each other. Held elsewhere: the claim goes
        back, no attempt is used."""
        try:
            if self.tenure.take_lease():
                self.launcher.took_lease(self.claim.run_id)
                return True
        except StoreLinkError:
            raise  # not a passing failure: the launcher stops with its one line
        except SweeprunError as exc:  # the store failed for now: pass the run over for a while
            self.events.note(f"{self.claim.run_id}: cannot read its lease in the store ({exc})")
            self.launcher.pass_over(self.claim.run_id, store_failed=True)
            return self._give_claim_back()
        return self._held_elsewhere()

    def _held_elsewhere(self) -> bool:
        """Another machine holds the run: pass it over until its next look is due, undo the claim."""
        self.launcher.pass_over(self.claim.run_id, due_s=self.tenure.due_s())
        return self._give_claim_back()

    def _give_claim_back(self) -> bool:
        self.ledger.release(self.claim)
        self.recorded = True
        return False

    def release_store_lease(self) -> None:
        """Let the next taker in at once (the run ended, was stopped, or was given up); a
        done run's older lease generations are cleared away."""
        self.tenure.release(done=self.wrote_done)

    def _progress(self) -> str | None:
        """What the checkpoints folder holds, as a digest: it changes when a save lands
        (a new name, whatever the names look like), not when nothing was saved. A Hugging
        Face Trainer run saves into ``trainer/checkpoint-<step>/`` instead, and a folder
        there counts once sweeprun has sealed it (in the store too: that is where they live)."""
        from .training.sealed import sealed_names

        names = sorted(n for n in folder_names(self.paths, self.paths.checkpoints) if not n.startswith("."))
        with store_errors("list", self.paths.trainer):
            names += [f"{TRAINER}/{n}" for n in sealed_names(self.paths.fs, self.paths.dir)]
        if not names:
            return None
        return hashlib.sha256("\0".join(names).encode()).hexdigest()[:16]

    def _execute(self, log: _AttemptLog) -> int | None:
        """Start the child and stream its output; its exit code, or ``None`` if it never started."""
        launcher, claim = self.launcher, self.claim
        argv, params, retry = launcher.command_of(claim, self.paths)
        argv = agent_argv(argv, self.nproc, launcher.spec.grace_s) if launcher.spec.ranked else argv
        killed = self.processes.kill_strays(None) if launcher.spec.ranked else []
        if killed:  # ranks an earlier attempt on this machine left running
            self.events.note(f"{claim.run_id}: killed pid(s) {', '.join(map(str, killed))} and their "
                             "groups, left running by an earlier attempt")
        env = launcher.env(claim, self.paths, self.gpus, params=params, oom_retry=retry)
        self.started_at = time.monotonic()
        if self.lost:  # the lease ran out while the start was being prepared
            self._ended(self._release(None), None)
            return None
        self.events.started(claim.run_id, claim.attempt, self.slot)
        try:
            # spawn(): the child dies with this process, not with this slot's thread; its own
            # session makes it a group leader, so signals reach what a wrapper script started
            proc = spawn(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            message = f"sweeprun: cannot start {argv[0]!r}: {exc.strerror or exc}\n"
            log.write(message.encode())
            self.events.output(claim.run_id, message.rstrip())
            self._record(Outcome.FAILED, 127)
            return None
        with self._lock:
            self.proc = proc
        launcher.count_start()
        if launcher.stopping or self.terminated:  # a stop arrived between the claim and the start
            self.terminate()
        self.renew()  # record the child's pid and start time at once
        if self.lost:
            self.kill()
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            log.write(raw)
            self.events.output(claim.run_id, raw.decode(errors="replace").rstrip("\n"))
        rc = proc.wait()
        self.processes.end(proc.pid, claim.attempt)  # what it left behind ends with the attempt
        return rc

    def _conclude(self, rc: int) -> None:
        """The one place where an exit code becomes an outcome."""
        claim = self.claim
        if self.lost:
            self._ended(self._release(rc), rc)
            return
        if rc == 0:
            if self._exited_without_finish():
                if self.terminated or self.launcher.stopping:
                    self._record(Outcome.INTERRUPTED, rc)
                    return
                self.events.note(f"{claim.run_id}: exited 0 but never reported the end of training "
                                 "(run.finish(), or an integration's end of training, was not reached); "
                                 "counted as a failed attempt, not done. A script that stops early (it "
                                 "caught SIGTERM or KeyboardInterrupt) must exit 75, not 0; see its log")
                self._record(Outcome.FAILED, rc)
                return
            crash_point("runner.before_done")
            if not self._still_ours():
                self._lose()
                return
            try:
                self.paths.write_done({"run_id": claim.run_id, "attempt": claim.attempt,
                                       "params": claim.params, "worker": claim.worker.label,
                                       "elapsed_s": round(time.monotonic() - self.started_at, 3)})
            except SweeprunError:
                # The run's work is saved; only its marker is not. Leave it resumable
                # (its final checkpoint makes the next attempt instant) and stop.
                self._record(Outcome.INTERRUPTED, rc)
                raise
            self.wrote_done = True
            crash_point("runner.after_done")
            self._record(Outcome.DONE, rc)
        else:   # what the script reported first (diverged, out of memory, rolled back)
            preempted = (rc == PREEMPTED_EXIT or -rc in _PREEMPTION_SIGNALS or self.killed or self.terminated
                         or self.launcher.stopping)
            self._record(self.tenure.reported_end(rc) or (Outcome.INTERRUPTED if preempted else Outcome.FAILED), rc)

    def _still_ours(self) -> bool:
        """Renew the lease once more before ``DONE``: only the current holder may write it.

        The ledger may be unreachable for a moment (a database restarting): keep trying
        while the lease may still be ours by this machine's clock. Past that the run is
        left as it is; its final checkpoint makes the next attempt finish at once.
        """
        while True:
            self.check_lease()  # a machine paused since its last renewal must not write DONE
            if self.lost:
                return False
            try:
                ok = self.ledger.heartbeat(self.claim, self.launcher.spec.lease_s)
            except SweeprunError:
                self.check_lease()
                if self.lost:
                    return False
                time.sleep(min(1.0, self.launcher.heartbeat_s))
                continue
            if ok and not self.tenure.lease_still_mine():
                return False
            if ok:
                with self._lock:
                    self._renewed_at = boot_clock()
            return ok

    def _release(self, rc: int | None) -> RunState | None:
        """After this machine gave a lease up by its own clock, hand the run back if no one
        took it: a fenced interruption (it fails harmlessly when another worker holds the
        run now). Otherwise the run would sit out the rest of its lease, and the next
        claim would count a lost attempt that was only a pause or a network blip."""
        if not self.gave_up:
            return None
        try:
            state = self.tenure.finish(Outcome.INTERRUPTED, self.launcher.policy, rc, self.proc is not None)
        except SweeprunError:
            return None
        self.recorded = state is not None
        return state

    def _exited_without_finish(self) -> bool:
        fs = self.paths.fs
        started, finished = self.paths.api_started(self.claim.attempt), self.paths.api_finished(self.claim.attempt)
        with store_errors("read", started):
            return fs.exists(started) and not fs.exists(finished)

    def _abort(self, log: _AttemptLog | None) -> None:
        """This thread failed: let the child save and stop, then record an interruption.

        Its output is still drained meanwhile: a child blocked writing to a full pipe
        could never finish its save.
        """
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self.terminate()
            drain = threading.Thread(target=_drain, args=(proc, log), daemon=True)
            drain.start()
            try:
                proc.wait(self.launcher.spec.grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
                proc.wait()
            drain.join(5)
        if proc is not None:
            self.processes.end(proc.pid, self.claim.attempt)
        if not self.lost and not self.recorded:
            try:
                self._record(Outcome.INTERRUPTED, proc.returncode if proc else None)
            except SweeprunError:
                pass  # the lease runs out and the next claim recovers the run

    # -- recording --------------------------------------------------------------------------

    def _record(self, outcome: Outcome, rc: int | None, quiet: bool = False) -> None:
        self.recorded = True
        state = self.tenure.finish(outcome, self.launcher.policy, rc, self.proc is not None)
        if state is None:
            self.lost = True
        if not quiet:
            self._ended(state, rc)

    def _ended(self, state: RunState | None, rc: int | None) -> None:
        self.events.ended(self.claim.run_id, self.claim.attempt, state, rc,
                          time.monotonic() - self.started_at)

    def _lose(self) -> None:
        self.lost = True
        self._ended(None, None)

    # -- called from other threads ----------------------------------------------------------

    def renew(self) -> None:
        """Heartbeat. A worker that cannot renew for ``lease_s`` by its own clock cannot learn
        whether another took the run over, so it stops its child itself."""
        self.check_lease()  # woken from a pause past the lease: stop first, never renew late
        if self.lost:
            return
        lease_s = self.launcher.spec.lease_s
        deadline_s = self._silence_limit_s()
        proc = self.proc
        attempted_at = boot_clock()
        try:
            ok = self.ledger.heartbeat(self.claim, lease_s, ProcessRef.of(proc.pid) if proc else None)
            ok = ok and self.tenure.renew_lease()  # False: another machine took the run over
        except SweeprunError as exc:
            silent_s = boot_clock() - self._renewed_at
            if silent_s >= deadline_s:
                self.lost = self.gave_up = True
                self.events.note(f"{self.claim.run_id}: could not renew the lease for {silent_s:.0f} s "
                                 f"({exc}); another worker may take the run: stopping its process")
                self.kill()
            elif not self._renew_failing:
                self._renew_failing = True
                self.events.note(f"{self.claim.run_id}: heartbeat failed ({exc}); retrying for up to "
                                 f"{deadline_s - silent_s:.0f} s before stopping the run")
            return
        if ok:
            self._renewed_at = attempted_at
            self._renew_failing = False
            return
        self.lost = True
        self.events.note(f"lost the lease on {self.claim.run_id} (attempt {self.claim.attempt}): "
                         "another worker took it over; stopping its process")
        self.kill()

    def _silence_limit_s(self) -> float:
        """How long this attempt may go without a renewal, by this machine's monotonic clock.

        One heartbeat less than the lease: the lease counts from the start of the last
        renewal that succeeded, and the next look comes a heartbeat later.
        """
        lease_s = self.launcher.spec.lease_s
        return max(lease_s - self.launcher.heartbeat_s, lease_s / 2)

    def check_lease(self) -> None:
        """Stop the child once the lease may have run out, even while a heartbeat hangs.

        Called often from the launcher's main thread, which never waits on I/O: a
        heartbeat stuck on a dead network connection, or a whole machine paused past
        its lease (a frozen VM that wakes up), cannot learn that another worker took the
        run, so the child is stopped by this machine's own clock first.
        """
        if self.lost:
            return
        silent_s = boot_clock() - self._renewed_at
        if silent_s < self._silence_limit_s():
            return
        self.lost = self.gave_up = True
        self.events.note(f"{self.claim.run_id}: no lease renewal for {silent_s:.0f} s (network down, "
                         "or this machine was paused); another worker may take the run: stopping "
                         "its process")
        self.kill()

    def terminate(self) -> None:
        """Ask the run to save and exit: SIGTERM to its group, or to each rank (see :class:`Processes`)."""
        self.terminated = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self.processes.signal(proc, signal.SIGTERM)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self.killed = True
            self.processes.signal(proc, signal.SIGKILL)


def _drain(proc: subprocess.Popen[bytes], log: _AttemptLog | None) -> None:
    try:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            if log is not None:
                log.write(raw)
    except (OSError, ValueError):
        pass


class _AttemptLog:
    """The attempt's log: written in place on local disk; on object stores, spooled to a
    local file and uploaded every ``SWEEPRUN_LOG_UPLOAD_S`` (30 s) while the run goes on,
    so ``status`` and ``show`` from another machine see progress, and once more at the end.

    A log that cannot be written or uploaded must never stop the run, so I/O errors
    are swallowed here; the next upload tries again.
    """

    def __init__(self, paths: RunPaths, attempt: int) -> None:
        self.paths = paths
        self.target = paths.log(attempt)
        self.spool: str | None = None
        self.file: IO[bytes] | None = None
        self._lock = threading.Lock()         # write() and the uploader share the spool
        self._written = self._uploaded = 0    # bytes in the spool / in the last upload
        self._stop = threading.Event()
        self._uploader: threading.Thread | None = None
        try:
            if backend_for(paths.fs).appendable:
                local = confine(paths.fs, self.target)  # never appended through a link
                os.makedirs(os.path.dirname(local), exist_ok=True)
                self.file = open(local, "ab")  # noqa: SIM115 - held for the attempt
            else:
                fd, self.spool = tempfile.mkstemp(prefix="sweeprun-log-")
                self.file = os.fdopen(fd, "wb")
        except (OSError, SweeprunError):
            self.file = None
        if self.file is not None and self.spool is not None:
            self._uploader = threading.Thread(target=self._upload_every, args=(settings.LOG_UPLOAD_S.value(),),
                                              name=f"log-upload-{attempt}", daemon=True)
            self._uploader.start()

    def write(self, data: bytes) -> None:
        if self.file is None:
            return
        # the exit of the attempt log (local file or upload): only such lines can hold a credential
        if b"://" in data or b"=" in data:
            data = redact(data.decode(errors="surrogateescape")).encode(errors="surrogateescape")
        with self._lock:
            try:
                self.file.write(data)
                self.file.flush()
                self._written += len(data)
            except (OSError, ValueError):
                pass

    def _upload_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._upload()

    def _upload(self, final: bool = False) -> None:
        """Put the whole spool in place of the object (a log is small; a PUT is atomic)."""
        with self._lock:
            written = self._written
        if self.spool is None or (written == self._uploaded and not final):
            return
        try:
            with store_errors("upload the log to", self.target):
                self.paths.fs.put_file(self.spool, self.target)
            self._uploaded = written
        except (OSError, SweeprunError):
            pass

    def close(self) -> None:
        if self.file is None:
            return
        self._stop.set()
        if self._uploader is not None:
            self._uploader.join()
        try:
            with self._lock:
                self.file.close()
            self._upload(final=True)
        except OSError:
            pass
        finally:
            self.file = None
            if self.spool is not None:
                try:
                    os.unlink(self.spool)
                except OSError:
                    pass
