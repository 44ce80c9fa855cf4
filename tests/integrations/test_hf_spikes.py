"""Loss spikes in the Hugging Face Trainer: ``sweeprun_hf.init(spikes=...)``."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest

from sweeprun.runenv import PREEMPTED_EXIT

from _spiky import SpikyRun
from _training_helpers import REPO


@pytest.mark.slow   # the Trainer starts twice (its import is most of the time)
def test_the_trainer_rolls_back_to_a_sealed_folder_past_the_bad_batch(tmp_path: Path) -> None:
    """The NaN sample falls in the batch of step 10 (the Trainer's seeded order): the run
    goes back to ``checkpoint-8`` and resumes with the Trainer's own step count, passing over
    the batches of steps 9 and 10, so the NaN is never met again and the run finishes."""
    run = SpikyRun(tmp_path / "run", script=REPO / "tests" / "scripts" / "hf_spiky.py")
    assert run.until_done() == [PREEMPTED_EXIT, 0]
    [record] = run.rollbacks()
    assert (record.reason, record.start, record.step) == ("not finite", 10, 10)
    assert (record.checkpoint, record.restored_step, record.resume_step, record.skipped) == (
        "checkpoint-8@a1", 8, 8, 2)
    entries = run.entries()
    assert [e["step"] for e in entries] == list(range(1, 25))
    assert all(math.isfinite(e["loss"]) for e in entries)
    assert all(math.isfinite(w) for w in run.final()["weight"])


@pytest.mark.slow   # five starts of the Trainer
def test_a_run_killed_after_its_rollback_resumes_past_the_same_batches(tmp_path: Path) -> None:
    """The folders sealed after a rollback keep how far the data is ahead of the Trainer's step:
    killed at step 14 and resumed from ``checkpoint-12`` (sealed after the rollback), the run
    passes over the same batches again and ends as the run never killed, bit for bit."""
    want = SpikyRun(tmp_path / "want", script=REPO / "tests" / "scripts" / "hf_spiky.py")
    assert want.until_done() == [PREEMPTED_EXIT, 0]
    run = SpikyRun(tmp_path / "run", script=REPO / "tests" / "scripts" / "hf_spiky.py")
    assert run.complete().returncode == PREEMPTED_EXIT
    code, seen, err = run.interrupt_at(14, signal.SIGKILL)
    assert code == -signal.SIGKILL and seen >= 14, err
    assert run.until_done() == [0]
    assert run.final() == want.final()
    assert [e["loss"] for e in run.entries()] == [e["loss"] for e in want.entries()]
    assert len(run.rollbacks()) == 1


@pytest.mark.slow   # two starts of the Trainer
def test_the_trainers_rotation_keeps_the_folder_a_rollback_needs(tmp_path: Path) -> None:
    """``save_total_limit=1`` and ``margin=5`` (wider than ``save_steps=4``): the rotation keeps
    ``checkpoint-4`` beside the newest, and the NaN at step 10 goes back to it."""
    run = SpikyRun(tmp_path / "run", ("--save-total-limit", "1", "--margin", "5"),
                   script=REPO / "tests" / "scripts" / "hf_spiky.py")
    assert run.until_done() == [PREEMPTED_EXIT, 0]
    [record] = run.rollbacks()
    assert (record.step, record.checkpoint, record.skipped) == (10, "checkpoint-4@a1", 6)
