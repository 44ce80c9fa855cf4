"""``launch --on slurm`` and the array task that runs the sweep's worker (see
:mod:`sweeprun.slurm`)."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import SpecError, StoreError, SweeprunError
from ..fleet import StopRequests
from ..ledger import RunRow, RunState, grid_key
from ..ledger.base import Verdict, judge
from ..ranks import check_launchable
from ..store import backend_for, create_only, native_path, read_json, remove, write_json
from ..sweep import Sweep
from .jobs import (
    SlurmError,
    active_jobs,
    available,
    cancel_pending,
    job_name,
    jobs_line,
    own_job,
    requeue,
    require,
    slurm_command,
)
from .spec import LANES, SlurmSpec, lane_of, switch_at

if TYPE_CHECKING:
    from ..ledger import Ledger
    from ..runner import Launcher, LaunchOptions, LaunchResult
    from ..spec import SweepSpec

__all__ = ["Submitted", "Task", "cancel", "launch_on_slurm", "plan", "runs_left", "scheduled", "status_line",
           "submit"]

#: Submissions a sweep's ``SLURM`` record keeps (the newest).
_RECORD_KEEP = 100
#: A submission marker older than this is one a killed submitter left: taken over.
_SUBMITTING_STALE_S = 120.0
#: A task that fails for a reason not in the sweep file (a store or ledger out of reach) is
#: requeued, up to this many restarts of its job, rather than leaving its runs to nobody.
MAX_RESTARTS_ON_ERROR = 10


# -- what to submit ---------------------------------------------------------------------------


@dataclass
class Submitted:
    """What one call of :func:`submit` did, for the launch's answer."""

    jobs: list[tuple[str, str, int]] = field(default_factory=list)   # (job id, lane, tasks)
    covered: dict[str, int] = field(default_factory=dict)              # lane -> tasks already there
    left: dict[str, int] = field(default_factory=dict)                 # lane -> runs not done
    busy: bool = False     # another submitter was at it (its marker): nothing was submitted


def plan(left: Mapping[str, int], active: Mapping[str, int], max_jobs: int, per_task: int = 1) -> dict[str, int]:
    """Tasks to submit per lane: a task per ``per_task`` runs left (the runs a task's GPUs
    hold at once), at most ``max_jobs`` tasks in all, less those SLURM already has. The
    fallback lane comes first: its runs are the ones the main partition keeps losing, or
    those a deadline is near for."""
    room = max_jobs
    out = {}
    for lane in ("fallback", "main"):
        want = min(math.ceil(left.get(lane, 0) / per_task), max(room, 0))
        have = active.get(lane, 0)
        out[lane] = max(0, want - have)
        room -= max(want, have)
    return out


def interruptions(row: RunRow) -> int:
    """A run's attempts that ended without finishing or failing it (preemptions, requeues,
    lost machines): its attempts, less its real failures (``max_attempts`` counts those) and
    the attempt that holds it now. The ledger rebuilds attempts from the store's records."""
    return max(0, row.attempts - row.failures - (1 if row.state is RunState.RUNNING else 0))


def runs_left(sweep: Sweep, rows: Sequence[RunRow], now: float, at: float | None = None) -> dict[str, int]:
    """Per lane, the runs that can still make progress (neither done nor failed for good);
    ``at``: the wall-clock time to place them by (the deadline, once it is the reason)."""
    left = dict.fromkeys(LANES, 0)
    spec = sweep.spec
    slurm = spec.slurm or SlurmSpec()
    for row in rows:
        if judge(row, now, sweep.policy) not in (Verdict.FINISHED, Verdict.EXHAUSTED):
            left[lane_of(interruptions(row), slurm.fallback, switch_at(spec.deadline, spec.grace_s), at)] += 1
    return left


def _store_ident(sweep: Sweep) -> str | None:
    """The sweep's id in its store (its jobs' names carry it); ``None``: never launched."""
    key = sweep.ledger_key(create=False)
    return None if key is None else key.rsplit("#", 1)[-1]


def _ident(sweep: Sweep) -> str:
    """:func:`_store_ident`, which must be there."""
    ident = _store_ident(sweep)
    if ident is None:
        raise SlurmError(f"the sweep {sweep.spec.name} has no id in its store {sweep.spec.store} yet: "
                         "launch it first")
    return ident


