"""``launch --on slurm`` and the array task that runs the sweep's worker (see
:mod:`sweeprun.slurm`)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError
from ..fleet import StopRequests
from ..ledger import Policy, RunState, grid_key
from ..ledger.base import Verdict, judge
from ..ranks import check_launchable
from ..store import native_path
from ..sweep import Sweep
from .jobs import SlurmError, active_jobs, available, job_name, own_job, requeue, slurm_command
from .spec import LANES, SlurmSpec, lane_of

__all__ = ["Submitted", "Task", "launch_on_slurm", "plan", "runs_left", "submit"]


# -- submitting ------------------------------------------------------------------------------


@dataclass
class Submitted:
    """What one call of :func:`submit` did, for the launch's one-line answer."""

    jobs: list[tuple[str, str, int]] = field(default_factory=list)   # (job id, lane, tasks)
    covered: dict[str, int] = field(default_factory=dict)              # lane -> tasks already there
    left: dict[str, int] = field(default_factory=dict)                 # lane -> runs not done


def plan(left: Mapping[str, int], active: Mapping[str, int], max_jobs: int) -> dict[str, int]:
    """Tasks to submit per lane: each lane gets a task per run left, up to ``max_jobs`` tasks
    in all, less those SLURM already has. The fallback lane comes first: its runs are those
    the main partition keeps losing, or those a deadline is near for."""
    room = max_jobs
    out = {}
    for lane in ("fallback", "main"):
        want = min(left.get(lane, 0), room)
        room -= max(want, active.get(lane, 0))
        out[lane] = max(0, want - active.get(lane, 0))
        room = max(room, 0)
    return out


def batch_script(argv: Sequence[str]) -> str:
    """The batch script: the task replaces the shell, so ``B:`` signals reach sweeprun itself."""
    return "#!/bin/bash\nexec " + " ".join(shlex.quote(a) for a in argv) + "\n"


def task_argv(sweep_file: str, lane: str, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "sweeprun", "slurm-task", os.path.abspath(sweep_file),
            "--lane", lane, *overrides]


def submit(spec: Any, ident: str, left: Mapping[str, int], sweep_file: str,
           overrides: Sequence[str] = (), output: str | None = None,
           exclude: str | None = None) -> Submitted:
    """Submit the array tasks the lanes' runs left need (:func:`plan`); ``exclude``: a task
    of this sweep that is ending and must not count (the task that calls this)."""
    slurm: SlurmSpec = spec.slurm or SlurmSpec()
    jobs = [j for j in active_jobs(spec.name, ident) if j.id != exclude]
    active = {lane: sum(1 for j in jobs if j.lane == lane) for lane in LANES}
    result = Submitted(covered=active, left=dict(left))
    for lane, tasks in plan(left, active, slurm.max_jobs).items():
        if tasks <= 0:
            continue
        options = ["--parsable", f"--job-name={job_name(spec.name, ident, lane)}", f"--array=0-{tasks - 1}",
                   "--requeue", "--open-mode=append", f"--chdir={os.getcwd()}"]
        if slurm.signal_s:
            options.append(f"--signal=B:USR1@{slurm.signal_s}")
        if output:
            options.append(f"--output={output}")
        out = slurm_command(["sbatch", *options, *slurm.options(lane)],
                       stdin=batch_script(task_argv(sweep_file, lane, overrides)))
        result.jobs.append((out.strip().split(";")[0], lane, tasks))
    return result


# -- the lanes' runs, the launch, the task -----------------------------------------------------


def interruptions(row: Any) -> int:
    """A run's attempts that ended without finishing it: its attempts so far, the one that
    holds it now aside (the ledger rebuilds the count from the store's attempt records)."""
    return max(0, row.attempts - (1 if row.state is RunState.RUNNING else 0))


def runs_left(spec: Any, rows: Sequence[Any], now: float, policy: Any) -> dict[str, int]:
    """Per lane, the runs that can still make progress (neither done nor failed for good)."""
    left = dict.fromkeys(LANES, 0)
    slurm = spec.slurm or SlurmSpec()
    for row in rows:
        if judge(row, now, policy) not in (Verdict.FINISHED, Verdict.EXHAUSTED):
            left[lane_of(interruptions(row), slurm.fallback, spec.deadline)] += 1
    return left


def _log_pattern(sweep: Any) -> str | None:
    """Where the tasks' own output goes: the sweep's ``slurm/`` folder when the store is a
    path every node sees; else sbatch's default (the folder ``launch`` ran in)."""
    folder = native_path(sweep.store.fs, sweep.paths.slurm_logs)
    if folder is None:
        return None
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, "%x_%A_%a.log")


