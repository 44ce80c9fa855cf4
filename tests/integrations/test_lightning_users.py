"""A Lightning script written the way users write them (tests/scripts/lightning_user.py:
gradient accumulation, ReduceLROnPlateau per epoch on an epoch-level metric, validation
twice per epoch, ModelCheckpoint top-2 inside the run folder, EarlyStopping that stops
mid-epoch, per-epoch metrics) killed, stopped and relaunched ends where the
uninterrupted run ends: weights, optimizer, both the scheduler's and the callbacks'
state, the ModelCheckpoint files and best model, and every metrics line.

12 optimizer steps per epoch (24 batches, 2 per step), validation after steps 6 and 12
of each epoch; EarlyStopping ends the run at step 42, in the middle of epoch 3.
"""

from __future__ import annotations

import importlib.util
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sweeprun.runenv import PREEMPTED_EXIT

from _training_helpers import (
    REPO,
    SIGKILL,
    ExampleRun,
    assert_same_tree,
    interrupt_repeatedly,
    stop_the_launcher_mid_run_then_relaunch,
)
from conftest import Sandbox

# Skipped without Lightning, found without importing it: an import costs seconds of CPU in
# every pytest-xdist worker that merely collects this file.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="Lightning is not installed")

SCRIPT = REPO / "tests" / "scripts" / "lightning_user.py"
TOTAL_STEPS = 42
FLAGS = ("--save-every-steps", "5", "--sleep-s", "0.01")


def user_run(out: Path, *flags: str) -> ExampleRun:
    return ExampleRun(out, flags=(*FLAGS, *flags), script=SCRIPT)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> ExampleRun:
    """The run never interrupted (the save cadence does not change what it computes)."""
    run = user_run(tmp_path_factory.mktemp("reference"), "--sleep-s", "0")
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert f"fit returned at step {TOTAL_STEPS}" in result.stdout
    return run


def lightning_state(run: ExampleRun) -> dict[str, Any]:
    state = run.final_state()
    assert state["step"] == TOTAL_STEPS
    return state["objects"]["lightning"]["trainer"]


def model_checkpoints(run: ExampleRun) -> dict[str, Any]:
    folder = run.out / "lightning_ckpts"
    return {p.name: torch.load(p, weights_only=False) for p in sorted(folder.iterdir())}


def assert_same_ending(run: ExampleRun, reference: ExampleRun) -> None:
    got, want = lightning_state(run), lightning_state(reference)
    assert got["global_step"] == want["global_step"] == TOTAL_STEPS
    assert_same_tree(got["state_dict"], want["state_dict"], "model")
    assert_same_tree(got["optimizer_states"], want["optimizer_states"], "optimizer")
    (plateau,) = got["lr_schedulers"]
    assert_same_tree(plateau, want["lr_schedulers"][0], "scheduler")
    assert plateau["num_bad_epochs"] is not None and plateau["_last_lr"] == [0.025]
    assert_same_tree(got["loops"], want["loops"], "loops")
    early = [k for k in got["callbacks"] if k.startswith("EarlyStopping")]
    assert early and all(got["callbacks"][k] == want["callbacks"][k] for k in early)
    files, reference_files = model_checkpoints(run), model_checkpoints(reference)
    assert list(files) == list(reference_files) and len(files) == 2
    for name in files:
        assert_same_tree(files[name]["state_dict"], reference_files[name]["state_dict"], name)
    assert run.entries() == reference.entries()
    assert [e["step"] for e in run.entries()] == list(range(1, TOTAL_STEPS + 1))


@pytest.mark.slow  # a variant: the fast subset keeps the file's other tests
def test_the_uninterrupted_run_logs_step_validation_and_epoch_values(reference: ExampleRun) -> None:
    entries = {e["step"]: e for e in reference.entries()}
    assert "val_loss" in entries[6] and "train_loss_epoch" not in entries[6]
    assert {"val_loss", "train_loss_epoch", "train_acc"} <= set(entries[12])
    assert "val_loss" not in entries[7] and "train_loss_step" in entries[7]
    assert "train_loss_epoch" in entries[42]  # EarlyStopping ends epoch 3 after its validation


