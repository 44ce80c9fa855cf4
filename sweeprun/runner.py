"""The worker loop: claim a run, start its process, keep the lease, record how it ended.

One launcher process runs ``slots`` threads, each running one child at a time,
plus a heartbeat thread that renews every lease this launcher holds. The main
thread only waits and handles SIGINT/SIGTERM, so signal handling stays simple.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

from .errors import SweeprunError
from .faults import crash_point
from .ledger import Claim, Ledger, Outcome, RunState
from .procs import ProcessRef, die_with_parent
from .runenv import ATTEMPT, PARAMS, PREEMPTED_EXIT, RUN_DIR, RUN_ID, SWEEP
from .store import RunPaths, is_local, store_errors
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


@dataclass
class LaunchOptions:
    workers: int = 1
    gpus: Sequence[str] | None = None   # one slot per GPU, each with its own CUDA_VISIBLE_DEVICES
    heartbeat_s: float | None = None    # default: a quarter of the lease
    poll_s: float = 1.0                 # how often an idle slot looks for work

    @property
    def slots(self) -> int:
        return len(self.gpus) if self.gpus else self.workers


@dataclass
class _Active:
    claim: Claim
    proc: subprocess.Popen[bytes]
    started: float
    lost: bool = False
    killed_by_us: bool = False


@dataclass
class LaunchResult:
    exit_code: int
    started: int = 0                 # processes started by this launcher
    states: dict[str, int] = field(default_factory=dict)


class Launcher:
    def __init__(self, sweep: Sweep, ledger: Ledger, options: LaunchOptions, events: Events) -> None:
        self.sweep = sweep
        self.spec = sweep.spec
        self.ledger = ledger
        self.options = options
        self.events = events
        self.me = ProcessRef.me()
        self.heartbeat_s = options.heartbeat_s or max(0.2, self.spec.lease_s / 4)
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()      # no new claims; children asked to stop
        self._finished = threading.Event()  # every slot has returned
        self._stop_signal: int | None = None
        self._kill_deadline: float | None = None
        self._errors: list[BaseException] = []
        self._started = 0

    # -- public -----------------------------------------------------------------------

    def run(self) -> LaunchResult:
        """Run until every run is done or failed for good, or until SIGINT/SIGTERM."""
        previous = self._install_signals()
        threads = [threading.Thread(target=self._slot, args=(i,), name=f"slot-{i}", daemon=True)
                   for i in range(self.options.slots)]
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        try:
            beat.start()
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.1)
                self._enforce_grace()
        finally:
            self._stop.set()
            self._finished.set()
            beat.join()
            self._restore_signals(previous)
        if self._errors:
            raise self._errors[0]
        states: dict[str, int] = {}
        for row in self.ledger.rows():
            states[row.state.value] = states.get(row.state.value, 0) + 1
        if self._stop_signal is not None:
            code = 128 + self._stop_signal
        else:
            code = 1 if states.get(RunState.FAILED.value) else 0
        return LaunchResult(exit_code=code, started=self._started, states=states)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask running children to checkpoint and exit; after ``grace_s`` they are killed."""
        with self._lock:
            if self._stop_signal is not None:  # a second request: no more grace
                self._kill_deadline = time.monotonic()
                return
            self._stop_signal = signum
            self._kill_deadline = time.monotonic() + self.spec.grace_s
            self._stop.set()
            active = list(self._active.values())
        self.events.note(f"stopping: asking {len(active)} running run(s) to checkpoint and exit "
                         f"(grace {self.spec.grace_s:g} s)")
        for a in active:
            _signal(a.proc, signal.SIGTERM)

    # -- threads ----------------------------------------------------------------------

    def _slot(self, slot: int) -> None:
        try:
            while not self._stop.is_set():
                claim = self.ledger.claim(self.me, self.spec.max_attempts, self.spec.lease_s)
                if claim is None:
                    if self._sweep_settled():
                        return
                    self._stop.wait(self.options.poll_s)
                    continue
                self._run(claim, slot)
        except BaseException as exc:  # surfaced by run(); the other slots stop too
            self._errors.append(exc)
            self.request_stop()

    def _sweep_settled(self) -> bool:
        """True when no run can make progress any more: all done or failed for good."""
        return all(r.state is RunState.DONE or (r.state is RunState.FAILED
                                                and r.failures >= self.spec.max_attempts)
                   for r in self.ledger.rows())

    def _heartbeat_loop(self) -> None:
        while not self._finished.wait(self.heartbeat_s):
            with self._lock:
                active = list(self._active.values())
            for a in active:
                if a.lost:
                    continue
                try:
                    ok = self.ledger.heartbeat(a.claim, self.spec.lease_s, ProcessRef.of(a.proc.pid))
                except SweeprunError as exc:
                    self.events.note(f"heartbeat failed ({exc}); retrying")
                    continue
                if not ok:
                    a.lost = True
                    self.events.note(f"lost the lease on {a.claim.run_id} (attempt {a.claim.attempt}): "
                                     "another worker took it over; stopping its process")
                    _signal(a.proc, signal.SIGKILL)

    def _enforce_grace(self) -> None:
        if self._kill_deadline is None or time.monotonic() < self._kill_deadline:
            return
        with self._lock:
            active = list(self._active.values())
        for a in active:
            if a.proc.poll() is None:
                a.killed_by_us = True
                _signal(a.proc, signal.SIGKILL)

    # -- one attempt --------------------------------------------------------------------

    def _run(self, claim: Claim, slot: int) -> None:
        paths = self.sweep.paths.run(claim.run_id)
        if claim.orphan is not None:
            self.events.note(f"{claim.run_id}: killing pid {claim.orphan.pid} left by a dead worker")
            claim.orphan.kill()
        self.sweep.write_params(claim.run_id, claim.params)
        env = self._env(claim, paths, slot)
        argv = self.spec.argv(self.sweep.runs_by_id[claim.run_id], paths.url, claim.attempt)
        log = _AttemptLog(paths, claim.attempt)
        start = time.monotonic()
        self.events.started(claim.run_id, claim.attempt, slot)
        try:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        except OSError as exc:
            message = f"sweeprun: cannot start {argv[0]!r}: {exc.strerror or exc}\n"
            log.write(message.encode())
            self.events.output(claim.run_id, message.rstrip())
            log.close()
            self._end(claim, Outcome.FAILED, 127, start)
            return
        active = _Active(claim, proc, start)
        with self._lock:
            self._active[claim.run_id] = active
            self._started += 1
            stopping = self._stop_signal is not None
        if stopping:  # a stop arrived between the claim and the start
            _signal(proc, signal.SIGTERM)
        try:
            self.ledger.heartbeat(claim, self.spec.lease_s, ProcessRef.of(proc.pid))
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                log.write(raw)
                self.events.output(claim.run_id, raw.decode(errors="replace").rstrip("\n"))
            rc = proc.wait()
        finally:
            with self._lock:
                self._active.pop(claim.run_id, None)
            log.close()
        if active.lost:
            self.events.ended(claim.run_id, claim.attempt, None, rc, time.monotonic() - start)
            return
        if rc == 0:
            crash_point("runner.before_done")
            if not self.ledger.heartbeat(claim, self.spec.lease_s):
                self.events.ended(claim.run_id, claim.attempt, None, rc, time.monotonic() - start)
                return
            try:
                paths.write_done({"run_id": claim.run_id, "attempt": claim.attempt,
                                  "params": claim.params, "worker": self.me.label,
                                  "elapsed_s": round(time.monotonic() - start, 3)})
            except SweeprunError:
                # The run's work is saved; only its marker is not. Leave it resumable
                # (its final checkpoint makes the next attempt instant) and stop.
                self._end(claim, Outcome.INTERRUPTED, rc, start)
                raise
            self._end(claim, Outcome.DONE, rc, start)
        elif (rc == PREEMPTED_EXIT or -rc in _PREEMPTION_SIGNALS or active.killed_by_us
              or self._stop_signal is not None):
            self._end(claim, Outcome.INTERRUPTED, rc, start)
        else:
            self._end(claim, Outcome.FAILED, rc, start)

    def _end(self, claim: Claim, outcome: Outcome, rc: int | None, start: float) -> None:
        state = self.ledger.finish(claim, outcome, self.spec.max_attempts, rc)
        self.events.ended(claim.run_id, claim.attempt, state, rc, time.monotonic() - start)

    def _env(self, claim: Claim, paths: RunPaths, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update({RUN_DIR: paths.url, RUN_ID: claim.run_id, PARAMS: json.dumps(claim.params),
                    ATTEMPT: str(claim.attempt), SWEEP: self.spec.name, "PYTHONUNBUFFERED": "1"})
        if self.options.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(self.options.gpus[slot])
        return env

    # -- signals --------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, object]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda s, _f: self.request_stop(s))
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, object]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        proc.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass


class _AttemptLog:
    """The attempt's log: written in place on local disk, spooled and uploaded at the end otherwise.

    A log that cannot be written must never stop the run, so I/O errors are swallowed here.
    """

    def __init__(self, paths: RunPaths, attempt: int) -> None:
        self.paths = paths
        self.target = paths.log(attempt)
        self.spool: str | None = None
        self.file: IO[bytes] | None = None
        try:
            if is_local(paths.fs):
                os.makedirs(os.path.dirname(self.target), exist_ok=True)
                self.file = open(self.target, "ab")
            else:
                fd, self.spool = tempfile.mkstemp(prefix="sweeprun-log-")
                self.file = os.fdopen(fd, "wb")
        except OSError:
            self.file = None

    def write(self, data: bytes) -> None:
        if self.file is None:
            return
        try:
            self.file.write(data)
            self.file.flush()
        except OSError:
            pass

    def close(self) -> None:
        if self.file is None:
            return
        try:
            self.file.close()
            if self.spool is not None:
                with store_errors("upload the log to", self.target):
                    self.paths.fs.put_file(self.spool, self.target)
        except (OSError, SweeprunError):
            pass
        finally:
            if self.spool is not None:
                try:
                    os.unlink(self.spool)
                except OSError:
                    pass
