"""Runs of several processes (``nproc:``): each started as ranks through torchrun, owned as one run.

Real launchers, real torchrun, real gloo ranks on CPU (``tests/scripts/ranks.py``). Each test
starts as few torch processes as its point needs: a rank costs ~1.5 CPU-s of imports, and
torchrun as much again.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from sweeprun.procs import processes_with_env

from conftest import REPO, Sandbox, wait_for

RANKS = REPO / "tests" / "scripts" / "ranks.py"


def ranks_sweep(sandbox: Sandbox, **extra: Any) -> Path:
    extra.setdefault("grid", {"world": [2]})
    extra.setdefault("nproc", "{world}")
    grid = extra.pop("grid")
    return sandbox.write_sweep(grid, extra.pop("params", {}), command=f"python {RANKS}", **extra)


def events(sandbox: Sandbox, event: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in sandbox.events() if e["event"] == event and all(e.get(k) == v for k, v in match.items())]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def row_id(sandbox: Sandbox) -> str:
    return sandbox.events()[0]["run"]


def of_run(sandbox: Sandbox) -> list[int]:
    """Every process on this machine started for a run of this sandbox's sweep."""
    return [ref.pid for ref in processes_with_env({"SIDE_LOG": str(sandbox.side_log)})]


@pytest.mark.slow  # five ranks' starts; the fast subset keeps the SIGTERM and lost-launcher rank tests
def test_ranks_see_torchrun_and_sweeprun_variables_and_two_runs_never_share_a_port(sandbox: Sandbox) -> None:
    """A zip mixes one 1-process run and two 2-rank runs that must be running at the same
    time (``meet``): every rank has its rank variables (the 1-process run too: a sweep file
    with ``nproc:`` starts every run through torchrun, and a script written for torchrun
    makes its process group from them), every SWEEPRUN_* variable and SWEEPRUN_NPROC; each
    run its own port."""
    sweep = ranks_sweep(sandbox, grid={}, zip={"world": [1, 2, 2], "seed": [0, 1, 2]},
                        params={"steps": 2, "meet": 3}, on_world_size_change="refuse")
    result = sandbox.run("launch", str(sweep), "--workers", "3", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    starts = events(sandbox, "start")
    single = [e for e in starts if e["env"]["SWEEPRUN_NPROC"] == "1"]
    assert len(single) == 1 and single[0]["sid"] == single[0]["pid"]
    assert (single[0]["env"]["RANK"], single[0]["env"]["WORLD_SIZE"]) == ("0", "1")
    ranked = [e for e in starts if e["env"]["SWEEPRUN_NPROC"] == "2"]
    by_run: dict[str, list[dict[str, Any]]] = {}
    for e in ranked:
        by_run.setdefault(e["run"], []).append(e["env"])
    assert len(by_run) == 2
    for envs in by_run.values():
        assert sorted(env["RANK"] for env in envs) == ["0", "1"]
        assert sorted(env["LOCAL_RANK"] for env in envs) == ["0", "1"]
        assert {(env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"]) for env in envs} == {
            ("2", "2", "localhost")}
        assert len({env["MASTER_PORT"] for env in envs}) == 1
    ports = [envs[0]["MASTER_PORT"] for envs in by_run.values()]
    assert ports[0] != ports[1]
    for e in starts:
        assert e["env"]["SWEEPRUN_ON_WORLD_SIZE_CHANGE"] == "refuse"
        assert e["env"]["SWEEPRUN_SWEEP"] == "t" and e["env"]["SWEEPRUN_RUN_DIR"].endswith(e["run"])
    status = sandbox.status(sweep)
    assert {r["state"] for r in status.values()} == {"done"}
    # status and show: each run once, with its world size
    assert sorted(r["nproc"] for r in status.values()) == [1, 2, 2]
    table = sandbox.run("status", str(sweep)).stdout
    assert "procs" in table and sum(run.rsplit("-", 1)[1] in table for run in status) == 3
    two = next(run for run, r in status.items() if r["nproc"] == 2)
    shown = sandbox.run("show", str(sweep), two, "--ledger", str(sandbox.ledger))
    assert f"run {two} · done · 2 processes (torchrun)" in shown.stdout, shown.stdout + shown.stderr
    record = json.loads((sandbox.store / "t" / "runs" / two / "attempts" / "1.json").read_text())
    assert record["nproc"] == 2


@pytest.mark.parametrize("codes, code", [
    ([0, 0], 0), ([75, 75], 75), ([75], 75), ([-signal.SIGKILL], 75), ([1, -signal.SIGKILL], 75),
    ([-signal.SIGTERM, 0], 75), ([1], 1), ([3, 1], 3), ([-signal.SIGSEGV], 128 + signal.SIGSEGV),
])
def test_the_agent_exit_code_from_its_ranks(codes: list[int], code: int) -> None:
    """torchrun exits 1 whatever its ranks did; the agent reads their codes (see its docstring)."""
    from sweeprun.torchrun_agent import exit_code

    assert exit_code(codes) == code


def test_a_command_that_is_not_python_runs_on_every_rank(sandbox: Sandbox) -> None:
    """``--no-python``: any program is started as it is on each rank, with the rank variables."""
    sweep = sandbox.write_sweep({"world": [2]}, command="sh -c 'echo rank=$RANK/$WORLD_SIZE >> \"$SIDE_LOG\"'",
                                nproc="{world}")
    result = sandbox.run("launch", str(sweep), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(sandbox.side_log.read_text().split()) == ["rank=0/2", "rank=1/2"]


@pytest.mark.slow  # the fast subset has the SIGTERM test: ranks' exits read as one
def test_one_rank_killed_ends_the_attempt_interrupted_and_the_run_resumes(sandbox: Sandbox) -> None:
    """SIGKILL of rank 1 alone: torchrun stops rank 0, the attempt is interrupted (not done, not
    a failure), and the same launcher runs it again from rank 0's checkpoint to the end."""
    sweep = ranks_sweep(sandbox, params={"steps": 30, "sleep": 0.1})
    launcher = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: len(events(sandbox, "step", attempt=1)) >= 4, timeout=120, what="two steps")
    rank = {e["rank"]: e["pid"] for e in events(sandbox, "start", attempt=1)}
    os.kill(rank[1], signal.SIGKILL)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out + err
    assert not alive(rank[0])
    assert f"{row_id(sandbox)} interrupted (exit 75" in out
    (row,) = sandbox.status(sweep).values()
    assert row["state"] == "done" and row["attempts"] == 2 and row["failures"] == 0
    resumed = min(e["step"] for e in events(sandbox, "step", attempt=2))
    assert resumed > 1 and not events(sandbox, "finish", attempt=1)


@pytest.mark.slow  # two launches of two torch ranks: the full suite's
def test_a_killed_launcher_group_takes_every_rank_down_and_an_escaped_one_dies_at_the_next_launch(
        sandbox: Sandbox) -> None:
    """SIGKILL of the launcher's process group (a terminal closed, a job killed): torchrun dies
    with the launcher and each rank with torchrun, though each leads a session of its own.
    Rank 1 here clears its death signal, as a rank that escaped would: it lives on, and the
    next launch on this machine kills it before it starts the run again."""
    sweep = ranks_sweep(sandbox, params={"steps": 2, "escape": 1})
    launcher = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: len(events(sandbox, "start", attempt=1)) == 2, timeout=120, what="both ranks")
    rank = {e["rank"]: e["pid"] for e in events(sandbox, "start", attempt=1)}
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.communicate()
    wait_for(lambda: not alive(rank[0]), timeout=30, what="rank 0 to die with torchrun")
    assert of_run(sandbox) == [rank[1]]  # the agent and rank 0 are gone; the escaped rank is not

    again = sandbox.run("launch", str(sweep), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert not alive(rank[1]) and f"killed pid(s) {rank[1]}" in again.stdout
    assert of_run(sandbox) == []
    assert {r["state"] for r in sandbox.status(sweep).values()} == {"done"}


def test_sigterm_reaches_every_rank_and_all_exiting_75_is_an_interruption(sandbox: Sandbox) -> None:
    """SIGTERM to the launcher: each rank gets SIGTERM (not only torchrun), they stop at the same
    step and exit 75; torchrun's own exit code is not 75, the attempt is still interrupted."""
    sweep = ranks_sweep(sandbox, params={"steps": 100, "sleep": 0.1})
    launcher = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: len(events(sandbox, "step")) >= 2, timeout=120, what="a step")
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, out + err
    stopped = events(sandbox, "preempted")
    assert sorted(e["rank"] for e in stopped) == [0, 1] and len({e["step"] for e in stopped}) == 1
    for rank in (0, 1):  # each was signalled itself, before the ranks agreed to stop
        told = [e["event"] for e in sandbox.events() if e["rank"] == rank and e["event"] in ("sigterm", "preempted")]
        assert told == ["sigterm", "preempted"]
    (row,) = sandbox.status(sweep).values()
    assert row["state"] == "interrupted" and row["failures"] == 0
    assert f"{row_id(sandbox)} interrupted (exit 75" in out
    assert of_run(sandbox) == []


@pytest.mark.slow
def test_ranks_that_ignore_sigterm_are_killed_when_the_grace_ends(sandbox: Sandbox) -> None:
    """SIGTERM, then ``grace_s`` later SIGKILL to torchrun's group and every rank's: nothing of
    the run is left, and the attempt is an interruption, not a failure."""
    sweep = ranks_sweep(sandbox, params={"steps": 1000, "sleep": 0.1, "deaf": True}, grace_s=1)
    launcher = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: len(events(sandbox, "step")) >= 2, timeout=120, what="a step")
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, out + err
    assert of_run(sandbox) == [] and not events(sandbox, "preempted")
    (row,) = sandbox.status(sweep).values()
    assert row["state"] == "interrupted" and row["failures"] == 0
