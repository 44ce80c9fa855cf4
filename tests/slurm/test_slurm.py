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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _slurm_cluster
from conftest import REPO, Sandbox, wait_for

SCRIPT = REPO / "tests" / "scripts" / "rng_steps.py"


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    return _slurm_cluster.start()["SLURM_CONF"]


@pytest.fixture
def cluster(slurm_conf: str) -> Iterator[dict[str, str]]:
    """The environment that reaches the test cluster (``SLURM_CONF``), started if needed; the
    test's jobs are cancelled after it, whatever its outcome."""
    yield {"SLURM_CONF": slurm_conf}
    _slurm_cluster.cancel_all()


def sweep_file(sandbox: Sandbox, seeds: list[int], steps: int, slurm: dict[str, Any], **extra: Any) -> Path:
    # a name of its own per test: squeue finds a sweep's jobs by it, and the cluster outlives tests
    return sandbox.write_sweep({"seed": seeds}, name=f"s{uuid.uuid4().hex[:6]}", grace_s=50,
                               command=f"{sys.executable} {SCRIPT} --steps {steps} --sleep 0.15 --seed {{seed}}",
                               slurm=slurm, **extra)


def squeue(name: str) -> list[tuple[str, str, str]]:
    """``(task id, state, partition)`` of every task SLURM still has of the sweep ``name``."""
    out = _slurm_cluster.run("squeue", "-h", "-r", "-o", "%i|%j|%T|%P").stdout
    return [(i, state, part) for i, job, state, part in (line.split("|") for line in out.splitlines())
            if job.startswith(f"sweeprun-{name}-")]


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


def test_a_sweep_on_slurm_ends_exact_through_requeues_warnings_and_preemption(
        sandbox: Sandbox, cluster: dict[str, str]) -> None:
    sweep = sweep_file(sandbox, [1, 2, 3, 4], steps=24, slurm={"partition": "spot", "max_jobs": 2})
    name = sweep.stem
    (job,) = submitted(sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster))

    again = sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster)
    assert submitted(again) == [], "two tasks already cover the sweep"
    assert "tasks SLURM already had: 2 in lane main; nothing submitted" in again.stdout

    wait_for(lambda: len(events(sandbox, "first_step")) >= 2, timeout=120, what="both tasks training")
    # SLURM's warning before a time limit reaches task 0 (its batch shell: sweeprun itself)
    _slurm_cluster.run("scancel", "--signal=USR1", "--batch", f"{job}_0")
    _slurm_cluster.run("scontrol", "requeue", f"{job}_1")
    wait_for(lambda: len(events(sandbox, "first_step")) >= 4, timeout=120, what="both tasks back")
    # an ondemand job takes every CPU: the spot tasks are preempted (SIGTERM) and requeued
    _slurm_cluster.run("sbatch", "--partition=ondemand", f"--cpus-per-task={_cpus()}", "--wrap", "sleep 3",
                       "--output=/dev/null")

    wait_for(lambda: not squeue(name), timeout=300, poll_s=0.5, what="the sweep's tasks to end")
    status = sandbox.status(sweep)
    assert {row["state"] for row in status.values()} == {"done"}, status
    assert events(sandbox, "overlap") == [], "never two processes on one run"
    resumed = [e for e in events(sandbox, "start") if e["from_step"] > 0]
    assert resumed, "interrupted runs resumed from their checkpoints"
    assert max(row["attempts"] for row in status.values()) >= 2

    reference = sandbox.root / "reference"
    local = sandbox.run("launch", str(sweep), "--store", str(reference), "--workers", "2", timeout=180)
    assert local.returncode == 0, local.stdout + local.stderr
    assert metrics(sandbox.store, name) == metrics(reference, name), "exact against a plain local launch"

    after = sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster)
    assert submitted(after) == [] and "all 4 runs done; nothing submitted" in after.stdout


def test_a_run_interrupted_too_often_finishes_on_the_fallback_partition(
        sandbox: Sandbox, cluster: dict[str, str]) -> None:
    sweep = sweep_file(sandbox, [7], steps=30, slurm={
        "partition": "spot", "fallback": {"partition": "ondemand", "after_interruptions": 1}})
    (job,) = submitted(sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster))
    wait_for(lambda: events(sandbox, "first_step"), timeout=120, what="the run training")
    _slurm_cluster.run("scontrol", "requeue", f"{job}_0")

    wait_for(lambda: not squeue(sweep.stem), timeout=180, poll_s=0.5, what="the sweep's tasks to end")
    (row,) = sandbox.status(sweep).values()
    assert row["state"] == "done"
    starts = events(sandbox, "start")
    assert [e["partition"] for e in starts] == ["spot", "ondemand"], starts
    assert starts[1]["from_step"] > 0, "it continued from its checkpoint on the fallback partition"


def test_status_names_each_running_runs_job_and_stop_leaves_no_job(
        sandbox: Sandbox, cluster: dict[str, str]) -> None:
    """A task takes every CPU, so the second waits: one running, one pending."""
    sweep = sweep_file(sandbox, [1, 2], steps=400, slurm={"partition": "spot", "cpus_per_task": _cpus()})
    name = sweep.stem
    (job,) = submitted(sandbox.run("launch", str(sweep), "--on", "slurm", env=cluster))
    wait_for(lambda: events(sandbox, "first_step"), timeout=120, what="a run training")
    running = [row for row in sandbox.status(sweep).values() if row["state"] == "running"]
    assert [row["job"] for row in running] == [f"slurm {job}_0 on spot"], running
    table = sandbox.run("status", str(sweep), env=cluster)
    assert f"SLURM: 1 running: {job}_0 (main, spot); 1 pending: {job}_1 (main, spot)" in table.stdout

    stopped = sandbox.run("stop", str(sweep), env=cluster)
    assert stopped.returncode == 0, stopped.stderr
    assert f"cancelled 1 pending SLURM task(s): {job}_1" in stopped.stdout
    wait_for(lambda: not squeue(name), timeout=60, poll_s=0.5, what="no task of the sweep left")
    (held,) = [row for row in sandbox.status(sweep).values() if row["attempts"]]
    assert held["state"] == "interrupted" and held["step"] > 0, held
    assert list((sandbox.store / name / "runs" / held["run_id"] / "checkpoints").glob("*.json"))


def _cpus() -> int:
    import os

    return os.cpu_count() or 2