def _log_pattern(sweep: Sweep) -> str | None:
    """Where the tasks' own output goes: the sweep's ``slurm/`` folder when the store is a
    path (every node must see the store); else sbatch's default (the folder launch ran in)."""
    folder = native_path(sweep.store.fs, sweep.paths.slurm_logs)
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise SlurmError(f"cannot make {folder} for the tasks' output: {exc.strerror}") from None
    return os.path.join(folder.replace("%", "%%"), "%x_%A_%a.log")


def task_argv(sweep_file: str, lane: str, ident: str, stop_seen: str | None,
              overrides: Sequence[str]) -> list[str]:
    """A task's command: the sweep file (absolute: tasks start in the submitter's folder, but
    say it anyway), its lane, the sweep id its store must hold (a node that sees another
    store, or none, refuses rather than run the sweep again), and the stop request current
    at submission (a task that starts after a later one ends at once)."""
    return [sys.executable, "-m", "sweeprun", "slurm-task", os.path.abspath(sweep_file), "--lane", lane,
            f"--sweep-id={ident}", f"--stop-seen={stop_seen or 'none'}", *overrides]


def batch_script(argv: Sequence[str]) -> str:
    """The batch script: the task replaces the shell, so ``B:`` signals reach sweeprun itself."""
    return "#!/bin/bash\nexec " + " ".join(shlex.quote(a) for a in argv) + "\n"


