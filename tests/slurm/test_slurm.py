"""``sweeprun launch --on slurm`` against a real SLURM cluster on this machine (one node, a
preemptable ``spot`` partition and an ``ondemand`` one above it: tests/_slurm_cluster.py).

The faults are SLURM's own: its warning before a time limit (``scancel --signal=USR1
--batch``, what ``--signal=B:USR1@N`` sends), ``scontrol requeue``, and an ``ondemand`` job
that preempts the sweep's tasks. Every run ends done, never two processes on one run, its
metrics exactly those of a plain local launch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import _slurm_cluster
from conftest import REPO, STEPS_SCRIPT, Sandbox, wait_for


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    return _slurm_cluster.start()["SLURM_CONF"]


@pytest.fixture
def cluster(slurm_conf: str) -> Iterator[dict[str, str]]:
    """The environment that reaches the test cluster (``SLURM_CONF``), started if needed; the
    test's jobs are cancelled after it, whatever its outcome."""
    yield {"SLURM_CONF": slurm_conf}
    _slurm_cluster.cancel_all()


def sweep_file(sandbox: Sandbox, seeds: list[int], steps: int, slurm: dict[str, Any] | None,
               exact: bool = False, **extra: Any) -> Path:
    """A sweep of ``seeds`` runs of ``steps`` steps of 0.15 s (tests/scripts/steps.py): through
    the training API with a seeded RNG when ``exact`` (exact or not), else with its own JSON
    checkpoint (no torch to load: the tests of where and when runs go)."""
    # a name of its own per test: squeue finds a sweep's jobs by it, and the cluster outlives tests
    return sandbox.write_sweep({"seed": seeds}, {"steps": steps, "sleep": 0.15, "api": exact},
                               name=f"s{uuid.uuid4().hex[:6]}", grace_s=extra.pop("grace_s", 50),
                               command=f"{sys.executable} {STEPS_SCRIPT} --x 1",
                               **({"slurm": slurm} if slurm else {}), **extra)


def squeue(name: str) -> list[tuple[str, str, str]]:
    """``(task id, state, partition)`` of every task SLURM still has of the sweep ``name``."""
    out = _slurm_cluster.run("squeue", "-h", "-r", "-o", "%i|%j|%T|%P").stdout
    return [(i, state, part) for i, job, state, part in (line.split("|") for line in out.splitlines())
            if job.startswith(f"sweeprun-{name}-")]


def running(name: str) -> list[str]:
    """The sweep's running tasks, each by the id that reaches it alone: its own job id, unless
    that is the array's (then ``ARRAY_TASK``; the array's id would reach every task)."""
    out = _slurm_cluster.run("squeue", "-h", "-r", "-t", "RUNNING", "-o", "%i|%A|%j").stdout
    found = []
    for task, raw, job in (line.split("|") for line in out.splitlines()):
        if job.startswith(f"sweeprun-{name}-"):
            found.append(task if raw == task.split("_")[0] else raw)
    return sorted(found)


def warn(task: str) -> None:
    """SLURM's warning (USR1) to a task's batch shell. scancel delivers it at once, then, for an
    array with pending tasks, retries for half a minute ("Job is in transitional state", SLURM
    22.05), re-sending it: stopped after two seconds."""
    try:
        _slurm_cluster.run("scancel", "--signal=USR1", "--batch", task, check=False, timeout=2)
    except subprocess.TimeoutExpired:
        pass


def requeue(task: str) -> None:
    """``scontrol requeue``, retried while SLURM answers that the job is in transition."""
    for _ in range(10):
        if _slurm_cluster.run("scontrol", "requeue", task, check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"scontrol requeue {task} kept failing")


def resumed(sandbox: Sandbox) -> list[dict[str, Any]]:
    """The starts of interrupted runs, each from its checkpoint."""
    return [e for e in events(sandbox, "start") if e["from_step"] > 0]


def events(sandbox: Sandbox, kind: str) -> list[dict[str, Any]]:
    return [e for e in sandbox.events() if e["event"] == kind]


def metrics(store: Path, name: str) -> dict[str, list[dict[str, Any]]]:
    """Each run's logged lines, by its params (a run id is the same in any store)."""
    out = {}
    for params in (store / name / "runs").glob("*/params.json"):
        lines = (params.parent / "metrics.jsonl").read_text().splitlines()
        out[params.read_text()] = [{k: v for k, v in json.loads(line).items() if k in ("step", "loss")}
                                   for line in lines]
    return out


