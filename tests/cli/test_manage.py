"""`sweeprun reset` and `sweeprun gc`, run as a user runs them: real launches, real store, real ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sweeprun import Sweep, load_spec
from sweeprun.errors import SweeprunError
from sweeprun.manage import gc, reset
from sweeprun.training import load_checkpoint

from conftest import Sandbox, wait_for

#: A training script on sweeprun's API, without a model: it saves a tensor every step,
#: keeps the last ``keep`` checkpoints and the best by loss (which is lowest at step 2).
CKPT_SCRIPT = """
import os, sys, time
import torch
import sweeprun
run = sweeprun.init(every_steps=1, keep_last=int(os.environ.get("KEEP", "10")), best="loss")
w = {"w": torch.zeros(3)}

class Holder:
    def state_dict(self): return {"w": w["w"]}
    def load_state_dict(self, s): w["w"] = s["w"]

run.track(holder=Holder())
run.restore()
steps = int(run.params["steps"])
while run.step < steps:
    w["w"] = w["w"] + 1
    loss = abs(run.step + 1 - 2) + 0.5  # lowest after the second step
    run.end_step(loss=loss, acc=float(run.step))
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
run.finish()
"""


def api_sweep(sandbox: Sandbox, steps: int = 5, **extra: Any) -> Path:
    script = sandbox.root / "ckpts.py"
    script.write_text(CKPT_SCRIPT)
    return sandbox.write_sweep({"steps": [steps]}, {}, command=f"{sys.executable} {script}", **extra)


def cli(sandbox: Sandbox, *args: str, env: dict[str, str] | None = None) -> Any:
    """``sweeprun ARGS --ledger <the sandbox's>`` as its own process."""
    return sandbox.run(*args, "--ledger", str(sandbox.ledger), env=env)


def runs_dir(sandbox: Sandbox, name: str = "t") -> Path:
    return sandbox.store / name / "runs"


# -- reset --------------------------------------------------------------------------------------


def test_reset_failed_runs_makes_them_run_again_with_a_fresh_count(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2], "fail": [False, True]}, {"steps": 2, "sleep": 0}, max_attempts=1)
    assert sandbox.run("launch", str(sweep)).returncode == 1
    failed = {r for r, row in sandbox.status(sweep).items() if row["state"] == "failed"}
    assert len(failed) == 2

    dry = cli(sandbox, "reset", str(sweep), "--failed", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would reset") == 2
    assert {r for r, row in sandbox.status(sweep).items() if row["state"] == "failed"} == failed

    result = cli(sandbox, "reset", str(sweep), "--failed")
    assert result.returncode == 0, result.stderr
    states = sandbox.status(sweep)
    assert {states[r]["state"] for r in failed} == {"pending"}
    assert {states[r]["failures"] for r in failed} == {0}
    assert not any((runs_dir(sandbox) / r).exists() for r in failed)
    kept = sorted(p.name for p in (sandbox.store / "t" / "trash").iterdir())
    assert [k.rsplit("-", 2)[0] for k in kept] == sorted(failed)
    for folder in kept:  # the old results, whole: the log of the failed attempt is there
        assert "failing on purpose" in (sandbox.store / "t" / "trash" / folder / "logs" / "attempt-1.log").read_text()

    # The next launch runs them again (and they fail again: the script did not change).
    before = len([e for e in sandbox.events() if e["event"] == "fail"])
    assert sandbox.run("launch", str(sweep)).returncode == 1
    assert len([e for e in sandbox.events() if e["event"] == "fail"]) == before + 2


def test_reset_a_done_run_by_its_hash_runs_it_from_scratch(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 3, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    target = next(r for r in sandbox.status(sweep) if r.startswith("a=1"))
    short = target.rsplit("-", 1)[1]

    result = cli(sandbox, "reset", str(sweep), short, "--delete")
    assert result.returncode == 0, result.stderr
    assert f"reset {target}: its folder deleted" in result.stdout
    assert not (runs_dir(sandbox) / target).exists()
    assert not (sandbox.store / "t" / "done" / target).exists()
    assert not any(p.name != ".deleting" for p in (sandbox.store / "t" / "trash").glob("*"))
    assert sandbox.status(sweep)[target]["state"] == "pending"

    assert sandbox.run("launch", str(sweep)).returncode == 0
    starts = [e for e in sandbox.events() if e["event"] == "start" and e["run"] == target]
    assert [e["from_step"] for e in starts] == [0, 0]  # from scratch, not resumed
    assert {r["state"] for r in sandbox.status(sweep).values()} == {"done"}


def test_reset_refuses_a_running_run_and_changes_nothing(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 400, "sleep": 0.05})
    launcher = sandbox.sweeprun("launch", str(sweep))
    try:
        wait_for(lambda: any(e["event"] == "start" for e in sandbox.events()), timeout=60)
        (run_id,) = sandbox.status(sweep)
        result = cli(sandbox, "reset", str(sweep), run_id)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"run {run_id} is held by" in result.stderr and "sweeprun stop" in result.stderr
        assert (runs_dir(sandbox) / run_id).exists() and not (sandbox.store / "t" / "trash").exists()
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)
        launcher.communicate(timeout=120)


