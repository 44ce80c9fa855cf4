"""The Lightning integration, shown with real processes: examples/lightning_mlp.py (dropout,
a shuffled sampler, an augmentation drawing from the global python and numpy RNGs) killed
or stopped mid-epoch and run again ends bit for bit where the uninterrupted run ends.

Each run is standalone (``--out``); kills come from outside once metrics.jsonl shows the
chosen step. Compared: the LightningModule's weights, the optimizer and scheduler state
(``torch.equal``), and every metrics line (loss and LR at every step, one line per step).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sweeprun.runenv import PREEMPTED_EXIT

from _training_helpers import (
    REPO,
    SIGKILL,
    SIGTERM,
    ExampleRun,
    assert_same_tree,
    interrupt_repeatedly,
)

# Skipped without Lightning, found without importing it: an import costs seconds of CPU in
# every pytest-xdist worker that merely collects this file.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="Lightning is not installed")

EXAMPLE = REPO / "examples" / "lightning_mlp.py"
#: 16 batches per epoch, 4 epochs; saves every 5 steps land mid-epoch; steps slow enough
#: that a signal lands mid-run.
FLAGS = ("--lr", "0.01", "--seed", "3", "--epochs", "4", "--save-every-steps", "5",
         "--step-sleep-s", "0.02")
TOTAL_STEPS = 64


def lightning_run(out: Path) -> ExampleRun:
    return ExampleRun(out, flags=FLAGS, script=EXAMPLE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> ExampleRun:
    """The run never interrupted."""
    run = lightning_run(tmp_path_factory.mktemp("reference"))
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"done: step {TOTAL_STEPS}, final loss"), result.stdout
    return run


@pytest.fixture(scope="module")
def val_reference(tmp_path_factory: pytest.TempPathFactory) -> ExampleRun:
    """The run never interrupted, validating at each epoch's end (its augmentation draws
    from the same global RNGs, so its training differs from ``reference``)."""
    run = ExampleRun(tmp_path_factory.mktemp("val-reference"), flags=(*FLAGS, "--val"),
                     script=EXAMPLE)
    assert run.complete().returncode == 0
    return run


def trainer_state(run: ExampleRun) -> dict[str, Any]:
    state = run.final_state()
    assert state["step"] == TOTAL_STEPS
    return state["objects"]["lightning"]["trainer"]


def assert_same_ending(run: ExampleRun, reference: ExampleRun) -> None:
    got, want = trainer_state(run), trainer_state(reference)
    assert got["global_step"] == want["global_step"] == TOTAL_STEPS
    assert_same_tree(got["state_dict"], want["state_dict"], "model")
    assert_same_tree(got["optimizer_states"], want["optimizer_states"], "optimizer")
    assert_same_tree(got["lr_schedulers"], want["lr_schedulers"], "scheduler")
    entries = run.entries()
    assert [e["step"] for e in entries] == list(range(1, TOTAL_STEPS + 1))
    assert entries == reference.entries()


@pytest.mark.slow  # three Lightning processes (a few seconds each to import)
def test_sigterm_then_a_sigkill_mid_epoch_then_rerun_matches_the_uninterrupted_run(
        tmp_path: Path, reference: ExampleRun) -> None:
    """SIGTERM saves and exits 75 at the step it stopped (mid-epoch); then, in the same run
    directory, SIGKILL at a random step; the rerun ends where the uninterrupted run ends.
    (One run for both: a SIGTERM save that was wrong would carry into the end. Repeated
    kills at random steps: test_lightning_users, on the script users write.)"""
    run = lightning_run(tmp_path / "run")
    code, seen, err = run.interrupt_at(11, SIGTERM)
    assert code == PREEMPTED_EXIT, err
    assert "SIGTERM received" in err and "exiting with 75" in err
    saved = run.final_state()
    assert saved["step"] == run.entries()[-1]["step"] >= seen  # the stop loses no step
    assert saved["step"] % 16 != 0 or saved["step"] == 0  # a mid-epoch stop, not an epoch end
    hit = interrupt_repeatedly(run, SIGKILL, kills=1, seed=5, span=18)
    assert all(0 < s < TOTAL_STEPS for s in hit)
    assert_same_ending(run, reference)


@pytest.fixture(scope="module")
def time_limited(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExampleRun, subprocess.CompletedProcess[str]]:
    """A run stopped by its time budget (saved mid-run, exit 75), and how it ended: what the
    next test checks, and a run to resume for the test after it (one Lightning start for both)."""
    run = lightning_run(tmp_path_factory.mktemp("time-limited") / "run")
    return run, run.complete(env={"SWEEPRUN_TIME_LIMIT": "0.5"})


def test_time_limit_saves_and_exits_75(time_limited: tuple[ExampleRun, subprocess.CompletedProcess[str]]) -> None:
    run, result = time_limited
    assert result.returncode == PREEMPTED_EXIT, result.stderr
    assert "time limit of 0.5 s reached" in result.stderr
    assert 0 < run.final_state()["step"] < TOTAL_STEPS


def test_fit_without_the_checkpoint_path_is_refused(
        tmp_path: Path, time_limited: tuple[ExampleRun, subprocess.CompletedProcess[str]]) -> None:
    """A script that forgets ``ckpt_path=`` would silently start over on a resume (here of a
    copy of the run the time budget stopped)."""
    script = tmp_path / "forgets.py"
    source = EXAMPLE.read_text().replace("ckpt_path=sweep.ckpt_path", "ckpt_path=None")
    script.write_text(source)
    stopped, _ = time_limited
    shutil.copytree(stopped.out, tmp_path / "run")
    run = ExampleRun(tmp_path / "run", flags=FLAGS, script=script)
    assert run.final_state()["step"] > 0
    result = run.complete()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("sweeprun: error: ")
    assert "pass ckpt_path=callback.ckpt_path" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_does_not_import_lightning() -> None:
    code = ("import sys, sweeprun.cli, sweeprun.integrations; "
            "assert 'lightning' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.slow
def test_killed_during_a_save_then_rerun_matches(tmp_path: Path, reference: ExampleRun) -> None:
    """The third save (step 15, mid-epoch) dies half done; the rerun resumes from step 10.
    Each crash point in turn, in one run directory (one Lightning start per point, not two):
    every rerun resumes from step 10 and dies at the next point in its own first save (step
    15 again), the debris of the earlier deaths still there; the last rerun ends as the run
    never interrupted. (The points before and after these two: test_lightning_users.)"""
    run = lightning_run(tmp_path / "run")
    points = ["checkpoint.mid_write", "checkpoint.before_rename"]
    for i, point in enumerate(points):
        crashed = run.complete(env={"SWEEPRUN_CRASH_AT": f"{point}@{1 if i else 3}"})
        assert crashed.returncode == -SIGKILL, (point, crashed.stderr)
        assert i == 0 or ("resumed from" in crashed.stderr and "(step 10," in crashed.stderr), \
            (point, crashed.stderr)
        assert run.last_step() >= 15, point  # it died in the step-15 save, not before
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "(step 10," in result.stderr, result.stderr
    assert_same_ending(run, reference)


@pytest.mark.slow
def test_resume_from_the_end_of_an_epoch_matches(tmp_path: Path, reference: ExampleRun) -> None:
    """Saves only at epoch ends (every 16 steps), no validation loop. (With one, the last
    batch's step ends after validation, and Lightning resumes a checkpoint of that batch
    as if its validation had run: the SIGTERM-before-validation test below saves exactly
    there, and test_lightning_users saves at epoch ends after validations.)"""
    flags = tuple(f if f != "5" else "16" for f in FLAGS)
    run = ExampleRun(tmp_path / "run", flags=flags, script=EXAMPLE)
    code, seen, err = run.interrupt_at(24, SIGKILL)
    assert code == -SIGKILL and seen >= 24, err
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "(step 16, epoch 0)" in result.stderr, result.stderr
    assert_same_ending(run, reference)


@pytest.mark.slow
def test_sigterm_before_validation_saves_after_it_and_the_rerun_matches(
        tmp_path: Path, val_reference: ExampleRun) -> None:
    """Signalled during the epoch's last batch, the run finishes that step, its validation
    and the epoch's end, then saves step 16 and exits 75 (Lightning's own SIGTERM handling,
    which would stop inside the validation without a checkpoint, is off during the fit)."""
    run = ExampleRun(tmp_path / "run", flags=(*FLAGS, "--val", "--step-sleep-s", "0.2"),
                     script=EXAMPLE)
    code, seen, err = run.interrupt_at(15, SIGTERM)
    assert (code, seen) == (PREEMPTED_EXIT, 15), err
    assert "SIGTERM received" in err and "at step 16;" in err, err
    assert run.final_state()["step"] == run.last_step() == 16
    result = run.complete("--step-sleep-s", "0")
    assert result.returncode == 0, result.stderr
    assert_same_ending(run, val_reference)
    assert [e["step"] for e in run.entries() if "val_loss" in e] == [16, 32, 48, 64]


@pytest.mark.slow
def test_resume_after_a_validation_inside_the_epoch_matches(tmp_path: Path) -> None:
    """Validation every 8 batches, saves every 8: the step-24 checkpoint (mid-epoch, written
    after its validation) resumes to the same end, and Lightning's "dataloader is not
    resumable" warning is not shown (the sampler resumes)."""
    flags = tuple(f if f != "5" else "8" for f in FLAGS) + ("--val", "--val-every", "8")
    reference = ExampleRun(tmp_path / "reference", flags=flags, script=EXAMPLE)
    assert reference.complete().returncode == 0
    run = ExampleRun(tmp_path / "run", flags=flags, script=EXAMPLE)
    code, seen, err = run.interrupt_at(28, SIGKILL)
    assert code == -SIGKILL and 28 <= seen < 32, err
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "(step 24, epoch 1)" in result.stderr and "not resumable" not in result.stderr
    assert_same_ending(run, reference)
    assert [e["step"] for e in run.entries() if "val_loss" in e] == list(range(8, 65, 8))
