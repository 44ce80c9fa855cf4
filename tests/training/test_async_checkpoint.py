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
from test_training_edges import launched, launcher_env, names

from sweeprun.errors import CheckpointError, LeaseLost
from sweeprun.runenv import PREEMPTED_EXIT
from sweeprun.training import load_checkpoint
from sweeprun.training.writer import Snapshot

from _training_helpers import REPO, SIGKILL, ExampleRun, assert_same_run
from conftest import wait_for


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> ExampleRun:
    run = ExampleRun(tmp_path_factory.mktemp("reference"))
    result = run.complete(env={"SWEEPRUN_ASYNC_SAVE": "0"})   # written synchronously: same result
    assert result.returncode == 0, result.stderr
    return run


def background_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sweeprun-checkpoint"]


# -- a machine lost in the middle of a background save ------------------------------------------


@pytest.mark.slow  # five starts of the example: the full suite
def test_sigkill_in_each_phase_of_a_background_save_keeps_the_previous_and_resumes_exactly(
        tmp_path: Path, reference: ExampleRun) -> None:
    """The example saves every 7 steps; the process SIGKILLs itself during the second save,
    on the background thread, while the training thread may already be steps further.
    Each phase in turn, in one run directory (one start per phase, not two): every rerun
    resumes from step 7 and dies in the next phase of its own first save (step 14 again),
    the debris of the earlier deaths still there; the last rerun ends as the run never
    interrupted, with no temp file left."""
    run = ExampleRun(tmp_path / "run")
    phases = ["checkpoint.snapshot_taken", "checkpoint.mid_write", "checkpoint.before_rename",
              "checkpoint.before_manifest"]
    resumed = "resumed from ckpt-a1-00000001-step0000000007.pt (step 7"
    for i, phase in enumerate(phases):
        crashed = run.complete(env={"SWEEPRUN_CRASH_AT": f"{phase}@{1 if i else 2}"})
        assert crashed.returncode == -SIGKILL, (phase, crashed.stderr)
        assert i == 0 or resumed in crashed.stderr, (phase, crashed.stderr)
        assert load_checkpoint(run.out)["step"] == 7, phase   # the first save, whole and verified
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert resumed in result.stderr
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
    wait_for(lambda: not background_threads(), what="the background save to end", poll_s=0.005)
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


@pytest.mark.slow  # 20 saves of a real model: a resource bound, in the full suite
def test_memory_stays_bounded_to_one_snapshot_over_20_saves(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path), every_steps=1, keep_last=2)
    assert live_snapshots() == 0
    most = 0
    for _ in range(20):
        t.train(1)                               # each step starts a background save
        most = max(most, live_snapshots(), len(background_threads()))
    t.run.finish()
    assert most == 1
    assert live_snapshots() == 0 and background_threads() == []
    assert saved_steps(t.run) == [20, 20]       # the cadence's and finish()'s, both kept


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


# -- a save held back past the start of the next attempt ----------------------------------------

HELD_BACK = textwrap.dedent("""
    import sys
    import torch, sweeprun
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    run = sweeprun.init(params={}, local_dir=sys.argv[1], every_steps=2, keep_last=5,
                        async_save=sys.argv[2] == "async").track(model=model)
    run.restore()
    while run.step < 6:
        with torch.no_grad():
            model.weight.add_(1.0)
        run.end_step(loss=float(run.step))
    run.finish()
    """)


def freeze_at_the_second_save(tmp_path: Path, run_dir: Path, mode: str, phase: str,
                              env: dict[str, str]) -> subprocess.Popen[str]:
    """Start the script and return once it has SIGSTOPped itself at ``phase`` of its second
    save (step 4): a machine frozen mid-save, as a paused VM is."""
    script = tmp_path / "train.py"
    script.write_text(HELD_BACK)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPRUN_")}
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), mode], text=True,
                            env={**clean, "PYTHONPATH": str(REPO), **env,
                                 "SWEEPRUN_FREEZE_AT": f"{phase}@2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120                    # guards a hang only
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return proc
        assert not pid, f"the script ended (status {status}) instead of freezing at {phase}"
        assert time.monotonic() < deadline, f"the script never reached {phase}"
        time.sleep(0.01)


@pytest.mark.parametrize("mode,phase", [("async", "checkpoint.snapshot_taken"),
                                        ("async", "checkpoint.before_manifest"),
                                        ("sync", "checkpoint.mid_write"),
                                        ("sync", "checkpoint.before_manifest")])
def test_a_save_held_back_past_the_next_attempts_start_lands_nothing(
        tmp_path: Path, mode: str, phase: str) -> None:
    """Attempt 1 freezes in the middle of its step-4 save. The launcher starts attempt 2,
    which records itself in attempts/ (before any save of its own). When attempt 1 wakes,
    its save is refused, before the data (the fence) or before the manifest (the check
    again): it exits 75, and a restore still finds only its step-2 checkpoint."""
    run_dir = tmp_path / "runs" / "r-1"
    (run_dir / "attempts").mkdir(parents=True)
    (run_dir / "attempts" / "1.json").write_text('{"attempt": 1}\n')   # as the launcher does
    proc = freeze_at_the_second_save(tmp_path, run_dir, mode, phase, launcher_env(run_dir, 1))

    (run_dir / "attempts" / "2.json").write_text('{"attempt": 2}\n')   # attempt 2 starts
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == PREEMPTED_EXIT, err
    assert err.strip().splitlines()[-1] == (
        f"sweeprun: error: attempt 2 has started ({run_dir}/attempts/2.json) and this process "
        "is attempt 1 of run r-1 of sweep grid: another worker took the run over; stopping "
        "without writing")
    assert names(run_dir) == ["ckpt-a1-00000001-step0000000002.json",
                              "ckpt-a1-00000001-step0000000002.pt"]
    assert load_checkpoint(run_dir)["step"] == 2
    assert not (run_dir / "attempts" / "1.finished").exists()


def test_a_standalone_save_held_back_just_lands_late(tmp_path: Path) -> None:
    """No launcher, no attempts/: nothing can take the run over, so a frozen save simply
    completes when the process wakes, as it always did."""
    run_dir = tmp_path / "out"
    proc = freeze_at_the_second_save(tmp_path, run_dir, "async", "checkpoint.before_manifest", {})
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [m for m in names(run_dir) if m.endswith(".json")] == [
        "ckpt-a1-00000001-step0000000002.json", "ckpt-a1-00000002-step0000000004.json",
        "ckpt-a1-00000003-step0000000006.json", "ckpt-a1-00000004-step0000000006.json"]
    assert load_checkpoint(run_dir)["step"] == 6
