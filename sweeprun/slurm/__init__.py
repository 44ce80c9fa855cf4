"""Sweeps on SLURM: ``launch --on slurm`` submits requeueable array jobs whose tasks run the
sweep's worker, and the sweep keeps going on the machines the scheduler hands out.

- Each array task runs one worker (``sweeprun slurm-task``, exec'd by the batch script so
  that SLURM's ``B:`` signals reach it); the ledger's claims hand it runs, the leases fence
  a requeued task from a run another still holds.
- SLURM's warning before the time limit (``--signal=B:USR1@signal_s``) has the worker's runs
  checkpoint and exit 75, and the task requeues itself; a preemption (SIGTERM to every
  process of the job, the requeue done by SLURM itself) saves the same way. A plain
  ``scancel`` (SIGTERM too) is obeyed: the runs save and the task does not come back.
- Two lanes: ``main`` (the ``slurm:`` section's partition and QoS) and ``fallback`` (its
  ``fallback:`` partition or QoS). A run interrupted ``after_interruptions`` times (its
  attempts, a count the store keeps across relaunches and ledger rebuilds), or any run
  left at the sweep's ``deadline:``, belongs to the fallback lane; each task claims only
  from its own lane, and a task that ends its lane while the other has runs left submits
  the jobs they need (:func:`submit`), so a sweep never waits for a person.
- Running ``launch --on slurm`` again submits only what is missing: a lane's runs left,
  at most ``max_jobs`` tasks, less the tasks of the sweep SLURM already has (pending,
  running, completing or requeued: a preempted job shows as COMPLETING before its
  requeue, and counting it keeps a relaunch from adding one).

Why ``sbatch`` and not submitit: submitit pickles a Python callable for each job, so its
command-line jobs are not requeued on timeout (submitit #1732) and a requeued job runs
the pickle of the submitting interpreter; sweeprun's task is a command line that reads
the sweep file and the ledger afresh, which plain ``sbatch`` with its documented options
(``--requeue``, ``--signal``, ``--array``, ``--open-mode=append``) does directly.
"""

from .jobs import (
    Job,
    SlurmError,
    active_jobs,
    available,
    cancel_pending,
    job_label,
    job_name,
    jobs_line,
    own_job,
    requeue,
)
from .spec import LANES, Fallback, SlurmSpec, lane_of, parse_deadline, parse_slurm, switch_at

__all__ = ["Fallback", "Job", "LANES", "SlurmError", "SlurmSpec", "active_jobs", "available", "cancel_pending",
           "job_label", "job_name", "jobs_line", "lane_of", "own_job", "parse_deadline", "parse_slurm",
           "requeue", "switch_at"]
