"""Operating many workers: a time limit per worker, `sweeprun stop` for all of them, and a
lease that is given up on time even when the heartbeat hangs."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from sweeprun.errors import SpecError
from sweeprun.fleet import Deadline, parse_duration

from conftest import Sandbox, wait_for


def runs_dir(sandbox: Sandbox) -> Path:
    return sandbox.store / "t" / "runs"


def starts(sandbox: Sandbox) -> Counter:
    return Counter(e["run"] for e in sandbox.events() if e["event"] == "start")


@pytest.mark.parametrize("text, seconds", [("11h", 39600), ("90m", 5400), ("1h30m", 5400),
                                           ("2d", 172800), ("45s", 45), ("3600", 3600),
                                           ("1.5h", 5400), (" 1H 30M ", 5400)])
def test_durations_read_as_a_person_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "banana", "0", "-5m", "11 hours", "h", "400d", "1h-30m"])
def test_a_bad_duration_is_refused(text: str) -> None:
    with pytest.raises(SpecError, match="--time-limit"):
        parse_duration(text)


def test_claims_end_before_the_runs_are_asked_to_save() -> None:
    kaggle = Deadline(end=43200.0, grace_s=30.0, limit_s=43200.0)
    assert kaggle.stop_at == 43170.0 and kaggle.claims_end == 43110.0
    short = Deadline(end=10.0, grace_s=2.0, limit_s=10.0)
    assert short.stop_at == 8.0 and short.claims_end == 7.0


def test_a_bad_time_limit_is_one_line_and_writes_nothing(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]})
    result = sandbox.run("worker", str(sweep), "--time-limit", "soon")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--time-limit 'soon'" in result.stderr
    assert not sandbox.store.exists()


@pytest.mark.slow
def test_a_worker_with_a_time_limit_has_its_runs_save_and_exit_before_it(sandbox: Sandbox) -> None:
    """Kaggle's 12 hours, shrunk: the run is asked to save grace_s before the limit, exits 75,
    no new run is started, and the worker exits 75 (runs remain; nothing failed)."""
    sweep = sandbox.write_sweep({"a": [1, 2, 3]}, {"steps": 400, "sleep": 0.05}, grace_s=3)
    result = sandbox.run("worker", str(sweep), "--time-limit", "20s")
    assert result.returncode == 75, result.stdout + result.stderr
    assert "time limit reached" in result.stdout
    events = sandbox.events()
    assert [e["event"] for e in events] == ["start", "preempted"]
    status = sandbox.status(sweep)
    assert sorted(r["state"] for r in status.values()) == ["interrupted", "pending", "pending"]
    assert all(r["failures"] == 0 for r in status.values())
    # the next session resumes where it stopped
    again = sandbox.run("launch", str(sweep), "--workers", "3", timeout=180)
    assert again.returncode == 0
    resumed = [e for e in sandbox.events()[len(events):] if e["event"] == "start"]
    assert {e["run"]: e["from_step"] for e in resumed}[events[0]["run"]] == events[1]["step"]


@pytest.mark.slow
def test_stop_drains_every_worker_and_a_later_worker_runs(sandbox: Sandbox) -> None:
    """`sweeprun stop` from a third terminal stops two workers, on two (simulated) machines that
    share the store and the ledger; a worker started afterwards is not stopped by that request."""
    sweep = sandbox.write_sweep({"a": [1, 2, 3, 4]}, {"steps": 400, "sleep": 0.05})
    fast = {"SWEEPRUN_STOP_POLL_S": "0.2"}
    workers = [sandbox.sweeprun("worker", str(sweep), env={**fast, "SWEEPRUN_HOST": host})
               for host in ("vm-a", "vm-b")]
    wait_for(lambda: len(list(runs_dir(sandbox).glob("*/ckpt.json"))) >= 2, what="two runs saving")
    stopped = sandbox.run("stop", str(sweep))
    assert stopped.returncode == 0 and "asked every running worker" in stopped.stdout
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 75, out + err
        assert "sweeprun stop" in out
    events = sandbox.events()
    assert Counter(e["event"] for e in events) == {"start": 2, "preempted": 2}
    later = sandbox.run("worker", str(sweep), "--workers", "4", env=fast, timeout=180)
    assert later.returncode == 0
    assert {r["state"] for r in sandbox.status(sweep).values()} == {"done"}


def test_a_hung_heartbeat_still_gives_the_run_up_before_its_lease_ends(sandbox: Sandbox) -> None:
    """The heartbeat blocks (the ledger is locked and the busy timeout is 10 minutes, as a dead
    network connection blocks): the launcher's own clock stops the child once the lease may
    have run out, long before the heartbeat returns, and the run finishes afterwards."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 300, "sleep": 0.02}, lease_s=2)
    launcher = sandbox.sweeprun("launch", str(sweep), env={"SWEEPRUN_BUSY_TIMEOUT_S": "600"})
    wait_for(lambda: any(runs_dir(sandbox).glob("*/ckpt.json")), what="a checkpoint")
    (child,) = [e["pid"] for e in sandbox.events() if e["event"] == "start"]
    blocker = sqlite3.connect(sandbox.ledger, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        wait_for(lambda: not _alive(child), timeout=120, what="the child stopped while the heartbeat hangs")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, out + err
    assert "no lease renewal" in out
    assert [e["event"] for e in sandbox.events()] == ["start", "start", "finish"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_paused_machine_stops_its_child_when_it_wakes(sandbox: Sandbox) -> None:
    """A frozen VM (launcher and child stopped past the lease) wakes up: before anything else,
    its own clock tells it the lease may be gone, and it stops its child."""
    # max_lost 1: a pause that nobody used to take the run over is handed back, not counted
    # as an attempt lost with its machine (which would fail the run here)
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 600, "sleep": 0.02}, lease_s=2, max_lost=1)
    launcher = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: any(runs_dir(sandbox).glob("*/ckpt.json")), what="a checkpoint")
    (child,) = [e["pid"] for e in sandbox.events() if e["event"] == "start"]
    for group in (launcher.pid, child):
        os.killpg(group, signal.SIGSTOP)
    time.sleep(3)  # past the lease: the pause itself, not a wait for a result
    for group in (child, launcher.pid):
        os.killpg(group, signal.SIGCONT)
    wait_for(lambda: not _alive(child), timeout=60, what="the woken child stopped")
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, out + err
    assert "no lease renewal" in out
    assert [e["event"] for e in sandbox.events()] == ["start", "start", "finish"]


