"""Deterministic crash points and zombie fencing on the launcher side.

``SWEEPRUN_CRASH_AT=<point>`` makes the process SIGKILL itself at that point
(see sweeprun/faults.py); each test then relaunches normally and checks that
the sweep recovers: nothing torn is read, nothing done is re-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from sweeprun.faults import POINTS
from sweeprun.training import load_checkpoint

from _training_helpers import TOTAL_STEPS, ExampleRun, assert_same_run, example_reference
from conftest import Sandbox, wait_for


def starts(sandbox: Sandbox) -> list[dict]:
    return [e for e in sandbox.events() if e["event"] == "start"]


def launch_crashing(sandbox: Sandbox, sweep, point: str):
    return sandbox.run("launch", str(sweep), env={"SWEEPRUN_CRASH_AT": point})


def assert_recovers(sandbox: Sandbox, sweep) -> None:
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    status = sandbox.status(sweep)
    assert {row["state"] for row in status.values()} == {"done"}
    finished = Counter(e["run"] for e in sandbox.events() if e["event"] == "finish")
    assert set(finished) == set(status)
    assert not [e for e in sandbox.events() if e["event"] == "overlap"]


@pytest.mark.parametrize("point", ["ledger.in_claim", "ledger.in_heartbeat", "runner.before_done"])
def test_launcher_killed_at_crash_point_recovers(sandbox: Sandbox, point: str) -> None:
    assert point in POINTS
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 20, "sleep": 0.05}, lease_s=3600)
    crashed = launch_crashing(sandbox, sweep, point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    before = sandbox.events()
    if point == "ledger.in_claim":
        assert before == []  # killed before any child started; the claim was rolled back
    # a long lease does not matter: the holder's pid is gone, so its run is taken at once
    assert_recovers(sandbox, sweep)
    if point == "runner.before_done":
        # the child had finished: the relaunch restarts at its final checkpoint, recomputes nothing
        restarted = [e for e in sandbox.events()[len(before):] if e["event"] == "start"]
        assert restarted and restarted[0]["from_step"] == 20
    if point == "ledger.in_heartbeat":
        # the child died with its launcher and resumed from its own checkpoint
        resumed = [e for e in sandbox.events()[len(before):] if e["event"] == "start"]
        assert resumed


def test_worker_paused_past_its_lease_is_fenced_out(sandbox: Sandbox) -> None:
    """SIGSTOP a launcher and its child (a frozen VM) past the lease; another worker takes
    the run over; SIGCONT: the zombie learns it lost the run and writes nothing."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 60, "sleep": 0.05}, lease_s=2)
    zombie = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: any((sandbox.store / "t" / "runs").glob("*/ckpt.json")), what="a checkpoint")
    os.killpg(zombie.pid, signal.SIGSTOP)
    paused_at = time.monotonic()
    rescuer = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: len(starts(sandbox)) == 2, what="the rescuer to take the run over")
    assert time.monotonic() - paused_at >= 2 - 0.1  # not before the lease expired
    os.killpg(zombie.pid, signal.SIGCONT)
    z_out, _ = zombie.communicate(timeout=60)
    r_out, r_err = rescuer.communicate(timeout=60)
    assert rescuer.returncode == 0, r_err
    assert "lost the lease" in z_out
    (run_dir,) = (sandbox.store / "t" / "runs").iterdir()
    done = json.loads((run_dir / "DONE").read_text())
    assert done["attempt"] == 2 and done["worker"].endswith(f":{rescuer.pid}")
    events = sandbox.events()
    assert not [e for e in events if e["event"] == "overlap"]
    assert [e["attempt"] for e in events if e["event"] == "finish"] == [2]


# -- storage faults: the store fills up or turns read-only during a save -----------------

def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path):
    """A real 2 MiB filesystem (tmpfs), where this machine lets us mount one."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow  # whole training runs; the full suite (CI) runs it
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_store_fault_during_a_save_keeps_the_previous_checkpoint(small_fs: Path, shared_dir: Path,
                                                                  fault: str) -> None:
    reference = example_reference(shared_dir)
    run = ExampleRun(small_fs / "run")
    proc = run.start("--step-sleep-s", "0.05")
    wait_for(lambda: any((small_fs / "run" / "checkpoints").glob("*.json")), what="a first checkpoint")
    if fault == "full":
        filler = _fill(small_fs)
    else:
        # The run holds its metrics file open, and Linux refuses to remount a filesystem
        # read-only under an open writer; so the store turns read-only between two attempts
        # (a drive remounted read-only while the run was preempted), and the next one meets it.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 75
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
        proc = run.start()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, 75), err
    reason = "No space left on device" if fault == "full" else "Read-only file system"
    assert reason in err
    saved = load_checkpoint(small_fs / "run")  # the previous checkpoint is intact and verifies
    assert 0 < saved["step"] < TOTAL_STEPS

    if fault == "full":
        filler.unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    again = run.complete()  # the same command, once there is room: resumes and matches exactly
    assert again.returncode == 0, again.stderr
    assert f"(step {saved['step']}" in again.stderr
    assert_same_run(run, reference)
