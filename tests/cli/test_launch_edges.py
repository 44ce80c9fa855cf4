"""The launcher at its edges: crash windows, shared ledgers, limits, and processes it must not kill.

Each test is a situation a user met: real launchers, real children (tests/scripts/steps.py),
real signals and a real SQLite ledger.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from sweeprun import Sweep, load_spec
from sweeprun.ledger import Outcome, Policy, RunState, grid_key, open_ledger
from sweeprun.procs import ProcessRef
from sweeprun.render import PlainEvents
from sweeprun.runner import Launcher, LaunchOptions

from conftest import Sandbox, wait_for


def starts(sandbox: Sandbox) -> Counter:
    return Counter(e["run"] for e in sandbox.events() if e["event"] == "start")


def runs_dir(sandbox: Sandbox, name: str = "t") -> Path:
    return sandbox.store / name / "runs"


def test_done_written_then_launcher_killed_is_never_run_again(sandbox: Sandbox) -> None:
    """Killed between writing DONE and telling the ledger, with a long lease: DONE is the truth."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 3, "sleep": 0.01}, lease_s=3600)
    crashed = sandbox.run("launch", str(sweep), env={"SWEEPRUN_CRASH_AT": "runner.after_done"})
    assert crashed.returncode == -signal.SIGKILL
    # the ledger still says running, under a lease that has an hour to go, held by
    # "another host" for all this launcher can tell
    conn = sqlite3.connect(sandbox.ledger)
    conn.execute("UPDATE runs SET worker = 'elsewhere:1'")
    conn.commit()
    conn.close()
    again = sandbox.run("launch", str(sweep))
    assert again.returncode == 0, again.stderr
    assert sum(starts(sandbox).values()) == 1
    assert {r["state"] for r in sandbox.status(sweep).values()} == {"done"}


def test_two_launchers_with_different_grids_each_run_their_own(sandbox: Sandbox) -> None:
    """Same sweep name, two grids (or a grid edited while a launcher runs): no traceback, no
    half-run grid; each launcher runs what it read and status shows the union."""
    first = sandbox.write_sweep({"a": [1, 2, 3]}, {"steps": 6, "sleep": 0.05})
    second = sandbox.root / "t-edited.yaml"
    edited = yaml.safe_load(first.read_text())
    edited["grid"] = {"a": [2, 3, 4, 5]}
    second.write_text(yaml.safe_dump(edited))
    one = sandbox.sweeprun("launch", str(first))
    wait_for(lambda: starts(sandbox), what="the first launcher to start a run")
    two = sandbox.sweeprun("launch", str(second))
    for proc in (one, two):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        assert "Traceback" not in err
    assert sorted(starts(sandbox).values()) == [1] * 5
    union = sandbox.status(first)
    assert len(union) == 5 and {r["state"] for r in union.values()} == {"done"}