@pytest.mark.parametrize("args, message", [
    ((), "name the runs to reset"),
    (("nope",), "no run of sweep t matches 'nope'"),
    (("a=",), "'a=' matches 2 runs of sweep t"),
])
def test_reset_bad_input_is_one_line(sandbox: Sandbox, args: tuple[str, ...], message: str) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 1, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    result = cli(sandbox, "reset", str(sweep), *args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_reset_without_a_ledger_on_this_machine_still_reruns(sandbox: Sandbox, tmp_path: Path) -> None:
    """A second machine that shares only the store: its own ledger is new."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 2, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (run_id,) = sandbox.status(sweep)
    other = tmp_path / "elsewhere.sqlite"
    result = sandbox.run("reset", str(sweep), run_id, "--ledger", str(other))
    assert result.returncode == 0, result.stderr
    assert not other.exists()  # nothing to tell a ledger that never saw the sweep
    assert sandbox.status(sweep)[run_id]["state"] == "pending"  # the first machine's ledger agrees


#: Fails (exit 7) while the file FAIL_FLAG names exists, succeeds once it is gone.
FLAKY_SCRIPT = """
import os, sys
if os.path.exists(os.environ["FAIL_FLAG"]):
    print("failing on purpose", flush=True)
    sys.exit(7)
"""


class Machines:
    """Machines that share only the store: each runs `sweeprun` with its own SQLite ledger."""

    def __init__(self, sandbox: Sandbox, **extra: Any) -> None:
        self.sandbox = sandbox
        script = sandbox.root / "flaky.py"
        script.write_text(FLAKY_SCRIPT)
        self.flag = sandbox.root / "fail"
        self.flag.touch()
        self.sweep = sandbox.write_sweep({"a": [1]}, {}, command=f"{sys.executable} {script}",
                                         max_attempts=1, **extra)

    def on(self, machine: str, *args: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
        env = self.sandbox.env(FAIL_FLAG=str(self.flag),
                               **({"SWEEPRUN_CRASH_AT": crash_at} if crash_at else {}))
        return subprocess.run([sys.executable, "-m", "sweeprun", *args[:1], str(self.sweep), *args[1:],
                               "--ledger", str(self.sandbox.root / f"{machine}.sqlite")],
                              env=env, cwd=self.sandbox.root, text=True, capture_output=True, timeout=120)

    def row(self, machine: str) -> dict[str, Any]:
        result = self.on(machine, "status", "--json")
        assert result.returncode == 0, result.stderr
        (row,) = json.loads(result.stdout)
        return row

    def attempts_run(self) -> int:
        """Attempt logs in the run's current folder: how many times it was started since its reset."""
        return len(list(runs_dir(self.sandbox).glob("*/logs/attempt-*.log")))


@pytest.mark.slow  # a variant: the fast subset keeps the file's other tests
def test_a_reset_reaches_the_ledgers_of_machines_that_share_only_the_store(sandbox: Sandbox) -> None:
    m = Machines(sandbox)
    assert m.on("a", "launch").returncode == 1
    assert m.on("b", "launch").returncode == 1  # machine b tries it too: failed in both ledgers
    assert m.row("a")["state"] == m.row("b")["state"] == "failed"
    run_id = m.row("a")["run_id"]

    # Machine c has never seen the sweep: its reset reaches a's and b's ledgers through the store.
    result = m.on("c", "reset", run_id)
    assert result.returncode == 0, result.stderr
    assert [p.name.split("@")[0] for p in (sandbox.store / "t" / "resets").iterdir()] == [run_id]
    for machine in ("a", "b"):  # status shows what their next launch will do
        assert (m.row(machine)["state"], m.row(machine)["failures"]) == ("pending", 0)

    assert m.on("a", "launch").returncode == 1  # a runs it again: the script still fails
    assert m.attempts_run() == 1 and m.row("a")["state"] == "failed"
    assert m.on("a", "launch").returncode == 1  # the same reset is not honoured twice
    assert m.attempts_run() == 1 and m.row("a")["state"] == "failed"

    m.flag.unlink()  # fixed: b honours the reset at its first launch since, and the run is done
    assert m.on("b", "launch").returncode == 0
    assert m.attempts_run() == 2
    assert m.on("a", "launch").returncode == 0 and m.attempts_run() == 2
    assert m.row("a")["state"] == m.row("b")["state"] == "done"
    assert m.on("b", "launch").returncode == 0 and m.attempts_run() == 2  # done stays done


@pytest.mark.slow  # the bucket variant of the test above, several launches against S3
def test_a_reset_in_a_bucket_reaches_the_other_machines_ledger(sandbox: Sandbox, s3_bucket: str) -> None:
    m = Machines(sandbox, store=f"{s3_bucket}/sweeps")
    assert m.on("a", "launch").returncode == 1
    run_id = m.row("a")["run_id"]
    result = m.on("c", "reset", run_id)
    assert result.returncode == 0, result.stderr
    assert (m.row("a")["state"], m.row("a")["failures"]) == ("pending", 0)
    m.flag.unlink()
    assert m.on("a", "launch").returncode == 0
    assert m.row("a")["state"] == "done"


@pytest.mark.parametrize("point", [  # one crash point in the fast subset, all three in the full suite
    pytest.param("reset.before_older_markers_go", marks=pytest.mark.slow), "reset.before_set_aside",
    pytest.param("ledger.in_forget", marks=pytest.mark.slow)])
def test_a_reset_killed_anywhere_is_finished_by_running_it_again(sandbox: Sandbox, point: str) -> None:
    m = Machines(sandbox)
    assert m.on("a", "launch").returncode == 1
    assert m.on("b", "launch").returncode == 1
    run_id = m.row("a")["run_id"]
    assert m.on("a", "reset", run_id).returncode == 0  # an earlier reset: its marker is there
    assert m.on("a", "launch").returncode == 1 and m.on("b", "launch").returncode == 1

    killed = m.on("a", "reset", run_id, crash_at=point)
    assert killed.returncode == -signal.SIGKILL
    # Whatever was done, both machines agree on it: the failures are forgotten once the
    # marker is written, the run's folder moved away before it (so no launch can start the
    # run under a folder about to move), and before the move the run is still failed.
    expected = "failed" if point == "reset.before_set_aside" else "pending"
    assert m.row("a")["state"] == m.row("b")["state"] == expected
    result = m.on("a", "reset", run_id)
    assert result.returncode == 0, result.stderr
    assert len(list((sandbox.store / "t" / "resets").iterdir())) == 1  # older markers gone
    assert not (runs_dir(sandbox) / run_id).exists()
    assert len(list((sandbox.store / "t" / "trash").iterdir())) == 2  # each reset moved one folder aside
    m.flag.unlink()
    assert m.on("b", "launch").returncode == 0 and m.on("a", "launch").returncode == 0
    assert m.attempts_run() == 1  # run once, by b; a found it done


# -- gc -----------------------------------------------------------------------------------------


def test_gc_keeps_what_latest_and_best_load_and_frees_the_rest(sandbox: Sandbox) -> None:
    sweep = api_sweep(sandbox, steps=6)
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (run_id,) = sandbox.status(sweep)
    run_dir = runs_dir(sandbox) / run_id
    ckpts = run_dir / "checkpoints"
    assert len(list(ckpts.glob("ckpt-*.pt"))) == 7  # one per step, and finish() saves once more
    stray = [ckpts / ".tmp-123-ckpt.pt", run_dir / "attempts" / ".tmp-9-1.json"]
    for path in stray:
        path.write_bytes(b"x" * 1000)
    latest, best = load_checkpoint(run_dir), load_checkpoint(run_dir, "best", best="loss")
    before = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())

    dry = cli(sandbox, "gc", str(sweep), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove" in dry.stdout and all(p.exists() for p in stray)
    assert len(list(ckpts.glob("ckpt-*.pt"))) == 7

    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    after = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    # Kept, by save number: the latest (7, finish()'s save) and the lowest loss (2), the
    # script's own `best="loss"` (mode "min"), which its manifests record.
    assert save_numbers(ckpts) == [2, 7]
    assert not any(p.exists() for p in stray)
    freed = before - after
    assert f"freed {freed / 1000:.1f} KB" in result.stdout or f"freed {freed} B" in result.stdout
    assert torch_equal(load_checkpoint(run_dir), latest)
    assert torch_equal(load_checkpoint(run_dir, "best", best="loss"), best)

    again = cli(sandbox, "gc", str(sweep))  # nothing left to do
    assert again.returncode == 0 and "removed 0 file(s), freed 0 B" in again.stdout


@pytest.mark.slow  # the gc variants after the first: a launch with a torch start each, in the full suite
def test_gc_of_manifests_from_before_the_choice_was_recorded_keeps_every_best(sandbox: Sandbox) -> None:
    """A sweep checkpointed by an older sweeprun: its manifests do not say which metric the
    script kept the best by, so every metric's lowest and highest stay loadable."""
    sweep = api_sweep(sandbox, steps=6)
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (run_id,) = sandbox.status(sweep)
    ckpts = runs_dir(sandbox) / run_id / "checkpoints"
    for manifest in ckpts.glob("ckpt-*.json"):
        doc = json.loads(manifest.read_text())
        assert doc.pop("retention") == {"best": "loss", "mode": "min"}
        manifest.write_text(json.dumps(doc))
    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    # the latest (7), the lowest loss (2), and for "acc" the lowest (1) and the highest
    # (6, the first of two equal ones, as "best" picks)
    assert save_numbers(ckpts) == [1, 2, 6, 7]


@pytest.mark.slow  # see above
def test_gc_of_a_run_that_kept_no_best_keeps_only_the_latest(sandbox: Sandbox) -> None:
    script = sandbox.root / "nobest.py"
    script.write_text(CKPT_SCRIPT.replace(', best="loss")', ")"))
    sweep = sandbox.write_sweep({"steps": [4]}, {}, command=f"{sys.executable} {script}")
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (run_id,) = sandbox.status(sweep)
    assert cli(sandbox, "gc", str(sweep)).returncode == 0
    assert save_numbers(runs_dir(sandbox) / run_id / "checkpoints") == [5]


@pytest.mark.slow  # see above
def test_gc_best_narrows_what_is_kept(sandbox: Sandbox) -> None:
    sweep = api_sweep(sandbox, steps=5)
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (run_id,) = sandbox.status(sweep)
    report = gc(Sweep(load_spec(sweep), str(sandbox.ledger)), best="loss", mode="min")
    (item,) = report.runs
    assert len(item.checkpoints) == 4 and item.files == 8 and item.bytes_freed > 0
    assert save_numbers(runs_dir(sandbox) / run_id / "checkpoints") == [2, 6]  # best loss, latest


def test_gc_leaves_runs_that_are_not_done_alone(sandbox: Sandbox) -> None:
    sweep = api_sweep(sandbox, steps=300)
    launcher = sandbox.sweeprun("launch", str(sweep), env={"STEP_SLEEP": "0.05"})
    try:
        wait_for(lambda: len(list(runs_dir(sandbox).glob("*/checkpoints/ckpt-*.pt"))) >= 3, timeout=120)
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)
        launcher.communicate(timeout=120)
    before = sorted(p.name for p in runs_dir(sandbox).glob("*/checkpoints/*"))
    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in runs_dir(sandbox).glob("*/checkpoints/*")) == before