@pytest.mark.slow  # three Lightning processes
def test_sigkill_at_random_steps_then_rerun_matches(tmp_path: Path, reference: ExampleRun) -> None:
    run = user_run(tmp_path / "run")
    hit = interrupt_repeatedly(run, SIGKILL, kills=2, seed=11, span=14)
    assert all(0 < s < TOTAL_STEPS for s in hit)
    assert_same_ending(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("every", ["6", "12"], ids=["after-validation", "at-epoch-end"])
def test_resume_from_a_validation_or_an_epoch_end_matches(tmp_path: Path, reference: ExampleRun,
                                                          every: str) -> None:
    """Saves every 6 steps land right after a validation (mid-epoch) or after an epoch's end
    (every 12): the epoch-end work (plateau step, epoch metrics, callbacks) runs once."""
    run = user_run(tmp_path / "run", "--save-every-steps", every)
    code, seen, err = run.interrupt_at(27, SIGKILL)
    assert code == -SIGKILL and seen >= 27, err
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "(step 24, epoch 1)" in result.stderr, result.stderr
    assert_same_ending(run, reference)


@pytest.mark.slow  # a variant: the fast subset keeps the file's other tests
def test_a_model_checkpoint_file_of_a_lost_attempt_is_removed(tmp_path: Path,
                                                                reference: ExampleRun) -> None:
    """Killed after the validation at step 18 wrote a top-2 file (and deleted an older one)
    but before the step-20 checkpoint: the rerun resumes at step 15, where ModelCheckpoint
    knows neither, finds the older file still there and removes the newer one."""
    run = user_run(tmp_path / "run")
    code, seen, err = run.interrupt_at(19, SIGKILL)
    assert code == -SIGKILL and 19 <= seen < 20, err
    assert any("step=18" in p.name for p in (run.out / "lightning_ckpts").iterdir())
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "(step 15, epoch 1)" in result.stderr
    assert "step=18" in result.stderr and "a ModelCheckpoint file of an attempt" in result.stderr
    assert_same_ending(run, reference)


@pytest.mark.slow
def test_killed_during_a_save_then_rerun_matches(tmp_path: Path, reference: ExampleRun) -> None:
    """The third save (step 15) dies half done; the rerun resumes from step 10. Both crash
    points in one run directory: the first rerun resumes from step 10 and dies at the second
    point in its own first save (step 15 again); the last rerun ends as the run never
    interrupted."""
    run = user_run(tmp_path / "run")
    for i, point in enumerate(["checkpoint.snapshot_taken", "checkpoint.before_manifest"]):
        crashed = run.complete(env={"SWEEPRUN_CRASH_AT": f"{point}@{1 if i else 3}"})
        assert crashed.returncode == -SIGKILL, (point, crashed.stderr)
        assert i == 0 or "(step 10, epoch 0)" in crashed.stderr, (point, crashed.stderr)
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "(step 10, epoch 0)" in result.stderr, result.stderr
    assert_same_ending(run, reference)


@pytest.mark.slow  # two Lightning starts; the fast subset resumes a kill in the ModelCheckpoint test
def test_killed_after_the_final_checkpoint_finishes_on_relaunch(tmp_path: Path,
                                                                reference: ExampleRun) -> None:
    """SIGKILL once the final checkpoint is durable, before the process exits: the relaunch
    finds the fit already done, and the run still finishes (a new final checkpoint)."""
    run = user_run(tmp_path / "run")
    proc = run.start("--linger-s", "60")
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(f"fit returned at step {TOTAL_STEPS}")
    proc.kill()
    proc.communicate(timeout=60)
    before = {p.name for p in (run.out / "checkpoints").iterdir()}
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert f"(step {TOTAL_STEPS}, epoch 3)" in result.stderr
    assert {p.name for p in (run.out / "checkpoints").iterdir()} != before
    assert_same_ending(run, reference)


def sigterm_after(run: ExampleRun, step: int, delay_s: float, *extra: str) -> tuple[int, int, str]:
    """Start the run, send SIGTERM ``delay_s`` after it logged ``step``; (exit code, step
    seen when signalled, stderr)."""
    proc = run.start(*extra)
    deadline = time.monotonic() + 120
    while proc.poll() is None and run.last_step() < step and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay_s)
    seen = run.last_step()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, seen, err


