"""Loss spikes in the Hugging Face Trainer: ``sweeprun_hf.init(spikes=...)``."""

from __future__ import annotations

import math
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