HIDE_AND_RUN = """
import sys
sys.modules[sys.argv[1]] = None  # as if the extra was never installed
from sweeprun.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("module, flag, value, extra", [
    ("s3fs", "--store", "s3://bucket/sweeps", "sweeprun[s3]"),
    ("psycopg", "--ledger", "postgresql://me@db.example.com/sweeps", "sweeprun[postgres]"),
])
def test_a_missing_extra_is_one_line_naming_the_pip_install(
        sandbox: Sandbox, module: str, flag: str, value: str, extra: str) -> None:
    sweep = sandbox.write_sweep({"a": [1]})
    for command in ("launch", "status"):
        result = subprocess.run([sys.executable, "-c", HIDE_AND_RUN, module, command, str(sweep), flag, value],
                                env=sandbox.env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and f"pip install '{extra}'" in result.stderr
    assert not sandbox.store.exists()


def test_two_stores_with_one_sweep_name_share_a_database_but_not_their_runs(
        sandbox: Sandbox, postgres_url: str) -> None:
    """One database for all of a team's sweeps: two sweep files named alike (or a relaunch with
    --store pointing at a new bucket) each run all of their own runs, at the same time."""
    sweep = sandbox.write_sweep({"a": [1, 2, 3, 4]}, {"steps": 5, "sleep": 0.05})
    stores = [sandbox.root / "store-x", sandbox.root / "store-y"]
    for store in stores:
        store.mkdir()  # each holds its own run locks too: the same run id may run in both at once
    workers = [subprocess.Popen([sys.executable, "-m", "sweeprun", "worker", str(sweep), "--store", str(store)],
                                env={**sandbox.env(SWEEPRUN_LEDGER=postgres_url), "LOCK_DIR": str(store)},
                                cwd=sandbox.root, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for store in stores]
    for worker in workers:
        out, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, out
    for store in stores:
        assert len(list((store / "t" / "runs").glob("*/DONE"))) == 4


def test_a_damaged_stop_request_does_not_drain_the_fleet(sandbox: Sandbox) -> None:
    """A store that cannot tell (a half-synced Drive, an error) is no news; only a new request
    that reads back whole stops workers, and one made before a worker started never does."""
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 150, "sleep": 0.05})
    assert sandbox.run("stop", str(sweep)).returncode == 0  # an old request, from yesterday
    worker = sandbox.sweeprun("worker", str(sweep), env={"SWEEPRUN_STOP_POLL_S": "0.2"})
    wait_for(lambda: any(runs_dir(sandbox).glob("*/ckpt.json")), what="a run saving")
    stop_file = sandbox.store / "t" / "STOP"
    old = stop_file.read_bytes()
    stop_file.write_bytes(b"{not json")
    time.sleep(1.5)  # several polls see the damaged file
    stop_file.write_bytes(old)
    time.sleep(1.0)  # and the old request again
    assert worker.poll() is None
    assert sandbox.run("stop", str(sweep)).returncode == 0
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 75, out + err


def test_ctrl_c_during_a_database_outage_exits_130_at_once(sandbox: Sandbox, postgres_server) -> None:
    """The network to the database is gone and the user presses Ctrl-C: the run saves and the
    launcher exits 130 now, not after waiting out the outage (10 minutes here)."""
    from servers import TcpProxy

    proxy = TcpProxy(postgres_server.port)
    try:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{postgres_server.database().rsplit('/', 1)[1]}"
        sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 400, "sleep": 0.05}, lease_s=60)
        launcher = subprocess.Popen([sys.executable, "-m", "sweeprun", "launch", str(sweep)],
                                    env=sandbox.env(SWEEPRUN_LEDGER=url, SWEEPRUN_LEDGER_WAIT_S="600"),
                                    cwd=sandbox.root, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: any(runs_dir(sandbox).glob("*/ckpt.json")), what="a run saving")
        proxy.cut()
        os.killpg(launcher.pid, signal.SIGINT)
        out, _ = launcher.communicate(timeout=120)
        assert launcher.returncode == 130, out
        assert [e["event"] for e in sandbox.events()] == ["start", "preempted"]
    finally:
        proxy.close()