@pytest.mark.slow
def test_every_sigterm_saves_the_step_it_stopped_at(tmp_path: Path, reference: ExampleRun) -> None:
    """SIGTERM at many moments: mid-accumulation, during validation (slowed down), during
    an asynchronous save, at an epoch's end. Each attempt exits 75 with a checkpoint at the
    last step it logged (the next attempt resumes there), and the run ends as the reference.
    Each delay after a logged step is used once (five Lightning starts, not eight: the same
    spread of moments)."""
    run = user_run(tmp_path / "run", "--val-sleep-s", "0.05")
    rng = random.Random(7)
    stops = 0
    for delay_s in rng.sample([0, 0.003, 0.01, 0.03, 0.07], 5):
        if run.last_step() >= TOTAL_STEPS - 3:
            break
        target = run.last_step() + rng.randint(1, 6)
        code, seen, err = sigterm_after(run, target, delay_s)
        if code == 0:
            break
        stops += 1
        assert code == PREEMPTED_EXIT, err
        saved = run.final_state()["step"]
        assert saved == run.last_step() >= seen, err
        assert "SIGTERM received" in err and f"at step {saved};" in err, err
    assert stops >= 4
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert_same_ending(run, reference)


@pytest.mark.slow
def test_a_sweep_stopped_with_sigterm_and_relaunched_matches(sandbox: Sandbox,
                                                              reference: ExampleRun) -> None:
    """Under ``sweeprun launch``: SIGTERM to the launcher mid-run, then a relaunch."""
    command = f"python {SCRIPT} --seed {{seed}} --save-every-steps 5 --sleep-s 0.02"
    sweep = sandbox.write_sweep({"seed": [0]}, {}, command=command)
    run = stop_the_launcher_mid_run_then_relaunch(sandbox, sweep, past_step=17)
    assert_same_ending(run, reference)




def test_stray_files_are_removed_only_where_the_callbacks_state_was_restored_for_that_folder(
        tmp_path: Path) -> None:
    """Lightning restores a ModelCheckpoint's kept files only when its folder is unchanged; in a
    run directory that moved (another mount), it knows none of them, and none may be deleted."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sweeprun.integrations._lightning_state import ModelCheckpointFiles

    run_dir = tmp_path / "run"
    folder = run_dir / "ckpts"
    folder.mkdir(parents=True)
    kept, lost = folder / "epoch=0-step=5.ckpt", folder / "epoch=1-step=9.ckpt"
    kept.write_bytes(b"a")
    lost.write_bytes(b"b")
    callback = ModelCheckpoint(dirpath=str(folder), monitor="val_loss", save_top_k=2)
    callback.best_k_models = {str(kept): torch.tensor(0.5)}

    class FakeTrainer:
        checkpoint_callbacks = [callback]

    files = ModelCheckpointFiles(str(run_dir))
    moved = {callback.state_key: {"dirpath": "/elsewhere/run/ckpts"}}
    assert files.remove_strays(FakeTrainer(), moved) == []
    assert files.remove_strays(FakeTrainer(), {}) == [], "a callback with no restored state"
    assert kept.exists() and lost.exists()
    same = {callback.state_key: {"dirpath": callback.dirpath}}
    assert files.remove_strays(FakeTrainer(), same) == [str(lost)]
    assert kept.exists() and not lost.exists()
