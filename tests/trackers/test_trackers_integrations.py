"""The integrations feed a tracker too (``tracker=`` on the Trainer's ``init`` and on
Lightning's callback): after a SIGKILL and a rerun, TensorBoard shows what the run's metrics
hold, each step once."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from _trackers import logged, same_series, tensorboard
from _training_helpers import REPO, ExampleRun


def killed_then_finished(run: ExampleRun, step: int) -> None:
    code, seen, err = run.interrupt_at(step, signal.SIGKILL)
    assert code == -signal.SIGKILL and seen >= step, err
    done = run.complete()
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # the fast subset keeps the Trainer's
def test_lightning_logs_to_tensorboard_each_step_once(tmp_path: Path) -> None:
    run = ExampleRun(tmp_path / "run", script=REPO / "tests" / "scripts" / "lightning_user.py",
                     flags=("--save-every-steps", "5", "--sleep-s", "0.01", "--epochs", "2",
                            "--tracker", "tensorboard"))
    killed_then_finished(run, 12)
    assert same_series(tensorboard(run.out / "tensorboard"), logged(run.out)) == []


@pytest.mark.slow  # a Trainer run killed and finished: the full suite's
def test_the_trainer_logs_to_tensorboard_each_step_once(tmp_path: Path) -> None:
    run = ExampleRun(tmp_path / "run", script=REPO / "tests" / "scripts" / "hf_user.py",
                     flags=("--epochs", "2", "--step-sleep-s", "0.05", "--tracker", "tensorboard"),
                     unset_env=("SWEEPRUN_*",))
    killed_then_finished(run, 7)
    truth = logged(run.out)
    assert "loss" in truth and "eval_loss" in truth
    assert same_series(tensorboard(run.out / "tensorboard"), truth) == []
