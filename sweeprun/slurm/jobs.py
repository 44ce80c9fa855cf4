"""SLURM's own commands, as sweeprun uses them: squeue to find a sweep's tasks, scancel,
scontrol requeue, and who this task is (see :mod:`sweeprun.slurm`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import SweeprunError
from .spec import LANES

__all__ = ["Job", "SlurmError", "active_jobs", "available", "cancel_pending", "job_label", "job_name",
           "jobs_line", "own_job", "require", "requeue", "slurm_command"]

#: squeue's states of a job that will still run, or is being requeued (see :mod:`sweeprun.slurm`).
_ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
           "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD")
_COMMAND_TIMEOUT_S = 60.0


class SlurmError(SweeprunError):
    """SLURM's commands are missing, or one of them refused (its message is in this one)."""


def available(command: str) -> bool:
    """Whether this machine has SLURM's ``command`` on the PATH."""
    return shutil.which(command) is not None


def require(command: str) -> None:
    """A :class:`SlurmError` that says where to run sweeprun, when ``command`` is not here."""
    if not available(command):
        raise SlurmError(f"{command} is not on the PATH: --on slurm runs on a SLURM login node "
                         "(or a machine with SLURM's commands and its configuration)")


def slurm_command(argv: Sequence[str], stdin: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run one of SLURM's commands; its output. A failure is a :class:`SlurmError` with its
    message; ``env``: variables added to this process's (sbatch passes them to the job)."""
    require(argv[0])
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                              timeout=_COMMAND_TIMEOUT_S, check=False,
                              env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]} did not answer within {_COMMAND_TIMEOUT_S:g} s: is slurmctld "
                         "reachable?") from None
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split()) or f"exit {done.returncode}"
        raise SlurmError(f"{' '.join(argv[:2])} failed: {said}")
    return done.stdout


def job_name(sweep: str, ident: str, lane: str) -> str:
    """The jobs of one sweep in one store, by lane: what squeue finds them by."""
    return f"sweeprun-{sweep}-{ident[-8:]}-{lane}"


@dataclass(frozen=True)
class Job:
    """One array task as squeue lists it (``-r``: one line per task)."""

    id: str          # "123_4", or "123" for a job that is no array
    lane: str
    state: str
    partition: str

    @property
    def pending(self) -> bool:
        return self.state == "PENDING"


def active_jobs(sweep: str, ident: str) -> list[Job]:
    """The tasks of this sweep that SLURM still has (see :data:`_ACTIVE`)."""
    names = {job_name(sweep, ident, lane): lane for lane in LANES}
    out = slurm_command(["squeue", "-h", "-r", "-n", ",".join(names), "-t", ",".join(_ACTIVE),
                    "-o", "%i|%j|%T|%P"])
    jobs = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[1] in names:
            jobs.append(Job(id=parts[0], lane=names[parts[1]], state=parts[2], partition=parts[3]))
    return jobs


def jobs_line(sweep: str, ident: str | None) -> str:
    """``status``'s line on the sweep's SLURM tasks (a failing squeue is said, not raised)."""
    if ident is None:
        return "SLURM: the sweep was never launched"
    try:
        jobs = active_jobs(sweep, ident)
    except SlurmError as exc:
        return f"SLURM: {exc}"
    if not jobs:
        return "SLURM: no task of this sweep is pending or running"
    by_state: dict[str, list[str]] = {}
    for job in jobs:
        by_state.setdefault(job.state.lower(), []).append(f"{job.id} ({job.lane}, {job.partition})")
    order = sorted(by_state, key=lambda state: (state != "running", state != "pending", state))
    return "SLURM: " + "; ".join(f"{len(by_state[s])} {s}: {', '.join(by_state[s])}" for s in order)


def cancel_pending(sweep: str, ident: str) -> list[str]:
    """Cancel the sweep's tasks that have not started; the running ones drain (``sweeprun stop``)."""
    pending = [j.id for j in active_jobs(sweep, ident) if j.pending]
    if pending:
        slurm_command(["scancel", *pending])
    return pending


def own_job() -> str | None:
    """This process's SLURM task, as squeue and scontrol address it (``ARRAY_TASK``: a task's
    own job id can equal its array's, which would address the whole array)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def job_label() -> str | None:
    """This task as ``status`` shows it: ``slurm 123_4 on spot``; ``None`` outside SLURM."""
    job = own_job()
    if job is None:
        return None
    partition = os.environ.get("SLURM_JOB_PARTITION")
    return f"slurm {job}" + (f" on {partition}" if partition else "")


def requeue(job: str, tries: int = 5) -> None:
    """``scontrol requeue`` this task; SLURM sometimes answers a task already on its way with
    "Job is pending execution" for a moment (retried)."""
    for attempt in range(tries):
        try:
            slurm_command(["scontrol", "requeue", job])
            return
        except SlurmError:
            if attempt == tries - 1:
                raise
            time.sleep(1.0)
