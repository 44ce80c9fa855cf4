"""Asynchronous saves (the default for cadence saves): the training thread takes a snapshot,
a background thread fences, flushes the metrics and writes.

What must hold whatever the timing: a kill at any phase of a background save leaves the
previous checkpoint usable and the rerun bit-exact; a failed background write is raised
on the training thread; a stop request and the end of the interpreter wait for the write;
one snapshot at most lives at a time; a fenced-out process's late save writes nothing.
Real processes and signals where a user would meet them; no assertion on wall time.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from test_checkpoint import Trainer, saved_steps
from test_training_edges import launched, names

from sweeprun.errors import CheckpointError, LeaseLost
from sweeprun.runenv import PREEMPTED_EXIT
from sweeprun.training.run import load_checkpoint
from sweeprun.training.writer import Snapshot

from _training_helpers import REPO, SIGKILL, ExampleRun, assert_same_run


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> ExampleRun:
    run = ExampleRun(tmp_path_factory.mktemp("reference"))
    result = run.complete(env={"SWEEPRUN_ASYNC_SAVE": "0"})   # written synchronously: same result
    assert result.returncode == 0, result.stderr
    return run


def background_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sweeprun-checkpoint"]


def wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60          # guards a hang only
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# -- a machine lost in the middle of a background save ------------------------------------------


@pytest.mark.parametrize("phase", ["checkpoint.snapshot_taken", "checkpoint.mid_write",
                                   "checkpoint.before_rename", "checkpoint.before_manifest"])
def test_sigkill_in_each_phase_of_a_background_save_keeps_the_previous_and_resumes_exactly(
        tmp_path: Path, reference: ExampleRun, phase: str) -> None:
    """The example saves every 7 steps; the process SIGKILLs itself during the second save,
    on the background thread, while the training thread may already be steps further."""
    run = ExampleRun(tmp_path / "run")
    crashed = run.complete(env={"SWEEPRUN_CRASH_AT": f"{phase}@2"})
    assert crashed.returncode == -SIGKILL, crashed.stderr
    assert load_checkpoint(run.out)["step"] == 7          # the first save, whole and verified
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "resumed from ckpt-a1-00000001-step0000000007.pt (step 7" in result.stderr
    assert_same_run(run, reference)
    leftovers = [p.name for p in (run.out / "checkpoints").iterdir() if not p.name.startswith("ckpt-")]
    assert leftovers == []


# -- a failed background write ------------------------------------------------------------------


def break_the_checkpoints_folder(run_dir: Path) -> None:
    """A real failure for the next write: the folder is replaced by a file (root ignores chmod)."""
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").write_text("not a folder")


@pytest.mark.parametrize("surfaces_at", ["next step", "save", "wait", "finish", "close"])
def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path: Path, surfaces_at: str) -> None:
    t = Trainer.start(str(tmp_path), every_steps=2)
    t.train(2)
    t.run.wait()
    break_the_checkpoints_folder(tmp_path)
    t.train(2)                                   # step 4: the save starts in the background, fails there
    wait_for(lambda: not background_threads(), "the background save to end")
    with pytest.raises(CheckpointError, match="checkpoints folder .* is not a folder"):
        if surfaces_at == "next step":
            t.train(1)
        elif surfaces_at == "save":
            t.run.save(wait=False)
        elif surfaces_at == "wait":
            t.run.wait()
        elif surfaces_at == "finish":
            t.run.finish()
        else:
            t.run.close()
    t.run.close()                                # raised once: closing afterwards is quiet


def test_a_script_whose_background_write_failed_exits_2_with_one_line(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import os, shutil, sys, time
        import torch, sweeprun
        out = sys.argv[1]
        model = torch.nn.Linear(2, 1)
        run = sweeprun.init(params={}, local_dir=out, every_steps=2).track(model=model)
        for step in range(6):
            if step == 3:
                run.wait()
                shutil.rmtree(os.path.join(out, "checkpoints"))
                open(os.path.join(out, "checkpoints"), "w").close()
            run.end_step(loss=0.0)
        run.finish()
        print("finished")
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPRUN_")}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True,
                            text=True, env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "finished" not in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("sweeprun: error: checkpoints folder")
    assert "Traceback" not in result.stderr


# -- exits wait for the write ------------------------------------------------------------------

SLOW_SAVES = textwrap.dedent("""
    import sys, time
    import torch, sweeprun
    out, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(6)))   # ~25 MB
    run = sweeprun.init(params={}, local_dir=out, every_steps=1, keep_last=2).track(model=model)
    run.restore()
    for _ in range(10_000):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        run.end_step(loss=float(run.step))
        print(run.step, flush=True)
        if mode == "return" and run.step == 3:
            sys.exit(0)     # leaves with the step-3 save in flight, no finish()
        time.sleep(0.001)
    """)


def start_slow_saves(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(SLOW_SAVES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPRUN_")}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), mode], text=True,
                            env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_sigterm_waits_for_the_save_in_flight_then_saves_the_last_step(tmp_path: Path) -> None:
    """Every step starts a background save of ~25 MB, so one is nearly always in flight
    when SIGTERM lands: the stop waits for it, writes the step it stopped at, exits 75."""
    proc = start_slow_saves(tmp_path, "loop")
    assert proc.stdout is not None
    printed = [proc.stdout.readline() for _ in range(5)]         # steps 1..5 are done
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err
    assert printed[-1].strip() == "5"
    logged = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    last_step = json.loads(logged[-1])["step"]                   # nothing logged is lost
    assert last_step >= 5 and load_checkpoint(tmp_path / "out")["step"] == last_step
    assert f"at step {last_step}; exiting with 75" in err
    assert all(n.startswith("ckpt-") for n in names(tmp_path / "out")), names(tmp_path / "out")


def test_the_interpreter_waits_for_a_save_in_flight_at_exit(tmp_path: Path) -> None:
    proc = start_slow_saves(tmp_path, "return")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert load_checkpoint(tmp_path / "out")["step"] == 3
    assert all(n.startswith("ckpt-") for n in names(tmp_path / "out"))


# -- memory ------------------------------------------------------------------------------------


def live_snapshots() -> int:
    gc.collect()                    # garbage in cycles (an earlier test's) is not alive
    return sum(type(o) is Snapshot for o in gc.get_objects())


def test_memory_stays_bounded_to_one_snapshot_over_50_saves(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path), every_steps=1, keep_last=2)
    assert live_snapshots() == 0
    most = 0
    for _ in range(50):
        t.train(1)                               # each step starts a background save
        most = max(most, live_snapshots(), len(background_threads()))
    t.run.finish()
    assert most == 1
    assert live_snapshots() == 0 and background_threads() == []
    assert saved_steps(t.run) == [50, 50]       # the cadence's and finish()'s, both kept


def test_sync_mode_writes_before_returning_and_never_starts_a_thread(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path), every_steps=1, async_save=False)
    t.train(3)
    assert background_threads() == [] and live_snapshots() == 0
    assert saved_steps(t.run) == [1, 2, 3]      # already on disk, nothing to wait for
    t.run.close()


def test_the_environment_can_turn_async_saves_off(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path), env={"SWEEPRUN_ASYNC_SAVE": "0"})
    assert t.run.async_save is False
    t.run.close()


# -- fencing a late background save ------------------------------------------------------------


def test_a_fenced_out_writers_late_background_save_writes_nothing(tmp_path: Path) -> None:
    """Attempt 1 takes a snapshot at step 4 and its machine freezes before the write; attempt 2
    takes over and saves. When attempt 1 wakes, its background save is fenced out: nothing of
    it lands, and the next attempt restores attempt 2's state."""
    stale = launched(tmp_path, attempt=1, every_steps=2, keep_last=5)
    stale.train(2)
    stale.run.wait()                                  # a1 step 2 is durable
    frozen, fence = threading.Event(), stale.run._writer.fence

    def frozen_fence():  # type: ignore[no-untyped-def]
        frozen.wait(timeout=60)                       # the machine is frozen until released
        return fence()

    stale.run._writer.fence = frozen_fence            # type: ignore[method-assign]
    stale.train(2)                                    # step 4: snapshot taken, write held

    successor = launched(tmp_path, attempt=2, every_steps=2, keep_last=5)
    assert successor.run.restore() and successor.run.step == 2
    successor.train(4)
    successor.run.finish()
    before = {n: (tmp_path / "checkpoints" / n).read_bytes() for n in names(tmp_path)}

    frozen.set()                                      # attempt 1 wakes up
    with pytest.raises(LeaseLost, match="attempt 2 .* attempt 1 .* took the run over"):
        stale.run.wait()
    stale.run.close()
    assert {n: (tmp_path / "checkpoints" / n).read_bytes() for n in names(tmp_path)} == before
    third = launched(tmp_path, attempt=3, every_steps=2)
    assert third.run.restore() and third.run.step == 6
    assert torch.equal(third.model.weight, successor.model.weight)
    third.run.close()
