"""Loss spikes: a run that meets a NaN or a spike rolls back to a checkpoint from before it,
passes over the bad batches, and goes on; past ``max_rollbacks`` it ends ``diverged``.

The script is tests/scripts/spiky.py, a regression written the way users write one, with a
bad sample in its data (scaled up, or NaN) or a loss that is NaN from some step on. Each
step logs the first index of its batch, so a test sees which batches trained.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from _ranks_helpers import RankRun

from sweeprun.rollbacks import RollbackRecord, read_rollbacks
from sweeprun.runenv import DIVERGED_EXIT, OOM_EXIT, PREEMPTED_EXIT
from sweeprun.store import open_store
from sweeprun.training.spikes import Detector, Spikes

from _training_helpers import REPO, ScriptRun, made_once, sweeprun_verify
from conftest import Sandbox

SPIKY = REPO / "tests" / "scripts" / "spiky.py"
#: A NaN sample in the batch of step 16 (batches of 4, in order); saves every 4 steps.
NAN_AT_16 = ("--poison", "60", "--nan", "--every", "4")
#: Three batches (steps 16-18) scaled 30x: a spike confirmed at 18 (patience 3); a save at
#: every step, two kept: the saves of steps 16 and 17 fall inside the spike.
SPIKE_16_TO_18 = ("--poison", "60", "--poison-count", "12", "--scale", "30", "--patience", "3",
                  "--every", "1", "--keep-last", "2")


@dataclass
class SpikyRun(ScriptRun):
    script: Path = SPIKY

    def until_done(self, *extra: str, env: dict[str, str] | None = None, starts: int = 6) -> list[int]:
        """Start it again after each exit 75, as the launcher (or a user) does; the exit codes."""
        codes = []
        for _ in range(starts):
            result = self.complete(*extra, env=env)
            codes.append(result.returncode)
            if result.returncode != PREEMPTED_EXIT:
                break
        return codes

    def rollbacks(self) -> list[RollbackRecord]:
        store = open_store(str(self.out))
        return read_rollbacks(store.fs, f"{store.root}/rollbacks")

    def final(self) -> dict[str, list[float]]:
        return json.loads((self.out / "final.json").read_text())

    def checkpoint_steps(self) -> list[int]:
        return sorted(json.loads(p.read_text())["step"] for p in (self.out / "checkpoints").glob("*.json"))


def spiky_reference(shared_dir: Path, *flags: str) -> SpikyRun:
    """The script with ``flags``, never killed (rolled back as it needs): made once per session."""
    def make(folder: Path) -> None:
        assert SpikyRun(folder, flags).until_done() == [PREEMPTED_EXIT, 0]

    return SpikyRun(made_once(shared_dir, "spiky-" + "-".join(f.strip("-") for f in flags), make), flags)


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


@pytest.mark.parametrize("point", ["rollback.before_record", "rollback.after_record"])
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


def test_a_nan_on_one_rank_rolls_every_rank_back_to_the_same_step(tmp_path: Path) -> None:
    """DDP on 2 gloo ranks, a NaN sample in rank 1's data only (index 61: its 31st, the
    batch of its step 8): both ranks roll back together and finish."""
    run = RankRun(SPIKY, tmp_path / "run", flags=("--poison", "61", "--nan", "--poison-rank", "1",
                                                  "--every", "3", "--steps", "14"))
    codes = run.complete()
    assert codes == [PREEMPTED_EXIT] * 2, run.err(0) + run.err(1)
    assert "rolled back to" in run.err(0) and "rolled back to" in run.err(1)
    assert run.complete() == [0, 0], run.err(0) + run.err(1)
    store = open_store(str(run.out))
    [record] = read_rollbacks(store.fs, f"{store.root}/rollbacks")
    assert (record.start, record.step, record.restored_step, record.world_size) == (8, 8, 6, 2)
    assert sorted(p.name for p in (run.out / "rollbacks").iterdir()) == ["1.json", "1.rank-0.pt", "1.rank-1.pt"]
    assert [e["step"] for e in run.entries()] == list(range(1, 15))
    final = json.loads(run.final.read_text())
    assert all(math.isfinite(v) for values in final.values() for v in values)


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


def test_a_sweep_relaunches_a_rolled_back_run_at_once_and_skips_a_diverged_one(sandbox: Sandbox) -> None:
    """Under ``sweeprun launch``: the rollback is an interruption the launcher resumes from
    at once, the divergence a state of its own that a relaunch leaves alone until a reset."""
    sweep = sandbox.write_sweep(
        {"always": [0, 6]}, command=f"python {SPIKY} --steps 20 --every 4 --poison 40 --nan "
                                    "--always-from {always} --max-rollbacks 1")
    first = sandbox.run("launch", str(sweep))
    assert first.returncode == 1, first.stdout + first.stderr          # a run diverged
    status = {row["params"]["always"]: row for row in sandbox.status(sweep).values()}
    fine, bad = status[0], status[6]
    assert (fine["state"], fine["attempts"], fine["failures"]) == ("done", 2, 0)
    assert fine["rollbacks"]["count"] == 1 and fine["rollbacks"]["restored_step"] == 8
    assert (bad["state"], bad["attempts"], bad["failures"]) == ("diverged", 2, 0)
    assert bad["rollbacks"] == {**bad["rollbacks"], "count": 1, "diverged": True}

    again = sandbox.run("launch", str(sweep))
    assert again.returncode == 1
    assert sandbox.status(sweep)[bad["run_id"]]["attempts"] == 2      # not started again
    table = sandbox.run("status", str(sweep))
    assert "diverged" in table.stdout and "↺1" in table.stdout

    ledger = ("--ledger", str(sandbox.ledger))
    shown = sandbox.run("show", str(sweep), fine["run_id"], *ledger, env={"COLUMNS": "200"})
    assert "rolled back (loss spike)" in shown.stdout
    assert "step 11: loss not finite; rolled back to ckpt-a1-" in shown.stdout
    shown = sandbox.run("show", str(sweep), bad["run_id"], "--json", *ledger)
    detail = json.loads(shown.stdout)
    assert [a["outcome"] for a in detail["attempts"]] == ["rolled-back", "diverged"]
    assert [r["diverged"] for r in detail["rollbacks"]] == [False, True]

    assert sandbox.run("reset", str(sweep), bad["run_id"], *ledger).returncode == 0
    assert sandbox.status(sweep)[bad["run_id"]]["state"] == "pending"


# -- out of memory -------------------------------------------------------------------------------


def test_out_of_memory_ends_the_attempt_as_oom_and_on_oom_retries_it_with_the_batch_halved(
        sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"batch": [16]}, command=f"python {SPIKY} --steps 8 --every 2 "
                                "--batch {batch} --oom-above 4",
                                on_oom={"retries": 2, "halve": ["batch"]})
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    [row] = sandbox.status(sweep).values()
    assert (row["state"], row["attempts"], row["failures"]) == ("done", 3, 0)   # on_oom's retries, not failures
    detail = json.loads(sandbox.run("show", str(sweep), row["run_id"], "--json", "--ledger",
                                    str(sandbox.ledger)).stdout)
    assert [(a["outcome"], a["exit_code"]) for a in detail["attempts"]] == [
        ("oom", OOM_EXIT), ("oom", OOM_EXIT), ("done", 0)]
    assert detail["oom"] == "attempt 2 at step 4"
    logs = sandbox.store / "t" / "runs" / row["run_id"] / "logs"
    assert "batch 16, oom_retry 0" in (logs / "attempt-1.log").read_text()
    assert "out of memory at step 4: CUDA out of memory. Tried to allocate 16 GiB" in (
        logs / "attempt-1.log").read_text()
    assert "batch 4, oom_retry 2" in (logs / "attempt-3.log").read_text()   # same run, halved twice


def test_out_of_memory_without_on_oom_fails_the_run_at_once(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"batch": [16]}, command=f"python {SPIKY} --steps 8 --batch {{batch}} "
                                "--oom-above 4")
    assert sandbox.run("launch", str(sweep)).returncode == 1
    [row] = sandbox.status(sweep).values()
    assert (row["state"], row["attempts"]) == ("failed", 1)              # not 3 identical tries
    assert sandbox.run("launch", str(sweep)).returncode == 1
    assert sandbox.status(sweep)[row["run_id"]]["attempts"] == 1


@pytest.mark.parametrize(("on_oom", "said"), [
    ({"retries": -1}, "on_oom.retries must be an integer from 0 to 100"),
    ({"retries": 1, "halve": ["lr"]}, "only a parameter whose values are positive integers can be halved"),
    ({"retries": 1, "halve": ["nope"]}, "'nope', which is not a parameter of the sweep"),
    ({"halve": ["batch"]}, "on_oom.halve needs on_oom.retries of 1 or more"),
    ({"retrys": 1}, "on_oom has no key 'retrys'"),
])
def test_a_bad_on_oom_is_one_clear_line(sandbox: Sandbox, on_oom: dict, said: str) -> None:
    sweep = sandbox.write_sweep({"batch": [16, 8]}, {"lr": 0.1}, on_oom=on_oom)
    result = sandbox.run("status", str(sweep))
    assert result.returncode == 2 and said in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- verify ----------------------------------------------------------------------------------------


def test_verify_compares_a_rolled_back_run_as_it_rolled_back(tmp_path: Path) -> None:
    """Both runs meet the NaN batch at step 16 and roll back the same way (verify starts a
    rolled-back run again, as the launcher does): EXACT, and it says they rolled back."""
    result = sweeprun_verify("--", sys.executable, str(SPIKY), *NAN_AT_16, tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "uninterrupted: rolled back after a loss spike (at step 16 to step 12)" in result.stdout
    assert re.search(r"^EXACT: interrupted 2 time\(s\)", result.stdout, re.MULTILINE), result.stdout
    assert "both runs rolled back after the same loss spike(s) (at step 16 to step 12)" in result.stdout


# -- integrations ----------------------------------------------------------------------------------


@pytest.mark.slow   # Lightning starts twice (its import is most of the time)
def test_lightnings_callback_rolls_back_past_the_bad_batch_and_keeps_its_own_steps(tmp_path: Path) -> None:
    """``SweeprunCallback(spikes=...)``: Lightning's module, optimizer and loops go back to step
    12, its sampler stays past the NaN batch of step 16, and its global step goes on from 12
    (Lightning counts its own steps): step 13 trains on the batch after the bad one."""
    run = SpikyRun(tmp_path / "run", script=REPO / "tests" / "scripts" / "lightning_spiky.py")
    assert run.until_done() == [PREEMPTED_EXIT, 0]
    [record] = run.rollbacks()
    assert (record.start, record.restored_step, record.resume_step, record.skipped) == (16, 12, 12, 4)
    entries = run.entries()
    assert [e["step"] for e in entries] == list(range(1, 31))
    assert [int(e["first"]) for e in entries[10:14]] == [40, 44, 64, 68]
    assert all(math.isfinite(e["loss"]) for e in entries)