def submit(sweep: Sweep, left: Mapping[str, int], sweep_file: str, overrides: Sequence[str] = (),
           env: Mapping[str, str] | None = None, exclude: str | None = None,
           stop_seen: str | None = None) -> Submitted:
    """Submit the array tasks the lanes' runs left need (:func:`plan`), one submitter at a
    time (:func:`_submitting`: two tasks ending together would each plan the whole need).
    ``exclude``: a task of this sweep that is ending and must not count (the caller);
    ``env``: variables the tasks get besides this process's (a ledger given on the command
    line travels there, never in the script where ``ps`` shows it)."""
    spec, ident = sweep.spec, _ident(sweep)
    slurm = spec.slurm or SlurmSpec()
    with _submitting(sweep) as mine:
        if not mine:
            return Submitted(left=dict(left), busy=True)
        jobs = [j for j in active_jobs(spec.name, ident) if j.id != exclude]
        active = {lane: sum(1 for j in jobs if j.lane == lane) for lane in LANES}
        result = Submitted(covered=active, left=dict(left))
        per_task = max(1, (slurm.gpus_per_run or 1) // spec.max_nproc()) if slurm.gpus_per_run else 1
        output = _log_pattern(sweep)
        for lane, tasks in plan(left, active, slurm.max_jobs, per_task).items():
            if tasks <= 0:
                continue
            options = ["--parsable", f"--job-name={job_name(spec.name, ident, lane)}", f"--array=0-{tasks - 1}",
                       "--requeue", "--open-mode=append", "--export=ALL", f"--chdir={os.getcwd()}"]
            if slurm.signal_s:
                options.append(f"--signal=B:USR1@{slurm.signal_s}")
            if output:
                options.append(f"--output={output}")
            out = slurm_command(["sbatch", *options, *slurm.options(lane)],
                                stdin=batch_script(task_argv(sweep_file, lane, ident, stop_seen, overrides)),
                                env=env)
            result.jobs.append((out.strip().split(";")[0], lane, tasks))
        if result.jobs:
            _remember(sweep, result)
    return result


@contextmanager
def _submitting(sweep: Sweep) -> Iterator[bool]:
    """``<sweep>/SLURM.submitting``, created only if absent, for the time of one submission:
    ``True`` when this process holds it. squeue then sbatch is no transaction; this keeps two
    submitters (tasks ending at once, two launches) from each adding the same tasks. A marker
    older than :data:`_SUBMITTING_STALE_S` was left by a killed submitter and is taken over."""
    path = sweep.paths.slurm_submitting
    fs = sweep.store.fs
    body = json.dumps({"at": time.time(), "by": f"{os.uname().nodename}:{os.getpid()}"}).encode()
    mine = create_only(fs, path, body)
    if not mine:
        try:
            found = read_json(fs, path)
            at = found.get("at") if isinstance(found, dict) else None
        except (StoreError, ValueError, RecursionError):
            at = None
        if not isinstance(at, (int, float)) or time.time() - at > _SUBMITTING_STALE_S:
            remove(fs, [path])
            mine = create_only(fs, path, body)
    try:
        yield mine
    finally:
        if mine:
            remove(fs, [path])


def _remember(sweep: Sweep, result: Submitted) -> None:
    """``<sweep>/SLURM``: the jobs submitted for the sweep, newest last (written under the
    submission marker, so by one submitter at a time). It tells ``status`` and ``stop`` on any
    machine to ask SLURM about the sweep, with or without a ``slurm:`` section."""
    path = sweep.paths.slurm_record
    try:
        found = read_json(sweep.store.fs, path)
    except (StoreError, ValueError, RecursionError):
        found = None
    jobs = found.get("jobs") if isinstance(found, dict) and isinstance(found.get("jobs"), list) else []
    jobs += [{"job": job, "lane": lane, "tasks": tasks, "submitted_at": time.time()}
             for job, lane, tasks in result.jobs]
    write_json(sweep.store.fs, path, {"jobs": jobs[-_RECORD_KEEP:]})


def describe(result: Submitted) -> list[str]:
    """The lines ``launch --on slurm`` (or an ending task) prints."""
    if result.busy:
        return ["another launch or task is submitting this sweep's jobs right now; nothing submitted"]
    lines = [f"submitted job {job} ({tasks} task(s), lane {lane})" for job, lane, tasks in result.jobs]
    left = ", ".join(f"{n} in lane {lane}" for lane, n in result.left.items() if n)
    covered = ", ".join(f"{n} in lane {lane}" for lane, n in result.covered.items() if n)
    lines.append(f"runs left: {left or 'none'}; tasks SLURM already had: {covered or 'none'}"
                 + ("" if result.jobs else "; nothing submitted"))
    return lines


# -- the commands ------------------------------------------------------------------------------


def launch_on_slurm(spec: SweepSpec, ledger: str | None, sweep_file: str, overrides: Sequence[str],
                    move_ledger: bool = False) -> list[str]:
    """``launch --on slurm``: submit what the sweep's runs left need; the lines to print.
    ``ledger``: the command line's ``--ledger``, which the tasks get in their environment."""
    check_launchable(spec, None)
    require("sbatch")
    require("squeue")
    sweep = Sweep(spec, ledger)
    led = sweep.prepare(move_ledger=move_ledger)
    try:
        if len(sweep.done_at_start) == len(sweep.runs):
            return [f"all {len(sweep.runs)} runs done; nothing submitted"]
        left = runs_left(sweep, led.rows(grid_key(sweep.runs), params=False), led.now())
    finally:
        led.close()
    if not any(left.values()):
        return [f"every run is done or failed for good; nothing submitted (`sweeprun status {sweep_file}`)"]
    env = {"SWEEPRUN_LEDGER": ledger} if ledger else None
    return describe(submit(sweep, left, sweep_file, overrides, env=env,
                           stop_seen=StopRequests(sweep.paths).current()))


def scheduled(sweep: Sweep) -> bool:
    """Whether ``status`` and ``stop`` should ask SLURM about the sweep's jobs: this machine has
    squeue, and the sweep has a ``slurm:`` section or was submitted to SLURM."""
    if not available("squeue"):
        return False
    return sweep.spec.slurm is not None or backend_for(sweep.store.fs).exists(sweep.paths.slurm_record)


def status_line(sweep: Sweep) -> str | None:
    """``status``'s line on the sweep's SLURM tasks; ``None`` for a sweep not on SLURM."""
    if not scheduled(sweep):
        return None
    ident = _store_ident(sweep)
    return "SLURM: the sweep was never launched" if ident is None else jobs_line(sweep.spec.name, ident)


def cancel(sweep: Sweep) -> str | None:
    """``stop``: cancel the sweep's pending tasks (the running ones drain, and a requeued one
    that starts later sees the stop and ends); what to print, ``None`` for a sweep not on SLURM."""
    if not available("squeue"):
        if backend_for(sweep.store.fs).exists(sweep.paths.slurm_record):
            return ("SLURM's commands are not on this machine: the sweep's pending tasks stay queued, "
                    "and each ends as it starts (run stop on the login node to cancel them)")
        return None
    ident = _store_ident(sweep) if scheduled(sweep) else None
    if ident is None:
        return None
    cancelled = cancel_pending(sweep.spec.name, ident)
    return f"cancelled {len(cancelled)} pending SLURM task(s)" + (f": {' '.join(cancelled)}" if cancelled else "")


# -- the task ------------------------------------------------------------------------------------


class Task:
    """One array task: claims the runs of its lane, requeues itself on SLURM's warning, and
    submits what the runs left need when its own lane is settled (see :mod:`sweeprun.slurm`)."""

    def __init__(self, spec: SweepSpec, lane: str, sweep_file: str, overrides: Sequence[str],
                 ident: str, stop_seen: str | None) -> None:
        if lane not in LANES:
            raise SpecError(f"--lane {lane!r}: a task's lane is main or fallback")
        self.spec, self.lane, self.sweep_file, self.overrides = spec, lane, sweep_file, list(overrides)
        self.ident, self.stop_seen = ident, stop_seen
        self.slurm: SlurmSpec = spec.slurm or SlurmSpec()
        self.job = own_job()
        self.switch_at = switch_at(spec.deadline, spec.grace_s)

    def gpus(self) -> str | None:
        """The GPUs SLURM gave this task (its ``--gres``), for the runs to take nproc each."""
        if not self.slurm.gpus_per_run:
            return None
        return os.environ.get("CUDA_VISIBLE_DEVICES") or None

    def takes(self, row: RunRow) -> bool:
        return lane_of(interruptions(row), self.slurm.fallback, self.switch_at) == self.lane

    def check(self, sweep: Sweep) -> str | None:
        """Before anything is written: why this task must not run (it exits 0 then), or
        ``None``. A store without the sweep's id (a node whose store path is its own disk)
        is refused: running there would run the sweep a second time."""
        found = _store_ident(sweep)
        if found != self.ident:
            raise SlurmError(f"this node sees the store {self.spec.store} without the sweep's id "
                             f"{self.ident[:8]}... ({'none' if found is None else 'another'}): every node "
                             "must see the same store (a shared path or a bucket)")
        if StopRequests(sweep.paths).current() != self.stop_seen:
            return "`sweeprun stop` was run for this sweep after this task was submitted: it ends"
        return None

    def begin(self, sweep: Sweep, ledger: Ledger, options: LaunchOptions) -> LaunchOptions:
        """The worker's options: this lane's runs, until the deadline for the main lane; and
        the runs of the other lane covered by tasks (a run that crossed into it)."""
        options.takes = self.takes
        if self.lane == "main" and self.spec.deadline is not None:
            remaining = self.spec.deadline - time.time()
            if remaining > 0:  # the runs save in time and the fallback lane takes them
                options.time_limit_s = remaining
        self._top_up(sweep, ledger, lanes={lane for lane in LANES if lane != self.lane})
        return options

    def end(self, sweep: Sweep, ledger: Ledger, launcher: Launcher, result: LaunchResult) -> int:
        """The task's exit code, after requeueing it or submitting the jobs the runs left need."""
        if StopRequests(sweep.paths).current() != self.stop_seen:
            return 0                      # `sweeprun stop`: the task ends and does not come back
        if launcher.stop_signal is not None:
            return result.exit_code       # SIGTERM: a preemption (SLURM requeues) or scancel
        if launcher.warned and self.job:  # SLURM's warning: the runs saved; back in the queue
            self._top_up(sweep, ledger, lanes={lane for lane in LANES if lane != self.lane})
            requeue(self.job)
            return 0
        # This lane is settled, or the deadline ended the main lane: the runs left go where
        # they belong from the switch on (a clock a moment behind would place them in main).
        at = None
        if self.lane == "main" and self.switch_at is not None and launcher.stopping:
            at = max(time.time(), self.switch_at)
        self._top_up(sweep, ledger, at=at)
        return 1 if result.exit_code == 1 else 0

    def failed(self, error: SweeprunError) -> int:
        """A store or ledger out of reach (not a mistake in the sweep file): requeue, a bounded
        number of times, so the task's runs are not left to nobody; the exit code."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if self.job is None or isinstance(error, SpecError) or restarts >= MAX_RESTARTS_ON_ERROR:
            return 2
        print(f"[sweeprun] {self.spec.name}: {error}; requeueing this task "
              f"(restart {restarts + 1} of at most {MAX_RESTARTS_ON_ERROR})", file=sys.stderr, flush=True)
        try:
            requeue(self.job)
        except SlurmError:
            return 2
        return 75

    def _top_up(self, sweep: Sweep, ledger: Ledger, lanes: set[str] | None = None,
                at: float | None = None) -> None:
        left = runs_left(sweep, ledger.rows(grid_key(sweep.runs), params=False), ledger.now(), at)
        if lanes is not None:
            left = {lane: n if lane in lanes else 0 for lane, n in left.items()}
        if not any(left.values()):
            return
        done = submit(sweep, left, self.sweep_file, self.overrides, exclude=self.job, stop_seen=self.stop_seen)
        if done.jobs:
            for line in describe(done):
                print(f"[sweeprun] {self.spec.name}: {line}", flush=True)
