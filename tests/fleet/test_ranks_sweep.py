"""A sweep of real DDP and FSDP2 scripts with ``nproc: 2`` (torchrun, gloo, CPU), interrupted
every way a multi-rank run is lost: one rank SIGKILLed alone, the launcher's whole group
SIGKILLed, the launcher SIGTERMed; relaunched with the same command until done. The run's
final model and optimizer state (gathered by the script at its end) must equal, tensor for
tensor, those of the same script run uninterrupted at the same world size, and its metrics
must be the same lines.

The scripts are the users' own (``tests/scripts/ddp_train.py``, ``fsdp_train.py``): they
initialise their process group themselves and know nothing of the launcher.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest

from sweeprun.procs import processes_with_env

from conftest import Sandbox, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # the ranks' helpers
from _ranks_helpers import DDP, FSDP, RankRun, assert_same_result, reference  # noqa: E402


def rank_pids(run_dir: Path, rank: int) -> list[int]:
    """The live processes of rank ``rank`` of the run in ``run_dir`` (found by their environment)."""
    return [ref.pid for ref in processes_with_env({"SWEEPRUN_RUN_DIR": str(run_dir), "RANK": str(rank)})]


@pytest.mark.slow  # four attempts of two torch ranks and a torchrun each
@pytest.mark.parametrize("script", [DDP, FSDP], ids=["ddp", "fsdp2"])
def test_a_multi_rank_sweep_lost_every_way_ends_as_the_uninterrupted_run(
        sandbox: Sandbox, shared_dir: Path, script: Path) -> None:
    want = reference(shared_dir, script)
    final = sandbox.root / "run.final.pt"   # where RankRun(logs=root / "run") reads it
    sweep = sandbox.write_sweep({"seed": [0]}, {}, name="ranks", nproc=2, lease_s=30, grace_s=20,
                                command=f"python {script} --seed {{seed}} --step-sleep-s 0.15 "
                                        f"--final {final}")
    launcher = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: any(sandbox.store.glob("ranks/runs/*/metrics.jsonl")), timeout=180, what="the first step")
    (run_dir,) = sandbox.store.glob("ranks/runs/*")
    run = RankRun(script, run_dir, env={"SWEEPRUN_RUN_DIR": str(run_dir)}, logs=sandbox.root / "run")

    # 1. one rank SIGKILLed alone (the OOM killer): the attempt is interrupted, the launcher
    #    starts it again at once, from the last checkpoint both ranks committed
    wait_for(lambda: run.last_step() >= 3, timeout=180, what="step 3")
    (victim,) = rank_pids(run_dir, 1)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(list((run_dir / "logs").glob("attempt-*.log"))) >= 2, timeout=180,
             what="the second attempt")
    # 2. the launcher's whole group SIGKILLed (a lost machine): no rank may survive it
    seen = run.last_step()
    wait_for(lambda: run.last_step() >= seen + 2, timeout=180, what="the second attempt's steps")
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=60)
    wait_for(lambda: not rank_pids(run_dir, 0) and not rank_pids(run_dir, 1), timeout=60,
             what="the ranks to die with their launcher")
    # 3. a relaunch SIGTERMed mid-run (a preemption notice): every rank saves and exits 75
    launcher = sandbox.sweeprun("launch", str(sweep))
    seen = run.last_step()
    wait_for(lambda: run.last_step() >= seen + 2 or launcher.poll() is not None, timeout=180,
             what="the third attempt's steps")
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGTERM)
        launcher.communicate(timeout=120)
    # 4. the same command again until done
    for _ in range(3):
        done = sandbox.run("launch", str(sweep), timeout=300)
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 process(es) started" in sandbox.run("launch", str(sweep)).stdout

    logs = [p.read_text() for p in sorted((run_dir / "logs").glob("attempt-*.log"))]
    assert len(logs) >= 3
    # the killed rank's peer failed in its collective (its traceback is the script's own);
    # the SIGTERM had both ranks save once, at the same step
    saves = [line for log in logs for line in log.splitlines() if "SIGTERM received; saved" in line]
    assert len(saves) in (0, 2) and len(set(saves)) <= 1, saves
    assert "Traceback" not in logs[-1] and "done: step" in logs[-1]
    assert_same_result(run, want)
    row = sandbox.status(sweep)[run_dir.name]
    assert row["state"] == "done" and row["nproc"] == 2



@pytest.mark.slow  # two attempts of a DDP run, the second of one rank
def test_a_run_moved_from_two_ranks_to_one_goes_on_and_show_says_the_resume_was_approximate(
        sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"seed": [0]}, {}, name="ranks", nproc=2, lease_s=30, grace_s=20,
                                command=f"python {DDP} --seed {{seed}} --step-sleep-s 0.15")
    launcher = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: any(sandbox.store.glob("ranks/runs/*/metrics.jsonl")), timeout=180, what="the first step")
    (run_dir,) = sandbox.store.glob("ranks/runs/*")
    run = RankRun(DDP, run_dir)
    wait_for(lambda: run.last_step() >= 3, timeout=180, what="step 3")
    os.killpg(launcher.pid, signal.SIGTERM)     # every rank saves at one step, exits 75
    launcher.communicate(timeout=120)
    saved = run.last_step()

    sweep.write_text(sweep.read_text().replace("nproc: 2", "nproc: 1"))   # the same run, one GPU now
    done = sandbox.run("launch", str(sweep), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resharded from 2 rank(s) to 1" in (run_dir / "logs" / "attempt-2.log").read_text()
    # one rank takes all 48 samples of an epoch, 4 a step: the rest of epoch 0, then epoch 1
    assert [e["step"] for e in run.entries()] == list(range(1, 24 - saved + 1))

    row = sandbox.status(sweep)[run_dir.name]
    assert row["state"] == "done" and row["nproc"] == 1
    assert row["approximate_resume"]["saved_world_size"] == 2
    assert row["approximate_resume"]["world_size"] == 1
    # the ledger keeps it with the run, as attempt 2 reported it when it ended
    with closing(sqlite3.connect(sandbox.ledger)) as db:
        (kept,) = db.execute("SELECT resumed FROM runs WHERE run_id = ?", [run_dir.name]).fetchone()
    assert json.loads(kept) == row["approximate_resume"] and row["approximate_resume"]["attempt"] == 2
    shown = json.loads(sandbox.run("show", str(sweep), run_dir.name, "--json", "--ledger",
                                   str(sandbox.ledger)).stdout)
    assert shown["approximate_resume"] == {**row["approximate_resume"], "step": saved}
    assert shown["approximate_resume"]["approximate"] == ["rng", "data position"]