def test_lowering_max_attempts_below_a_runs_failures_ends_instead_of_hanging(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 200, "sleep": 0.02})
    led = Sweep(load_spec(sweep), str(sandbox.ledger)).prepare()  # the ledger as a launcher keys it
    claim = led.claim(ProcessRef.me(), Policy(), 60)
    assert claim and led.finish(claim, Outcome.FAILED, Policy()) is RunState.PENDING
    claim = led.claim(ProcessRef.me(), Policy(), 60)
    assert claim and led.finish(claim, Outcome.INTERRUPTED, Policy()) is RunState.INTERRUPTED
    led.close()
    result = sandbox.run("launch", str(sweep), "--max-attempts", "1", timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert not starts(sandbox)
    assert [r["state"] for r in sandbox.status(sweep).values()] == ["interrupted"]


def test_attempt_numbers_survive_a_rebuilt_ledger(sandbox: Sandbox) -> None:
    """A new Colab VM rebuilds its ledger: attempt 1 must not come again and overwrite a log."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 200, "sleep": 0.02})
    first = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: any(runs_dir(sandbox).glob("*/ckpt.json")), what="a checkpoint")
    os.killpg(first.pid, signal.SIGTERM)
    first.communicate(timeout=60)
    (run,) = runs_dir(sandbox).iterdir()
    first_log = (run / "logs" / "attempt-1.log").read_bytes()
    for f in sandbox.ledger.parent.glob("ledger.sqlite*"):
        f.unlink()
    assert sandbox.run("launch", str(sweep)).returncode == 0
    assert [e["attempt"] for e in sandbox.events() if e["event"] == "start"] == [1, 2]
    assert (run / "logs" / "attempt-1.log").read_bytes() == first_log
    assert json.loads((run / "DONE").read_text())["attempt"] == 2
    assert sorted(p.name for p in (run / "attempts").iterdir()) == ["1.json", "2.json"]


def test_a_worker_that_cannot_renew_its_lease_stops_its_child(sandbox: Sandbox) -> None:
    """The ledger is unreachable (locked here) for longer than the lease: the worker cannot learn
    whether another took the run over, so it stops its child itself instead of writing on."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 400, "sleep": 0.02}, lease_s=2)
    launcher = sandbox.sweeprun("launch", str(sweep), env={"SWEEPRUN_BUSY_TIMEOUT_S": "0.2"})
    wait_for(lambda: any(runs_dir(sandbox).glob("*/ckpt.json")), what="a checkpoint")
    blocker = sqlite3.connect(sandbox.ledger, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        out, err = launcher.communicate(timeout=60)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert "could not renew the lease" in out or "no lease renewal" in out
    (child,) = [e["pid"] for e in sandbox.events() if e["event"] == "start"]
    assert not [e for e in sandbox.events() if e["event"] == "finish"]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    # the same command later finishes the run
    assert sandbox.run("launch", str(sweep)).returncode == 0


def test_a_slow_start_keeps_its_lease(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing params.json takes longer than the lease (a slow Drive): the lease is renewed
    from the claim on, so no other worker takes the run while it is being started."""
    monkeypatch.setenv("SWEEPRUN_HOME", str(sandbox.root / "state"))
    monkeypatch.setenv("SIDE_LOG", str(sandbox.side_log))
    monkeypatch.setenv("LOCK_DIR", str(sandbox.root / "locks"))
    sweep = Sweep(load_spec(sandbox.write_sweep({"a": [1]}, {"steps": 1, "sleep": 0.01}, lease_s=1)),
                  str(sandbox.ledger))
    slow_write = sweep.write_params
    stolen: list[object] = []

    def write_params(run_id: str, params: dict) -> None:
        other = open_ledger(sandbox.ledger, sweep.ledger_key())
        for _ in range(6):  # 3 s, three leases: another host keeps trying to take the run
            time.sleep(0.5)
            stolen.append(other.claim(ProcessRef("elsewhere", 1, 1), Policy(), 60))
        other.close()
        slow_write(run_id, params)

    monkeypatch.setattr(sweep, "write_params", write_params)
    ledger = sweep.prepare()
    try:
        result = Launcher(sweep, ledger, LaunchOptions(heartbeat_s=0.2),
                          PlainEvents(Console(file=open(os.devnull, "w")), 1, 0)).run()
    finally:
        ledger.close()
    assert result.exit_code == 0
    assert stolen == [None] * 6


class _Exploding(PlainEvents):
    """Rendering fails after the child's first line: a bug in the slot's thread."""

    def output(self, run_id: str, line: str) -> None:
        raise RuntimeError("the renderer broke")


def test_a_failing_slot_lets_its_child_save_and_records_an_interruption(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEPRUN_HOME", str(sandbox.root / "state"))
    monkeypatch.setenv("SIDE_LOG", str(sandbox.side_log))
    monkeypatch.setenv("LOCK_DIR", str(sandbox.root / "locks"))
    sweep = Sweep(load_spec(sandbox.write_sweep({"a": [1]}, {"steps": 100, "sleep": 0.02})),
                  str(sandbox.ledger))
    ledger = sweep.prepare()
    try:
        with pytest.raises(RuntimeError, match="renderer broke"):
            Launcher(sweep, ledger, LaunchOptions(), _Exploding(Console(file=open(os.devnull, "w")), 1, 0)).run()
        (row,) = ledger.rows()
    finally:
        ledger.close()
    # the child got SIGTERM, saved and exited 75 (not SIGKILLed with the thread), and the
    # ledger knows: the run is interrupted, not left "running"
    assert [e["event"] for e in sandbox.events()] == ["start", "preempted"]
    assert row.state is RunState.INTERRUPTED and row.failures == 0


def test_status_right_after_a_launcher_is_killed_shows_its_runs_interrupted(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 400, "sleep": 0.02}, lease_s=3600)
    launcher = sandbox.sweeprun("launch", str(sweep), "--workers", "2")
    wait_for(lambda: len(starts(sandbox)) == 2, what="both runs to start")
    assert {r["state"] for r in sandbox.status(sweep).values()} == {"running"}
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert {r["state"] for r in sandbox.status(sweep).values()} == {"interrupted"}


def test_status_writes_nothing(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    before = sorted(p.name for p in sandbox.ledger.parent.iterdir())
    sandbox.status(sweep)
    assert sorted(p.name for p in sandbox.ledger.parent.iterdir()) == before == ["ledger.sqlite"]


def test_one_store_spelled_two_ways_shares_one_ledger(sandbox: Sandbox) -> None:
    """`/x` and a symlink to it (Colab's `My Drive` and `MyDrive`) are one store: one ledger."""
    sandbox.store.mkdir()
    alias = sandbox.root / "alias"
    alias.symlink_to(sandbox.store)
    plain = sandbox.write_sweep({"a": [1, 2, 3]}, {"steps": 10, "sleep": 0.05})
    linked = sandbox.root / "linked.yaml"
    linked.write_text(plain.read_text().replace(str(sandbox.store), f"file://{alias}"))
    procs = [subprocess.Popen([sys.executable, "-m", "sweeprun", "launch", str(path)],
                              env=sandbox.env(), cwd=sandbox.root, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for path in (plain, linked)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
    assert sorted(starts(sandbox).values()) == [1, 1, 1]
    assert not [e for e in sandbox.events() if e["event"] == "overlap"]
    assert len(list((sandbox.root / "state" / "ledgers").glob("*.sqlite"))) == 1


def test_a_run_that_kills_its_launcher_every_time_is_failed_after_max_lost(sandbox: Sandbox) -> None:
    """Lost attempts (no exit code: the machine died) cost no failure, but a run that takes its
    launcher down every time without saving anything must not be retried forever."""
    killer = sandbox.root / "killer.py"
    killer.write_text("import os, signal, time\ntime.sleep(0.2)\nos.kill(os.getppid(), signal.SIGKILL)\n"
                      "time.sleep(30)\n")
    sweep = sandbox.write_sweep({"a": [1]}, command=f"python {killer}", max_lost=3)
    codes = []
    for _ in range(6):
        result = sandbox.run("launch", str(sweep), timeout=60)
        codes.append(result.returncode)
        if result.returncode != -signal.SIGKILL:
            break
    assert codes[:-1] == [-signal.SIGKILL] * 3 and codes[-1] == 1, codes
    assert "without a new checkpoint" in result.stdout
    assert [r["state"] for r in sandbox.status(sweep).values()] == ["failed"]


def test_a_huge_unused_parameter_does_not_break_the_start(sandbox: Sandbox) -> None:
    """All params in one environment variable made every start fail with "Argument list too
    long"; the child finds them in its params.json."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1, "sleep": 0, "notes": "x" * 200_000})
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = runs_dir(sandbox).iterdir()
    assert len(json.loads((run / "params.json").read_text())["notes"]) == 200_000


def test_a_script_that_exits_0_without_finishing_is_not_done(sandbox: Sandbox) -> None:
    """A script using the training API that catches SIGTERM or KeyboardInterrupt and exits 0
    half-trained: failed attempt with a reason, never DONE."""
    script = sandbox.root / "quitter.py"
    script.write_text("import sweeprun\nrun = sweeprun.init()\nraise SystemExit(0)\n")
    sweep = sandbox.write_sweep({"a": [1]}, command=f"python {script}", max_attempts=1)
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "exited 0 but never reported the end of training" in result.stdout
    (run,) = runs_dir(sandbox).iterdir()
    assert not (run / "DONE").exists()


@pytest.mark.parametrize("spec, message", [
    ("nowhere.at_all", "unknown crash point 'nowhere.at_all'"),
    ("ledger.in_claim@x", "needs a positive count"),
])
def test_a_bad_fault_injection_spec_is_one_line(sandbox: Sandbox, spec: str, message: str) -> None:
    sweep = sandbox.write_sweep({"a": [1]})
    result = sandbox.run("launch", str(sweep), env={"SWEEPRUN_CRASH_AT": spec})
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not sandbox.store.exists()


def test_a_damaged_ledger_row_is_one_line(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    conn = sqlite3.connect(sandbox.ledger)
    conn.execute("UPDATE runs SET state = 'zombie'")
    conn.commit()
    conn.close()
    for run in runs_dir(sandbox).iterdir():  # no DONE in the store to heal the row from
        (run / "DONE").unlink()
    for command in ("launch", "status"):
        result = sandbox.run(command, str(sweep))
        assert result.returncode == 2, result.stderr
        assert "unknown state 'zombie'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--ledger", ":memory:"], "in-memory database"),
    (["--store", "memory://x"], "lives in this process's memory"),
])
def test_an_in_memory_ledger_or_store_is_refused(sandbox: Sandbox, flags: list[str], message: str) -> None:
    sweep = sandbox.write_sweep({"a": [1]})
    result = subprocess.run([sys.executable, "-m", "sweeprun", "launch", str(sweep), *flags],
                            env=sandbox.env(), cwd=sandbox.root, text=True, capture_output=True)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not sandbox.store.exists() and not starts(sandbox)


def test_changing_the_command_of_a_finished_sweep_says_so(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    sweep.write_text(sweep.read_text().replace("--x 1", "--x 2")
                     + "# mirror: s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/x\n")
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0
    assert "the command changed" in result.stdout and "delete its folder" in result.stdout
    stored = (sandbox.store / "t" / "sweep.yaml").read_text()
    assert "--x 2" in stored and "wJalrXUtnFEMI" not in stored


def test_ten_claimers_on_two_grids_never_share_a_run(tmp_path: Path) -> None:
    """Grid membership does not weaken exclusivity: claims from two grids with overlapping runs."""
    from sweeprun.identity import RunSpec

    runs = [RunSpec.from_params({"i": i}, index=i) for i in range(60)]
    grids = [runs[:40], runs[20:]]
    led = open_ledger(tmp_path / "l.sqlite", "s")
    for grid in grids:
        led.sync(grid, set(), set())
    taken: list[str] = []
    lock = threading.Lock()

    def claimer(grid: list[RunSpec]) -> None:
        mine = open_ledger(tmp_path / "l.sqlite", "s")
        while (c := mine.claim(ProcessRef.me(), Policy(), 600, grid_key(grid))) is not None:
            with lock:
                taken.append(c.run_id)
            mine.finish(c, Outcome.DONE, Policy())
        mine.close()

    threads = [threading.Thread(target=claimer, args=(grids[i % 2],)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    led.close()
    assert sorted(taken) == sorted(r.run_id for r in runs)


@pytest.mark.parametrize("home", ["a file", "under a file"])
def test_an_unusable_sweeprun_home_is_named(sandbox: Sandbox, home: str) -> None:
    """The default ledger lives under SWEEPRUN_HOME: when it cannot, the message says which."""
    (sandbox.root / "home").write_text("not a folder")
    target = sandbox.root / "home" if home == "a file" else sandbox.root / "home" / "state"
    sweep = sandbox.write_sweep({"a": [1]})
    env = sandbox.env()
    env["SWEEPRUN_HOME"] = str(target)
    result = subprocess.run([sys.executable, "-m", "sweeprun", "launch", str(sweep)],
                            env=env, cwd=sandbox.root, text=True, capture_output=True)
    assert result.returncode == 2, result.stderr
    assert f"SWEEPRUN_HOME={target}" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not sandbox.store.exists()


def test_a_wrapper_scripts_training_process_is_stopped_and_reaped_with_it(sandbox: Sandbox) -> None:
    """`sh -c "python train.py; ..."` (like `bash train.sh`, `torchrun`): SIGTERM reaches the
    training process, and what a killed launcher's wrapper left running is killed before the
    run starts again, so two processes never train one run."""
    steps = f"python {Path(__file__).parents[1] / 'scripts' / 'steps.py'} --x 1"
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 300, "sleep": 0.02},
                                command=f"sh -c '{steps.replace('python', sys.executable, 1)}; exit $?'")
    first = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: any(runs_dir(sandbox).glob("*/ckpt.json")), what="a checkpoint")
    os.kill(first.pid, signal.SIGKILL)  # the launcher alone: its direct child (sh) dies with it
    first.wait()
    (trainer,) = [e["pid"] for e in sandbox.events() if e["event"] == "start"]
    os.kill(trainer, 0)  # the wrapper's python outlived the wrapper
    second = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: len(starts(sandbox)) == 1 and sum(starts(sandbox).values()) == 2,
             what="the relaunch to start the run")
    wait_for(lambda: not os.path.exists(f"/proc/{trainer}") or
             open(f"/proc/{trainer}/stat").read().split()[2] == "Z", timeout=10,
             what="the orphaned trainer to be killed")
    os.killpg(second.pid, signal.SIGTERM)  # a preemption notice reaches the trainer through sh
    second.communicate(timeout=60)
    assert second.returncode == 143
    events = sandbox.events()
    assert [e["event"] for e in events] == ["start", "start", "preempted"]
    assert not [e for e in events if e["event"] == "overlap"]
    assert [r["state"] for r in sandbox.status(sweep).values()] == ["interrupted"]


def test_credentials_a_run_prints_stay_out_of_the_console_and_its_log(sandbox: Sandbox) -> None:
    script = sandbox.root / "chatty.py"
    script.write_text("print('syncing to s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/x?token=abc', flush=True)\n")
    sweep = sandbox.write_sweep({"a": [1]}, command=f"python {script}")
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0
    (run,) = runs_dir(sandbox).iterdir()
    log = (run / "logs" / "attempt-1.log").read_text()
    for text in (result.stdout, log):
        assert "s3://***@bucket/x?token=***" in text and "wJalrXUtnFEMI" not in text