def launch_on_slurm(spec: Any, ledger: str | None, sweep_file: str, overrides: Sequence[str],
                    move_ledger: bool = False) -> list[str]:
    """``launch --on slurm``: submit what the sweep's runs left need; lines to print."""
    check_launchable(spec, None)
    if not available():
        slurm_command(["sbatch"])  # the one error that says what is missing
    sweep = Sweep(spec, ledger)
    led = sweep.prepare(move_ledger=move_ledger)
    try:
        if len(sweep.done_at_start) == len(sweep.runs):
            return [f"all {len(sweep.runs)} runs done; nothing submitted"]
        policy = Policy(max_attempts=spec.max_attempts, max_lost=spec.max_lost)
        left = runs_left(spec, led.rows(grid_key(sweep.runs), params=False), led.now(), policy)
        ident = _ident(sweep)
    finally:
        led.close()
    if not any(left.values()):
        return [f"every run is done or failed for good; nothing submitted (`sweeprun status {sweep_file}`)"]
    result = submit(spec, ident, left, sweep_file, overrides, output=_log_pattern(sweep))
    return describe(result)


def describe(result: Submitted) -> list[str]:
    lines = [f"submitted job {job} ({tasks} task(s), lane {lane})" for job, lane, tasks in result.jobs]
    left = ", ".join(f"{n} in lane {lane}" for lane, n in result.left.items() if n)
    covered = ", ".join(f"{n} in lane {lane}" for lane, n in result.covered.items() if n)
    lines.append(f"runs left: {left or 'none'}; tasks SLURM already had: {covered or 'none'}"
                 + ("" if result.jobs else "; nothing submitted"))
    return lines


def _ident(sweep: Any) -> str:
    key = sweep.ledger_key(create=False)
    if key is None:
        raise SlurmError(f"the sweep {sweep.spec.name} has no id in its store yet: launch it first")
    return key.rsplit("#", 1)[-1]


class Task:
    """One array task: claims the runs of its lane, requeues itself on SLURM's warning, and
    submits what the other lane needs when its own runs are settled."""

    def __init__(self, spec: Any, lane: str, sweep_file: str, overrides: Sequence[str]) -> None:
        if lane not in LANES:
            raise SpecError(f"--lane {lane!r}: a task's lane is main or fallback")
        self.spec, self.lane, self.sweep_file, self.overrides = spec, lane, sweep_file, list(overrides)
        self.slurm: SlurmSpec = spec.slurm or SlurmSpec()
        self.job = own_job()
        self.stop_seen: str | None = None

    def gpus(self) -> str | None:
        """The GPUs SLURM gave this task (its ``--gres``), for the runs to take nproc each."""
        if not self.slurm.gpus_per_run:
            return None
        return os.environ.get("CUDA_VISIBLE_DEVICES") or None

    def takes(self, row: Any) -> bool:
        return lane_of(interruptions(row), self.slurm.fallback, self.spec.deadline) == self.lane

    def begin(self, sweep: Any, options: Any) -> Any:
        self.stop_seen = StopRequests(sweep.paths).current()
        options.takes = self.takes
        if self.lane == "main" and self.spec.deadline is not None:
            remaining = self.spec.deadline - time.time()
            if remaining > 0:  # the runs save in time and the fallback lane takes them
                options.time_limit_s = remaining
        return options

    def end(self, sweep: Any, ledger: Any, launcher: Any, result: Any) -> int:
        """The task's exit code, after requeueing it or submitting the jobs the runs left need."""

        if StopRequests(sweep.paths).current() != self.stop_seen:
            return 0                      # `sweeprun stop`: the task ends and does not come back
        if launcher.warned and self.job:
            requeue(self.job)             # SLURM's warning: the runs saved; back in the queue
            return 0
        if launcher.stop_signal is not None:
            return result.exit_code       # SIGTERM: a preemption (SLURM requeues) or scancel
        policy = Policy(max_attempts=self.spec.max_attempts, max_lost=self.spec.max_lost)
        left = runs_left(self.spec, ledger.rows(grid_key(sweep.runs), params=False), ledger.now(), policy)
        if any(left.values()):            # this lane is settled, or its deadline came
            done = submit(self.spec, _ident(sweep), left, self.sweep_file, self.overrides,
                          output=_log_pattern(sweep), exclude=self.job)
            for line in describe(done):
                print(f"[sweeprun] {self.spec.name}: {line}", flush=True)
        return 1 if result.exit_code == 1 else 0