def submitted(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"submitted job (\d+) ", result.stdout)


@pytest.mark.slow  # every test here waits on a real SLURM: ~1 to 2 minutes each
def test_a_sweep_on_slurm_ends_exact_through_requeues_warnings_and_preemption(
        sandbox: Sandbox, cluster: dict[str, str]) -> None:
    """No ``slurm:`` section: SLURM's defaults (the default partition, four tasks at most)."""
    sweep = sweep_file(sandbox, [1, 2, 3, 4], steps=60, slurm=None, exact=True)
    name = sweep.stem
    (job,) = submitted(sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster))

    again = sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster)
    assert submitted(again) == [], "four tasks already cover the sweep"
    assert "tasks SLURM already had: 4 in lane main; nothing submitted" in again.stdout
    table = sandbox.run("status", str(sweep), env=cluster).stdout
    assert "SLURM: " in table and f"{job}_0 (main, spot)" in table, "the sweep's tasks, by state"

    wait_for(lambda: len(events(sandbox, "first_step")) >= 2, timeout=120, what="two tasks training")
    first, second = running(name)[:2]
    warn(first)       # SLURM's warning before a time limit: the task requeues itself
    requeue(second)   # scontrol requeue: SIGTERM to the job, SLURM requeues it
    wait_for(lambda: len(resumed(sandbox)) >= 2, timeout=120, what="both interrupted runs resumed")
    # an ondemand job takes every CPU: the spot tasks are preempted (SIGTERM) and requeued
    _slurm_cluster.run("sbatch", "--partition=ondemand", f"--cpus-per-task={_cpus()}", "--wrap", "sleep 3",
                       "--output=/dev/null")
    wait_for(lambda: len(resumed(sandbox)) >= 3, timeout=120, what="a preempted run resumed")

    wait_for(lambda: not squeue(name), timeout=300, poll_s=0.5, what="the sweep's tasks to end")
    status = sandbox.status(sweep)
    assert {row["state"] for row in status.values()} == {"done"}, status
    assert events(sandbox, "overlap") == [], "never two processes on one run"
    assert max(row["attempts"] for row in status.values()) >= 2

    reference = sandbox.root / "reference"
    local = sandbox.run("launch", str(sweep), "--store", str(reference), "--workers", "2", timeout=180)
    assert local.returncode == 0, local.stdout + local.stderr
    assert metrics(sandbox.store, name) == metrics(reference, name), "exact against a plain local launch"

    after = sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster)
    assert submitted(after) == [] and "all 4 runs done; nothing submitted" in after.stdout


@pytest.mark.slow
def test_a_run_interrupted_too_often_finishes_on_the_fallback_partition(
        sandbox: Sandbox, cluster: dict[str, str]) -> None:
    sweep = sweep_file(sandbox, [7], steps=30, slurm={
        "partition": "spot", "fallback": {"partition": "ondemand", "after_interruptions": 1}})
    (job,) = submitted(sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster))
    wait_for(lambda: events(sandbox, "start"), timeout=120, what="the run training")
    requeue(f"{job}_0")  # the run saves the step it is in (steps.py), and exits 75

    wait_for(lambda: not squeue(sweep.stem), timeout=180, poll_s=0.5, what="the sweep's tasks to end")
    (row,) = sandbox.status(sweep).values()
    assert row["state"] == "done"
    starts = events(sandbox, "start")
    assert [e["partition"] for e in starts] == ["spot", "ondemand"], starts
    assert starts[1]["from_step"] > 0, "it continued from its checkpoint on the fallback partition"


