"""Loss spikes in PyTorch Lightning: ``SweeprunCallback(spikes=...)``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sweeprun.runenv import PREEMPTED_EXIT

from _spiky import SpikyRun
from _training_helpers import REPO


@pytest.mark.slow   # Lightning starts twice (its import is most of the time)
@pytest.mark.parametrize("skip", [0, 2])
def test_lightnings_callback_rolls_back_past_the_bad_batch_and_keeps_its_own_steps(
        tmp_path: Path, skip: int) -> None:
    """``SweeprunCallback(spikes=...)``: Lightning's module, optimizer and loops go back to step
    12, its sampler stays past the NaN batch of step 16 (and ``skip`` more), and its global
    step goes on from 12 (Lightning counts its own steps): step 13 trains on the batch after."""
    run = SpikyRun(tmp_path / "run", ("--skip", str(skip)), script=REPO / "tests" / "scripts" / "lightning_spiky.py")
    assert run.until_done() == [PREEMPTED_EXIT, 0]
    [record] = run.rollbacks()
    assert (record.start, record.restored_step, record.resume_step, record.skipped) == (16, 12, 12, 4 + skip)
    entries = run.entries()
    assert [e["step"] for e in entries] == list(range(1, 31))
    after = 64 + 4 * skip
    assert [int(e["first"]) for e in entries[10:14]] == [40, 44, after, after + 4]
    assert all(math.isfinite(e["loss"]) for e in entries)
