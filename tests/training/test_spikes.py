"""Loss spikes: a run that meets a NaN or a spike rolls back to a checkpoint from before it,
passes over the bad batches, and goes on; past ``max_rollbacks`` it ends ``diverged``
(tests/scripts/spiky.py, standalone: :mod:`_spiky`). Under the launcher:
tests/fleet/test_spikes_sweep.py; on several ranks: test_spikes_ranks.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sweeprun.runenv import DIVERGED_EXIT, PREEMPTED_EXIT
from sweeprun.training.spikes import Detector, Spikes

from _spiky import NAN_AT_16, SPIKE_16_TO_18, SpikyRun, spiky_reference


def test_a_nan_batch_rolls_the_run_back_past_it_and_it_finishes(shared_dir: Path) -> None:
    run = spiky_reference(shared_dir, *NAN_AT_16)
    [record] = run.rollbacks()
    assert (record.reason, record.start, record.step) == ("not finite", 16, 16)
    # the newest checkpoint before the spike (every 4 steps: 12); the batches of 13-16 passed over
    assert (record.restored_step, record.resume_step, record.skipped) == (12, 16, 4)
    assert record.checkpoint is not None and record.checkpoint.endswith("step0000000012")
    entries = run.entries()
    assert [e["step"] for e in entries] == list(range(1, 31))      # each step once
    assert math.isnan(entries[15]["loss"]) and entries[15]["first"] == 60
    assert [e["first"] for e in entries[16:]] == list(range(64, 64 + 14 * 4, 4))  # on from the next batch
    assert all(math.isfinite(v) for values in run.final().values() for v in values)


def test_a_checkpoint_written_during_the_spike_is_never_restored_and_keep_last_keeps_the_good_one(
        shared_dir: Path) -> None:
    """keep_last=2 with a save at every step: the saves of steps 16 and 17 (inside the spike)
    would have pushed step 15 out; it is kept while the spike is suspected, restored, and the
    two written since are deleted."""
    run = spiky_reference(shared_dir, *SPIKE_16_TO_18)
    [record] = run.rollbacks()
    assert (record.reason, record.start, record.step) == ("spike", 16, 18)
    assert record.value is not None and record.value > 100
    assert (record.restored_step, record.resume_step) == (15, 18)
    assert [a[-2:] for a in record.abandoned] == ["16", "17"]
    entries = run.entries()
    assert [e["step"] for e in entries] == list(range(1, 31))
    assert [e["first"] for e in entries[15:19]] == [60, 64, 68, 72]   # 16-18 spiked; 19 goes on after them
    assert min(run.checkpoint_steps()) > 18                         # 16 and 17 deleted, and 15 in turn


@pytest.mark.parametrize("point", [pytest.param("rollback.before_record", marks=pytest.mark.slow),
                                   "rollback.after_record"])
def test_a_kill_during_the_rollback_changes_nothing(shared_dir: Path, tmp_path: Path, point: str) -> None:
    """Killed before its record, the run resumes from its newest checkpoint (written inside
    the spike) and meets the same spike again; killed after it, with the checkpoints it set
    aside still there, the restore passes them over. Either way: the uninterrupted result."""
    want = spiky_reference(shared_dir, *SPIKE_16_TO_18)
    run = SpikyRun(tmp_path / "run", SPIKE_16_TO_18)
    killed = run.complete(env={"SWEEPRUN_CRASH_AT": point})
    assert killed.returncode == -9, killed.stderr
    assert run.checkpoint_steps()[-1] == 17                          # written inside the spike
    assert run.until_done() in ([0], [PREEMPTED_EXIT, 0])
    assert run.final() == want.final()
    assert run.entries() == want.entries()
    assert [r.restored_step for r in run.rollbacks()] == [15]


@pytest.mark.slow  # every rollback of a run trained: the full suite's
def test_a_run_that_diverges_every_time_ends_diverged_and_is_not_started_again(tmp_path: Path) -> None:
    run = SpikyRun(tmp_path / "run", ("--always-from", "10", "--max-rollbacks", "2", "--every", "4"))
    assert run.until_done() == [PREEMPTED_EXIT, PREEMPTED_EXIT, DIVERGED_EXIT]
    records = run.rollbacks()
    assert [(r.step, r.restored_step, r.diverged) for r in records] == [(10, 8, False), (11, 8, False),
                                                                       (12, 12, True)]
    again = run.complete()
    assert again.returncode == DIVERGED_EXIT
    assert "this run diverged" in again.stderr and "sweeprun reset" in again.stderr
    assert len(run.rollbacks()) == 3                                  # nothing new happened


# -- the detector, in-process ---------------------------------------------------------------------


def test_a_nan_is_a_spike_at_once_and_a_high_value_only_after_warmup_and_patience() -> None:
    detector = Detector(Spikes(factor=3, window=4, patience=2))
    assert [detector.observe(s, {"loss": 1.0}) for s in range(1, 4)] == [None] * 3
    assert detector.observe(4, {"loss": 100.0}) is None              # warm-up: 4 values first
    assert [detector.observe(s, {"loss": 1.0}) for s in range(5, 9)] == [None] * 4  # the window: 1s
    assert detector.observe(9, {"loss": 10.0}) is None               # patience 2: one is not enough
    assert detector.suspected == 9
    spike = detector.observe(10, {"loss": 10.0})
    assert spike is not None and (spike.start, spike.step, spike.reason) == (9, 10, "spike")
    nan = Detector(Spikes()).observe(1, {"loss": float("nan")})
    assert nan is not None and (nan.start, nan.reason) == (1, "not finite")


def test_the_detectors_state_goes_with_the_checkpoint() -> None:
    """A run resumed between the first high value and the confirmation confirms at the same step."""
    policy = Spikes(window=3, patience=2, warmup=3)
    first, second = Detector(policy), Detector(policy)
    for step, loss in enumerate([1.0, 1.0, 1.0, 9.0], start=1):
        first.observe(step, {"loss": loss})
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert first.observe(5, {"loss": 9.0}) == second.observe(5, {"loss": 9.0}) is not None


@pytest.mark.parametrize(("settings", "said"), [
    ({"factor": 1}, "factor must be a number above 1"),
    ({"window": 0}, "window must be an integer of at least 1"),
    ({"margin": 0}, "margin must be an integer of at least 1"),
    ({"watch": ()}, "watch must name one metric or more"),
    ({"windw": 3}, "unknown setting(s) windw"),
])
def test_a_bad_policy_is_one_clear_error(settings: dict, said: str) -> None:
    with pytest.raises(ValueError, match="spikes: ") as caught:
        Spikes.of(settings)
    assert said in str(caught.value)


def test_a_margin_wider_than_the_save_interval_keeps_what_it_needs(tmp_path: Path) -> None:
    """``margin=6`` with a save every 2 steps and ``keep_last=1``: retention keeps every save
    of the last 6 steps besides the newest, so the NaN at step 16 finds step 10 still there."""
    run = SpikyRun(tmp_path / "run", ("--poison", "60", "--nan", "--every", "2", "--keep-last", "1",
                                      "--margin", "6"))
    assert run.until_done() == [PREEMPTED_EXIT, 0]
    [record] = run.rollbacks()
    assert (record.start, record.restored_step, record.skipped) == (16, 10, 6)
