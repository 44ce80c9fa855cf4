"""The ledger's state transitions on their own: rows in, rows out, no database.

What every backend persists (the backends' own tests run the same rules through SQLite and
PostgreSQL, in :class:`~sweeprun.ledger.contract.LedgerContract`).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sweeprun.ledger import Claim, Outcome, Policy, RunRow, RunState
from sweeprun.ledger import transitions as tr
from sweeprun.ledger.contract import ME, OTHER_HOST, dead_process
from sweeprun.resumes import Resume

NOW = 1000.0
POLICY = Policy(max_attempts=2, max_lost=2)


def row(state: RunState = RunState.PENDING, **fields: object) -> RunRow:
    base = RunRow(run_id="lr=0.1-3fa2c1b9", index=0, params={"lr": 0.1}, state=state, attempts=0,
                  failures=0, worker=None, heartbeat_at=None, lease_until=None, last_exit=None,
                  updated_at=0.0)
    return replace(base, **fields)  # type: ignore[arg-type]


def held(attempt: int = 3, worker=OTHER_HOST, **fields: object) -> tuple[RunRow, Claim]:
    """A running row at ``attempt``, and its holder's claim."""
    r = row(RunState.RUNNING, attempts=attempt, worker=worker.label, worker_start=worker.start,
            lease_until=NOW + 60, heartbeat_at=NOW, **fields)
    return r, Claim(run_id=r.run_id, attempt=attempt, params=r.params, worker=worker)


def test_a_claim_opens_the_next_attempt_under_a_lease() -> None:
    change, claim = tr.take(row(RunState.INTERRUPTED, attempts=2), ME, NOW, 60)
    assert (claim.attempt, claim.took_over, claim.orphan) == (3, False, None)
    assert change.opened == 3 and change.closed is None
    assert (change.row.state, change.row.worker, change.row.lease_until) == (
        RunState.RUNNING, ME.label, NOW + 60)


def test_taking_over_closes_the_lost_attempt_and_names_no_unproven_orphan() -> None:
    abandoned, _ = held(worker=dead_process(), child_pid=4242, child_start=None)
    change, claim = tr.take(abandoned, ME, NOW + 120, 60)
    assert claim.took_over and claim.attempt == 4 and claim.orphan is None
    assert change.closed == tr.AttemptEnd(3, "lost", None, None)
    assert (change.row.child_pid, change.row.child_start) == (None, None)


@pytest.mark.parametrize("call", ["release", "renumber", "start", "heartbeat", "finish"])
def test_a_claim_that_is_no_longer_current_changes_nothing(call: str) -> None:
    current, claim = held(attempt=3)
    stale = replace(claim, attempt=2)
    found = {"release": lambda: tr.released(current, stale, NOW),
             "renumber": lambda: tr.renumbered(current, stale, 9, NOW),
             "start": lambda: tr.started(current, stale, NOW, 60, None, POLICY),
             "heartbeat": lambda: tr.renewed(current, stale, NOW, 60),
             "finish": lambda: tr.finished(current, stale, Outcome.FAILED, POLICY, 1, NOW)}[call]()
    assert found is None
    assert tr.renewed(None, claim, NOW, 60) is None  # a run the ledger does not have


def test_a_released_claim_gives_its_attempt_number_back() -> None:
    current, claim = held(attempt=3)
    change = tr.released(current, claim, NOW)
    assert change and change.dropped == 3
    assert (change.row.state, change.row.attempts, change.row.worker) == (RunState.INTERRUPTED, 2, None)


def test_losses_without_a_new_checkpoint_count_until_the_run_fails() -> None:
    current, claim = held(attempt=3, lost=1, progress="ckpt-7")
    taken_over = replace(claim, took_over=True)
    moved_on = tr.started(current, taken_over, NOW, 60, "ckpt-8", POLICY)
    assert moved_on and moved_on[1] is RunState.RUNNING and moved_on[0].row.lost == 0
    stuck = tr.started(current, taken_over, NOW, 60, "ckpt-7", POLICY)
    assert stuck and stuck[1] is RunState.FAILED
    assert stuck[0].closed == tr.AttemptEnd(3, "lost-limit", None, RunState.FAILED)
    ours = tr.started(current, claim, NOW, 60, "ckpt-7", POLICY)  # not a takeover: no loss
    assert ours and ours[1] is RunState.RUNNING and ours[0].row.lost == 0