#: Another machine holding a run's store lease: takes it (as host vm-x) and renews it every
#: half second until killed. Its own clock is the true one.
HOLDER_SCRIPT = """
import sys, time
import fsspec
from sweeprun.leases import StoreLeases
leases = StoreLeases(fsspec.filesystem("file"), lease_s=4, host="vm-x", worker="vm-x:1")
lease = leases.take(sys.argv[1])
while lease is None:
    time.sleep(0.2)
    lease = leases.take(sys.argv[1])
print("held", flush=True)
while True:
    time.sleep(0.5)
    leases.renew(lease)
"""


def fast_clock(monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, ahead_s: float = 45.0) -> None:
    """This process is a machine whose wall clock runs ``ahead_s`` fast (nothing else is)."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + ahead_s)
    monkeypatch.setenv("SWEEPRUN_HOME", str(sandbox.root / "hosts" / "fast"))


def test_reset_on_a_machine_whose_clock_is_45_s_fast_leaves_a_run_held_elsewhere_alone(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another machine (a real launcher, its own ledger) trains the run; this machine's clock
    is 45 s fast, so every store timestamp of the live lease looks older than a lease."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 2000, "sleep": 0.05}, lease_s=4)
    other = sandbox.sweeprun("worker", str(sweep), env={"SWEEPRUN_HOST": "vm-a"})  # its own ledger
    try:
        wait_for(lambda: any(e["event"] == "start" for e in sandbox.events()), timeout=120)
        (run_dir,) = runs_dir(sandbox).iterdir()
        fast_clock(monkeypatch, sandbox)
        here = Sweep(load_spec(sweep), str(sandbox.root / "fast.sqlite"))
        with pytest.raises(SweeprunError, match=f"run {run_dir.name} is held by vm-a:"):
            reset(here, [run_dir.name])
        assert run_dir.exists() and not (sandbox.store / "t" / "trash").exists()
        assert not (sandbox.store / "t" / "resets").exists()
    finally:
        os.killpg(other.pid, signal.SIGTERM)
        other.communicate(timeout=120)


def test_gc_on_a_machine_whose_clock_is_45_s_fast_leaves_a_done_run_held_elsewhere_alone(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Just after a run is done its launcher may still write in its folder: here another
    process holds the done run's lease and renews it while gc runs on a fast clock."""
    sweep = api_sweep(sandbox, steps=5, lease_s=4)
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (run_dir,) = runs_dir(sandbox).iterdir()
    script = sandbox.root / "holder.py"
    script.write_text(HOLDER_SCRIPT)
    holder = subprocess.Popen([sys.executable, str(script), str(run_dir)], env=sandbox.env(),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        fast_clock(monkeypatch, sandbox)
        with pytest.raises(SweeprunError, match=f"run {run_dir.name} is held by vm-x:1"):
            gc(Sweep(load_spec(sweep), str(sandbox.root / "fast.sqlite")))
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing removed
    finally:
        holder.kill()
        holder.wait()
    # The holder is lost: its beat stands still, and after one lease by this machine's own
    # clock gc goes ahead (it watches the beat itself; no timestamp compared).
    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    assert "watching the store leases of 1 run(s)" in result.stderr
    assert len(list((run_dir / "checkpoints").glob("ckpt-*.pt"))) < len(before) // 2


def save_numbers(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[2]) for p in folder.glob("ckpt-*.pt"))


def torch_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a["step"] == b["step"] and torch.equal(a["objects"]["holder"]["w"], b["objects"]["holder"]["w"])