@pytest.mark.slow
def test_status_names_each_running_runs_job_and_stop_leaves_no_job(
        sandbox: Sandbox, cluster: dict[str, str]) -> None:
    """A task takes every CPU, so the second waits: one running, one pending. A stop from a
    machine without SLURM's commands cannot cancel the pending task: it ends as it starts."""
    sweep = sweep_file(sandbox, [1, 2], steps=400, slurm={"partition": "spot", "cpus_per_task": _cpus()})
    name = sweep.stem
    (job,) = submitted(sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster))
    wait_for(lambda: events(sandbox, "start"), timeout=120, what="a run training")
    running = [row for row in sandbox.status(sweep).values() if row["state"] == "running"]
    assert [row["job"] for row in running] == [f"slurm {job}_0 on spot"], running
    table = sandbox.run("status", str(sweep), env=cluster)
    assert f"SLURM: 1 running: {job}_0 (main, spot); 1 pending: {job}_1 (main, spot)" in table.stdout

    blind = sandbox.run("stop", str(sweep), env={**cluster, "PATH": "/nonexistent"})
    assert blind.returncode == 0, blind.stderr
    assert "SLURM's commands are not on this machine: the sweep's pending tasks stay queued" in blind.stdout
    wait_for(lambda: not squeue(name), timeout=120, poll_s=0.5, what="no task of the sweep left")
    assert len(events(sandbox, "start")) == 1, "the task that started after the stop ran nothing"
    (held,) = [row for row in sandbox.status(sweep).values() if row["attempts"]]
    assert held["state"] == "interrupted" and held["step"] > 0, held
    assert (sandbox.store / name / "runs" / held["run_id"] / "ckpt.json").exists(), "its checkpoint kept"

    (again,) = submitted(sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster))
    wait_for(lambda: len(events(sandbox, "start")) == 2, timeout=120, what="the sweep going again")
    assert events(sandbox, "start")[1]["from_step"] > 0, "resumed from the checkpoint the stop left"
    stopped = sandbox.run("stop", str(sweep), env=cluster)
    assert f"cancelled 1 pending SLURM task(s): {again}_1" in stopped.stdout, stopped.stdout + stopped.stderr
    wait_for(lambda: not squeue(name), timeout=120, poll_s=0.5, what="no task of the sweep left")


@pytest.mark.slow
def test_at_the_deadline_the_runs_left_save_and_finish_on_the_fallback(
        sandbox: Sandbox, cluster: dict[str, str]) -> None:
    deadline = datetime.now(timezone.utc) + timedelta(seconds=25)
    sweep = sweep_file(sandbox, [1, 2], steps=300, grace_s=8, deadline=deadline.isoformat(), slurm={
        "partition": "spot", "fallback": {"partition": "ondemand", "after_interruptions": 5}})
    submitted(sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster))
    wait_for(lambda: not squeue(sweep.stem) and all(
        row["state"] == "done" for row in sandbox.status(sweep).values()),
        timeout=300, poll_s=1, what="the sweep done and its tasks ended")
    starts = events(sandbox, "start")
    assert {e["partition"] for e in starts if e["from_step"] == 0} == {"spot"}, starts
    resumed = [e for e in starts if e["from_step"] > 0]
    assert {e["partition"] for e in resumed} == {"ondemand"} and len(resumed) == 2, \
        "both runs saved at the deadline and went on on the fallback partition"
    assert all(e["at"] >= deadline.timestamp() - 8 for e in resumed), "not before the switch"


@pytest.mark.slow
def test_a_run_of_two_ranks_starts_them_together_in_one_task(sandbox: Sandbox, cluster: dict[str, str]) -> None:
    """``nproc: 2``: the run's ranks start through torchrun inside the task SLURM gave the CPUs
    for both (gloo on CPU here; ``gpus_per_run`` gives each task its GPUs)."""
    sweep = sandbox.write_sweep({"world": [2]}, {"steps": 5}, name=f"s{uuid.uuid4().hex[:6]}",
                                command=f"{sys.executable} {REPO / 'tests' / 'scripts' / 'ranks.py'}",
                                nproc="{world}", slurm={"partition": "spot", "cpus_per_task": 2})
    (job,) = submitted(sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster))
    wait_for(lambda: not squeue(sweep.stem), timeout=180, poll_s=0.5, what="the sweep's task to end")
    (row,) = sandbox.status(sweep).values()
    assert row["state"] == "done" and row["nproc"] == 2, row
    starts = [e for e in sandbox.events() if e["event"] == "start"]
    assert sorted(e["rank"] for e in starts) == [0, 1]
    assert {e["env"]["WORLD_SIZE"] for e in starts} == {"2"}


def _cpus() -> int:
    import os

    return os.cpu_count() or 2