@pytest.mark.parametrize("outcome, failures, state", [
    (Outcome.DONE, 0, RunState.DONE),
    (Outcome.INTERRUPTED, 0, RunState.INTERRUPTED),
    (Outcome.FAILED, 1, RunState.PENDING),
])
def test_finishing_records_the_outcome(outcome: Outcome, failures: int, state: RunState) -> None:
    current, claim = held(attempt=1)
    change, result = tr.finished(current, claim, outcome, POLICY, 0, NOW) or (None, None)
    assert change and result is state and change.row.failures == failures
    assert change.closed == tr.AttemptEnd(1, outcome.value, 0, state)
    again = tr.finished(current, claim, Outcome.FAILED, POLICY, 1, NOW)
    assert again and again[1] is RunState.PENDING


def test_the_last_allowed_failure_fails_the_run_and_done_is_accepted_after_sync() -> None:
    current, claim = held(attempt=2, failures=1)
    assert (tr.finished(current, claim, Outcome.FAILED, POLICY, 1, NOW) or (None, None))[1] is RunState.FAILED
    synced_done = row(RunState.DONE, attempts=5)  # a sync saw DONE; the holder was renumbered since
    change, result = tr.finished(synced_done, claim, Outcome.DONE, POLICY, 0, NOW) or (None, None)
    assert result is RunState.DONE and change and change.row == synced_done


def test_a_reset_is_honoured_once_per_token() -> None:
    failed = row(RunState.FAILED, failures=2, lost=1)
    fresh = tr.forgotten(failed, None, "t1", NOW)
    assert fresh and (fresh.state, fresh.failures, fresh.lost) == (RunState.PENDING, 0, 0)
    assert tr.forgotten(failed, "t1", "t1", NOW) is None
    running, _ = held(failures=1)
    kept = tr.forgotten(running, "t1", "t2", NOW)
    assert kept and kept.state is RunState.RUNNING and kept.lease_until == running.lease_until


@pytest.mark.parametrize("state, in_done, started, gone, target", [
    (None, False, False, None, RunState.PENDING),
    (None, False, True, None, RunState.INTERRUPTED),
    (None, True, True, None, RunState.DONE),
    ("running", True, False, None, RunState.DONE),       # DONE in the store wins over a live lease
    ("exploded", True, False, None, RunState.DONE),      # even over a damaged row
    ("done", False, True, None, RunState.INTERRUPTED),   # its DONE deleted: a re-run asked for
    ("done", False, False, set(), None),                 # the listing was stale: still done
    ("pending", False, False, None, None),
])
def test_sync_follows_the_store(state: str | None, in_done: bool, started: bool,
                                gone: set[str] | None, target: RunState | None) -> None:
    run_id = "a=1-00000000"
    done = {run_id} if in_done else set()
    assert tr.synced(state, run_id, done, {run_id} if started else set(), gone) is target


EARLIER = Resume(2, "step-00000008", 8, saved_world_size=2, world_size=1, approximate=("rng",))
NOW_RESUMED = Resume(5, "step-00000016", 16, saved_world_size=4, world_size=1, approximate=("rng",))


@pytest.mark.parametrize("progress, reported, kept", [
    ("ckpt-2", NOW_RESUMED, NOW_RESUMED),  # this attempt resumed at another world size
    ("ckpt-2", None, EARLIER),             # an exact resume goes on from the approximate one
    (None, None, None),                    # started with no checkpoint: the run began anew
])
def test_a_finish_keeps_the_runs_resume_until_it_begins_anew(
        progress: str | None, reported: Resume | None, kept: Resume | None) -> None:
    current, claim = held(attempt=5, progress=progress, resumed=EARLIER)
    found = tr.finished(current, claim, Outcome.INTERRUPTED, POLICY, 75, NOW, reported)
    assert found is not None and found[0].row.resumed == kept


def test_a_resume_edited_by_hand_keeps_what_reads() -> None:
    """Fields of the wrong type count as absent, as in the start record the resume came from."""
    found = Resume.from_json(json.dumps({"attempt": 3, "saved_world_size": 4, "world_size": "2",
                                         "step": -1, "checkpoint": 7, "approximate": ["rng", 5, ""]}))
    assert found == Resume(3, None, None, saved_world_size=4, world_size=None, approximate=("rng",))
    assert Resume.from_json(json.dumps(EARLIER.as_json())) == EARLIER
