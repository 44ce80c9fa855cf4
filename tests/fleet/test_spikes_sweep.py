"""Loss spikes and out-of-memory ends under ``sweeprun launch``: a rolled-back run is started
again at once, a diverged one is left alone until reset; an OOM is its own outcome, retried
only as ``on_oom:`` says."""

from __future__ import annotations

import json

import pytest
import yaml

from sweeprun import SpecError, parse_spec
from sweeprun.runenv import OOM_EXIT

from _spiky import SPIKY
from conftest import Sandbox


@pytest.mark.slow   # the fast subset keeps tests/training/test_spikes.py
def test_a_sweep_relaunches_a_rolled_back_run_at_once_and_skips_a_diverged_one(sandbox: Sandbox) -> None:
    """Under ``sweeprun launch``: the rollback is an interruption the launcher resumes from
    at once, the divergence a state of its own that a relaunch leaves alone until a reset."""
    sweep = sandbox.write_sweep(
        {"always": [0, 6]}, command=f"python {SPIKY} --steps 20 --every 4 --poison 40 --nan "
                                    "--always-from {always} --max-rollbacks 1")
    first = sandbox.run("launch", str(sweep))
    assert first.returncode == 1, first.stdout + first.stderr          # a run diverged
    status = {row["params"]["always"]: row for row in sandbox.status(sweep).values()}
    fine, bad = status[0], status[6]
    assert (fine["state"], fine["attempts"], fine["failures"]) == ("done", 2, 0)
    assert fine["rollbacks"]["count"] == 1 and fine["rollbacks"]["restored_step"] == 8
    assert (bad["state"], bad["attempts"], bad["failures"]) == ("diverged", 2, 0)
    assert bad["rollbacks"] == {**bad["rollbacks"], "count": 1, "diverged": True}

    again = sandbox.run("launch", str(sweep))
    assert again.returncode == 1
    assert sandbox.status(sweep)[bad["run_id"]]["attempts"] == 2      # not started again
    table = sandbox.run("status", str(sweep))
    assert "diverged" in table.stdout and "↺1" in table.stdout

    ledger = ("--ledger", str(sandbox.ledger))
    shown = sandbox.run("show", str(sweep), fine["run_id"], *ledger, env={"COLUMNS": "200"})
    assert "rolled back (loss spike)" in shown.stdout
    assert "step 11: loss not finite; rolled back to ckpt-a1-" in shown.stdout
    shown = sandbox.run("show", str(sweep), bad["run_id"], "--json", *ledger)
    detail = json.loads(shown.stdout)
    assert [a["outcome"] for a in detail["attempts"]] == ["rolled-back", "diverged"]
    assert [r["diverged"] for r in detail["rollbacks"]] == [False, True]

    assert sandbox.run("reset", str(sweep), bad["run_id"], *ledger).returncode == 0
    assert sandbox.status(sweep)[bad["run_id"]]["state"] == "pending"


@pytest.mark.slow   # three attempts of a torch script
def test_out_of_memory_ends_the_attempt_as_oom_and_on_oom_retries_it_with_the_batch_halved(
        sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"batch": [16]}, command=f"python {SPIKY} --steps 8 --every 2 "
                                "--batch {batch} --oom-above 4",
                                on_oom={"retries": 2, "halve": ["batch"]})
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    [row] = sandbox.status(sweep).values()
    assert (row["state"], row["attempts"], row["failures"]) == ("done", 3, 0)   # on_oom's retries, not failures
    detail = json.loads(sandbox.run("show", str(sweep), row["run_id"], "--json", "--ledger",
                                    str(sandbox.ledger)).stdout)
    assert [(a["outcome"], a["exit_code"]) for a in detail["attempts"]] == [
        ("oom", OOM_EXIT), ("oom", OOM_EXIT), ("done", 0)]
    assert detail["oom"] == "attempt 2 at step 4"
    logs = sandbox.store / "t" / "runs" / row["run_id"] / "logs"
    assert "batch 16, oom_retry 0" in (logs / "attempt-1.log").read_text()
    assert "out of memory at step 4: CUDA out of memory. Tried to allocate 16 GiB" in (
        logs / "attempt-1.log").read_text()
    assert "batch 4, oom_retry 2" in (logs / "attempt-3.log").read_text()   # same run, halved twice


def test_out_of_memory_without_on_oom_fails_the_run_at_once(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"batch": [16]}, command=f"python {SPIKY} --steps 8 --batch {{batch}} "
                                "--oom-above 4")
    assert sandbox.run("launch", str(sweep)).returncode == 1
    [row] = sandbox.status(sweep).values()
    assert (row["state"], row["attempts"]) == ("failed", 1)              # not 3 identical tries
    assert sandbox.run("launch", str(sweep)).returncode == 1
    assert sandbox.status(sweep)[row["run_id"]]["attempts"] == 1


@pytest.mark.parametrize(("on_oom", "said"), [
    ({"retries": -1}, "on_oom.retries must be an integer from 0 to 100"),
    ({"retries": 1, "halve": ["lr"]}, "only a parameter whose values are positive integers can be halved"),
    ({"retries": 1, "halve": ["nope"]}, "'nope', which is not a parameter of the sweep"),
    ({"halve": ["batch"]}, "on_oom.halve needs on_oom.retries of 1 or more"),
    ({"retrys": 1}, "on_oom has no key 'retrys'"),
])
def test_a_bad_on_oom_is_one_clear_error(on_oom: dict, said: str) -> None:
    text = yaml.safe_dump({"name": "t", "command": "python train.py --batch {batch} --lr {lr}",
                           "store": "runs", "grid": {"batch": [16, 8]}, "params": {"lr": 0.1},
                           "on_oom": on_oom})
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "t.yaml")
    assert said in str(caught.value) and str(caught.value).startswith("t.yaml:")


def test_a_bad_on_oom_stops_the_command_with_one_line(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"batch": [16, 8]}, on_oom={"retries": 1, "halve": ["lr"]}, params={"lr": 0.1})
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 2 and "on_oom.halve names 'lr'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not sandbox.store.exists()
