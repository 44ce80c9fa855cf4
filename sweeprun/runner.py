"""The worker loop: claim a run, start its process, keep the lease, record how it ended.

One launcher process runs ``slots`` threads, each running one
:class:`~sweeprun.attempt.Attempt` at a time, plus a heartbeat thread that renews
every lease this launcher holds. The main thread only waits and handles
SIGINT/SIGTERM, so signal handling stays simple.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import settings
from .attempt import Attempt, Events
from .errors import LedgerError, SweeprunError
from .fleet import Coordination, CoordinationRecord, Deadline, StopRequests, stop_poll_s
from .gpus import GpuPool
from .leases import StoreLeases, backoff_s, settle_default
from .ledger import Claim, Ledger, Policy, RunRow, RunState, grid_key, shown_state
from .ledger.base import settled
from .notices import Notice
from .procs import ProcessRef
from .ranks import NPROC_ENV, WORLD_SIZE_POLICY_ENV, check_launchable
from .rollbacks import oom_attempts
from .runenv import ATTEMPT, MTBI, PARAMS, PRIOR_MTBI_S, RUN_DIR, RUN_ID, SWEEP
from .store import RunPaths
from .sweep import Sweep

__all__ = ["EXIT_UNSETTLED", "Events", "LaunchOptions", "LaunchResult", "Launcher"]

#: Parameters travel in the environment only while they are small: the kernel limits one
#: variable to 128 KiB ("Argument list too long"). Past this, the child reads params.json.
PARAMS_ENV_MAX_BYTES = 32 * 1024

#: A launcher stopped by its time limit or by `sweeprun stop` before the sweep was settled:
#: nothing failed, run the same command again (EX_TEMPFAIL, as a preempted run's exit).
EXIT_UNSETTLED = 75


@dataclass
class LaunchOptions:
    workers: int = 1
    gpus: Sequence[str] | None = None   # GPU indices lent to runs, nproc each (CUDA_VISIBLE_DEVICES)
    heartbeat_s: float | None = None    # default: a quarter of the lease
    poll_s: float = 1.0                 # how often an idle slot looks for work
    time_limit_s: float | None = None   # this worker must be gone after this many seconds
    #: The runs this worker may claim, by their ledger row (a SLURM lane); ``None``: every run.
    #: The worker exits once its runs are settled, whatever the others' state.
    takes: Callable[[RunRow], bool] | None = None
    #: A spot VM's termination notice to watch (``--notice``): on one, the runs save and the
    #: worker drains.
    notice: Notice | None = None

    @property
    def slots(self) -> int:
        return len(self.gpus) if self.gpus else self.workers


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
        self.policy = Policy(max_attempts=self.spec.max_attempts, max_lost=self.spec.max_lost,
                             oom_retries=self.spec.on_oom.retries)
        self.grid = grid_key(sweep.runs)
        self.me = ProcessRef.me()
        self.heartbeat_s = options.heartbeat_s or max(0.2, self.spec.lease_s / 4)
        self._active: dict[str, Attempt] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()      # no new claims; children asked to stop
        # Idle slots sleep on this until a run of this launcher ends or a stop comes: the
        # moment the sweep may have settled, or a run may be free again (a retry).
        self._news = threading.Condition()
        self._news_seen = 0
        self._finished = threading.Event()  # every slot has returned
        self._stop_signal: int | None = None
        self._stop_reason: str | None = None  # a stop without a signal: time limit, `sweeprun stop`
        self.warned = False                   # SIGUSR1 came (see _warned)
        self._signals: list[int] = []         # received, not yet acted on (see _take_signals)
        self.deadline = (Deadline.after(options.time_limit_s, self.spec.grace_s)
                         if options.time_limit_s else None)
        self._claims_closed_noted = False
        self.stop_requests = StopRequests(sweep.paths)
        # Leases in the store keep machines apart when their ledgers cannot see each other
        # (each machine's SQLite ledger); a shared ledger needs none. The store's record
        # agreed to this way in Sweep.prepare; a move away from it drains this launcher.
        self.coordination = sweep.coordination or Coordination.of(ledger)
        self.coordination_record = CoordinationRecord(sweep.paths)
        self.leases: StoreLeases | None = None
        if self.coordination.store_leases and settings.STORE_LEASES.get():
            settle_s, why = settle_default(sweep.store.fs, sweep.store.root)
            if self.spec.lease_settle_s is not None:
                settle_s = self.spec.lease_settle_s
            elif why:
                sweep.notes.append(
                    f"{why}: machines sharing it are kept apart by claim-then-confirm leases, "
                    f"{settle_s:g} s per claim (set `lease_settle_s:` in the sweep file). That holds "
                    "while the folder shows a write to every machine within that time; a bucket "
                    "or a PostgreSQL ledger (--ledger postgresql://...) guarantees it")
            # A settle wait ends early when the launcher is asked to stop (False: withdraw).
            self.leases = StoreLeases(sweep.store.fs, lease_s=self.spec.lease_s, settle_s=settle_s,
                                      worker=self.me, sleep=lambda s: not self._stop.wait(s))
        self._leases_lock = threading.Lock()
        self._elsewhere: dict[str, float] = {}  # run id -> when to look at its lease again
        self._lease_errors: dict[str, int] = {}  # run id -> store failures in a row taking its lease
        self._mtbi: tuple[float, float] | None = None  # (when read, seconds)
        self._kill_deadline: float | None = None
        self._errors: list[BaseException] = []
        self._started = 0
        # --gpus: each run takes its nproc indices together; a slot per index (no run takes less)
        check_launchable(self.spec, options.gpus)
        self.gpu_pool = GpuPool(options.gpus) if options.gpus else None
        self._gpus = threading.Condition()
        self._by_nproc: dict[int, list[str]] = {}  # nproc -> the runs that take that many
        if self.gpu_pool is not None:
            for run in sweep.runs:
                self._by_nproc.setdefault(self.spec.nproc_of(run), []).append(run.run_id)

    # -- public -----------------------------------------------------------------------

    def run(self) -> LaunchResult:
        """Run until every run of this grid is done or failed for good, or until SIGINT/SIGTERM."""
        for message in self.sweep.notes:
            self.events.note(message)
        if len(self.sweep.done_at_start) == len(self.sweep.runs):
            # Every run has its DONE in the store, which nothing undoes but a user's hand: the
            # commonest relaunch (the habit after a disconnect) needs no slot, claim or ledger read.
            return LaunchResult(exit_code=0, states={RunState.DONE.value: len(self.sweep.runs)})
        previous = self._install_signals()
        seen_stop = self.stop_requests.current()  # only a request made after this one stops us
        threads = [threading.Thread(target=self._slot, args=(i,), name=f"slot-{i}", daemon=True)
                   for i in range(self.options.slots)]
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        watch = threading.Thread(target=self._watch_stop_requests, args=(seen_stop,),
                                 name="stop-requests", daemon=True)
        notice = threading.Thread(target=self._watch_notice, args=(self.options.notice,),
                                  name="notice", daemon=True) if self.options.notice else None
        try:
            beat.start()
            watch.start()
            if notice is not None:
                notice.start()
            for t in threads:
                t.start()
            # The main thread never blocks on I/O: it enforces what must happen on time
            # even while the ledger or the store hangs.
            while alive := [t for t in threads if t.is_alive()]:
                alive[0].join(0.1)
                self._take_signals()
                self._enforce_leases()
                self._enforce_deadline()
                self._enforce_grace()
        finally:
            self._stop.set()
            self._finished.set()
            beat.join()
            watch.join(5)
            if notice is not None:
                notice.join(5)
            self._restore_signals(previous)
            self._take_signals()  # one that came as the slots ended still sets the exit code
        if self._errors:
            raise self._errors[0]
        try:
            now = self.ledger.now()
            rows: list | None = self.ledger.rows(self.grid, params=False)
        except SweeprunError:
            if not self.stopping:
                raise
            rows = None  # stopping while the ledger is unreachable: the exit code still says why
        states: dict[str, int] = {}
        for row in rows or []:
            state = shown_state(row, now, self.policy).value
            states[state] = states.get(state, 0) + 1
        if self._stop_signal is not None:
            code = 128 + self._stop_signal
        elif rows is None or not settled(rows, now, self.policy):
            code = EXIT_UNSETTLED  # stopped by a time limit or a stop request; runs remain
        else:
            code = 1 if states.get(RunState.FAILED.value) or states.get(RunState.DIVERGED.value) else 0
        return LaunchResult(exit_code=code, started=self._started, states=states)

    def request_stop(self, signum: int | None = signal.SIGTERM, reason: str | None = None) -> None:
        """Ask running children to checkpoint and exit; after ``grace_s`` they are killed.

        ``signum`` is the signal that asked (it sets the exit code); ``None`` with a
        ``reason`` is a stop without one (time limit, `sweeprun stop`). A second signal
        ends the grace at once; a signal after such a stop only sets the exit code, so a
        platform's SIGTERM at the deadline does not cut short the saves already running.
        """
        with self._lock:
            if signum is not None and self._stop_signal is not None:  # a second signal: no grace
                self._kill_deadline = time.monotonic()
                return
            already = self._stop_signal is not None or self._stop_reason is not None
            if signum is not None:
                self._stop_signal = signum
            else:
                self._stop_reason = self._stop_reason or reason or "stop requested"
            if already:
                return
            self._kill_deadline = time.monotonic() + self.spec.grace_s
            self._stop.set()
            active = list(self._active.values())
        self._tell_news()
        self.ledger.stop_waiting()
        why = f"{reason}: " if reason else ""
        self.events.note(f"stopping: {why}asking {len(active)} running run(s) to checkpoint and exit "
                         f"(grace {self.spec.grace_s:g} s)")
        for attempt in active:
            attempt.terminate()

    @property
    def stop_signal(self) -> int | None:
        """The signal that stopped this launcher (SIGINT, SIGTERM), if one did."""
        return self._stop_signal

    @property
    def stopping(self) -> bool:
        return self._stop_signal is not None or self._stop_reason is not None

    # -- threads ----------------------------------------------------------------------

    def _slot(self, slot: int) -> None:
        try:
            while not self._stop.is_set():
                if not self._claims_open():
                    return
                news = self._news_seen
                claim = self.ledger.claim(self.me, self.policy, self.spec.lease_s, self.grid,
                                          skip=self._held_elsewhere() | self._no_gpus_for() | self._not_mine())
                if claim is None:
                    if self._settled():
                        return
                    self._wait_for_news(news)
                    continue
                try:
                    Attempt(self, claim, slot).run()
                finally:
                    self._tell_news()
        except BaseException as exc:  # surfaced by run(); the other slots stop too
            if self.stopping and isinstance(exc, LedgerError):
                return  # the ledger is out of reach while stopping: the leases run out instead
            self._errors.append(exc)
            self.request_stop()

    def _wait_for_news(self, seen: int) -> None:
        """Sleep until an attempt of this launcher ends or a stop comes (nothing to claim now
        may be claimable then, or the sweep settled), at most ``poll_s``: runs elsewhere
        (other launchers, other machines) end without telling this one."""
        wait_s = self.options.poll_s
        now = time.monotonic()
        with self._leases_lock:  # ... or until a run passed over is due for its next look
            due = [at - now for at in self._elsewhere.values() if at > now]
        if due:
            wait_s = min(wait_s, min(due) + 0.01)
        with self._news:
            if self._news_seen == seen and not self._stop.is_set():
                self._news.wait(wait_s)

    def _tell_news(self) -> None:
        with self._news:
            self._news_seen += 1
            self._news.notify_all()

    def _not_mine(self) -> set[str]:
        """The runs another lane's workers take (:attr:`LaunchOptions.takes`): left unclaimed."""
        if self.options.takes is None:
            return set()
        return {r.run_id for r in self.ledger.rows(self.grid, params=False) if not self.options.takes(r)}

    def _settled(self) -> bool:
        """Nothing this worker may claim can make progress any more (see :func:`settled`)."""
        if self.options.takes is None:
            return self.ledger.settled(self.policy, self.grid)
        mine = [r for r in self.ledger.rows(self.grid, params=False) if self.options.takes(r)]
        return settled(mine, self.ledger.now(), self.policy)

    def _no_gpus_for(self) -> set[str]:
        """The runs this launcher's free GPUs cannot take now (``--gpus``): left unclaimed."""
        if self.gpu_pool is None:
            return set()
        with self._gpus:
            refused = [n for n in self._by_nproc if not self.gpu_pool.admits(n)]
        return {run_id for n in refused for run_id in self._by_nproc[n]}

    def take_gpus(self, attempt: Attempt) -> tuple[str, ...] | None:
        """Wait until ``attempt``'s run can have its ``nproc`` GPUs (see :mod:`sweeprun.gpus`);
        ``()`` without ``--gpus``; ``None`` when the launcher stops or the run's lease is lost
        meanwhile."""
        if self.gpu_pool is None:
            return ()
        key, told = attempt.claim.run_id, False
        with self._gpus:
            while True:
                if self.stopping or attempt.lost:
                    self.gpu_pool.withdraw(key)
                    return None
                got = self.gpu_pool.take(key, attempt.nproc)
                if got is not None:
                    return got
                if not told:
                    told = True
                    self.events.note(f"{key}: waiting for {attempt.nproc} GPUs ({len(self.gpu_pool.free)} "
                                     "free); smaller runs take a GPU meanwhile only if enough stay free for it")
                self._gpus.wait(self.heartbeat_s)

    def give_gpus(self, attempt: Attempt) -> None:
        assert self.gpu_pool is not None
        with self._gpus:
            self.gpu_pool.give_back(attempt.claim.run_id)
            self._gpus.notify_all()
        self._tell_news()

    def _held_elsewhere(self) -> set[str]:
        now = time.monotonic()
        with self._leases_lock:
            return {run_id for run_id, due in self._elsewhere.items() if due > now}

    def took_lease(self, run_id: str) -> None:
        """This launcher holds the run's store lease now: no more passing it over."""
        with self._leases_lock:
            self._elsewhere.pop(run_id, None)
            self._lease_errors.pop(run_id, None)

    def pass_over(self, run_id: str, store_failed: bool = False, due_s: float | None = None) -> None:
        """Claim other runs before this one for about a third of a lease (another machine
        holds it: a look that often takes a lost holder's run over soon after its lease),
        jittered so that idle machines do not look in step; longer and longer while the
        store keeps failing. ``due_s``: when the holder's beat, if it stays still, will have
        stood still for a lease by this launcher's clock: the look that can take the run
        over comes then, not up to a third of a lease later."""
        wait = self.spec.lease_s * random.uniform(0.25, 0.45)
        if due_s is not None and not store_failed:
            wait = min(wait, due_s + 0.02)
        with self._leases_lock:
            if store_failed:
                failures = self._lease_errors[run_id] = self._lease_errors.get(run_id, 0) + 1
                wait = max(wait, backoff_s(failures, cap_s=max(60.0, self.spec.lease_s)))
            else:
                self._lease_errors.pop(run_id, None)
            self._elsewhere[run_id] = time.monotonic() + wait

    def register(self, attempt: Attempt) -> bool:
        """Put ``attempt`` under the heartbeat from its claim on; ``False`` when stopping."""
        with self._lock:
            self._active[attempt.claim.run_id] = attempt
            return not self.stopping

    def unregister(self, attempt: Attempt) -> None:
        with self._lock:
            if self._active.get(attempt.claim.run_id) is attempt:
                del self._active[attempt.claim.run_id]

    def count_start(self) -> None:
        with self._lock:
            self._started += 1

    def _heartbeat_loop(self) -> None:
        """Renews every lease. An unexpected error must not silently end it (every lease would
        run out under running children): it stops the launcher, whose children save and exit."""
        try:
            while not self._finished.wait(self.heartbeat_s):
                with self._lock:
                    active = list(self._active.values())
                for attempt in active:
                    try:
                        attempt.renew()
                    except SweeprunError:
                        pass  # renew() reports its own failures and stops its child in time
                if getattr(self.events, "wants_progress", False):
                    self._report_progress(active)
        except BaseException as exc:
            self._errors.append(exc)
            self.request_stop()

    def _report_progress(self, active: list[Attempt]) -> None:
        for attempt in active:
            if attempt.lost:
                continue
            run_id = attempt.claim.run_id
            try:
                self.events.progress(run_id, *self.sweep.progress_of(run_id))
            except SweeprunError:
                pass  # progress is only shown; the store may be slow for a moment

    def _claims_open(self) -> bool:
        if self.deadline is None or time.monotonic() < self.deadline.claims_end:
            return True
        with self._lock:
            first, self._claims_closed_noted = not self._claims_closed_noted, True
        if first:
            self.events.note("time limit: no new runs from now on; running ones continue until "
                             f"{self.spec.grace_s:g} s before the limit, then checkpoint and exit")
        return False

    def _enforce_deadline(self) -> None:
        if self.deadline is not None and not self.stopping and time.monotonic() >= self.deadline.stop_at:
            self.request_stop(None, "time limit reached")

    def _enforce_leases(self) -> None:
        with self._lock:
            active = list(self._active.values())
        for attempt in active:
            attempt.check_lease()

    def _watch_stop_requests(self, seen: str | None) -> None:
        """Obey `sweeprun stop` from any machine: a request made after this launcher started;
        and a move of the sweep to another ledger (--move-ledger): workers coordinated the
        old way cannot see the new one's runs."""
        poll_s = stop_poll_s()
        while not self._finished.wait(poll_s):
            try:
                current = self.stop_requests.current()
                record = self.coordination_record.read()
            except SweeprunError:
                continue  # the store is unreachable for now; the runs' own writes will tell
            if current is not None and current != seen:
                self.request_stop(None, "`sweeprun stop` was run for this sweep")
                return
            if record is not None and not record.agrees(self.coordination):
                self.request_stop(None, f"the sweep was moved to {record.describe()}")
                return

    def _watch_notice(self, notice: Notice) -> None:
        """A spot VM's termination notice (:mod:`sweeprun.notices`): the runs save at once and
        the worker drains, exit 75; the next worker, anywhere, resumes them."""
        from .notices import POLL_S

        said = False
        while not self._finished.wait(POLL_S) and not self._stop.is_set():
            found = notice.check()
            if not notice.answered and not said:
                said = True  # watched all the same: the server may answer later
                self.events.note(f"--notice {notice.provider}: {notice.url} does not answer; a termination "
                                 "notice cannot be seen until it does (is this a VM of that provider?)")
            if found is not None:
                self.request_stop(None, f"termination notice ({found})")
                return

    def _enforce_grace(self) -> None:
        if self._kill_deadline is None or time.monotonic() < self._kill_deadline:
            return
        with self._lock:
            active = list(self._active.values())
        for attempt in active:
            attempt.kill()

    # -- the child's environment --------------------------------------------------------

    def command_of(self, claim: Claim, paths: RunPaths) -> tuple[list[str], dict[str, Any], int]:
        """The command and parameters the run's next attempt starts with, and how many of its
        attempts ran out of memory: after an OOM, with ``on_oom:`` retries, its ``halve:``
        parameters halved that many times (its id and folder stay; only what the script is
        given changes)."""
        run = self.sweep.runs_by_id[claim.run_id]
        retry = len(oom_attempts(paths)) if self.spec.on_oom.retries else 0
        if retry:
            run = replace(run, params=self.spec.on_oom.hinted(run.params, retry))
        return self.spec.argv(run, paths.url, claim.attempt), run.params, retry

    def env(self, claim: Claim, paths: RunPaths, gpus: tuple[str, ...] | None,
            params: dict[str, Any] | None = None, oom_retry: int = 0) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(PARAMS, None)
        env.update({RUN_DIR: paths.url, RUN_ID: claim.run_id, ATTEMPT: str(claim.attempt),
                    SWEEP: self.spec.name, "PYTHONUNBUFFERED": "1",
                    NPROC_ENV: str(self.spec.nproc_of(self.sweep.runs_by_id[claim.run_id])),
                    WORLD_SIZE_POLICY_ENV: self.spec.on_world_size_change})
        text = json.dumps(claim.params if params is None else params)
        if len(text.encode()) <= PARAMS_ENV_MAX_BYTES:
            env[PARAMS] = text
        if oom_retry:
            env[settings.OOM_RETRY.name] = str(oom_retry)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        if not settings.MTBI_S.present():  # a user's own figure wins
            mtbi = self._mtbi_s()
            if mtbi is not None:
                env[MTBI] = f"{mtbi:.0f}"
        return env

    def _mtbi_s(self) -> float | None:
        """This sweep's mean time between interruptions, from every attempt its ledger knows
        (read at most once a minute): what ``every_s="auto"`` spaces checkpoints by."""
        now = time.monotonic()
        with self._lock:
            if self._mtbi is not None and now - self._mtbi[0] < 60:
                return self._mtbi[1]
        try:
            mtbi = self.ledger.uptime().mtbi_s(PRIOR_MTBI_S)
        except SweeprunError:
            return None  # the run falls back to the prior
        with self._lock:
            self._mtbi = (now, mtbi)
        return mtbi

    # -- signals --------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, object]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, lambda s, _f: self._signals.append(s))
        return previous

    def _take_signals(self) -> None:
        """Act on the signals received, on the main thread's loop. A handler only queues its
        signal: it runs on the main thread between two bytecodes, maybe while that thread
        holds ``_lock`` (the grace and lease checks take it), which :meth:`request_stop` takes."""
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGUSR1:
                self._warned()
            else:
                self.request_stop(signum)

    def _warned(self) -> None:
        """SIGUSR1: a scheduler's warning before its time limit (SLURM's ``--signal``). The runs
        save and exit as for a stop request (exit 75), and a SIGTERM after it (the limit
        itself) does not cut their grace short."""
        self.warned = True
        self.request_stop(None, reason="SIGUSR1 received (a scheduler's warning before its time limit)")

    @staticmethod
    def _restore_signals(previous: dict[int, object]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

