"""The ledger contract as tests, shipped with the package so every backend inherits them.

A backend's test module subclasses :class:`LedgerContract` and says how to open a
ledger the way users do (through :func:`sweeprun.ledger.open_ledger`)::

    class TestSqlite(LedgerContract):
        @pytest.fixture
        def location(self, tmp_path):
            return str(tmp_path / "ledger.sqlite")

Time is the ledger's own clock, replaced here by :class:`FakeClock` (injected through
``open_ledger(clock=...)``), so leases expire without sleeping; a server backend honours
the same clock in its queries. Needs pytest (the ``test`` extra).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..identity import RunSpec
from ..procs import HOST, ProcessRef
from ..resumes import Resume
from . import open_ledger
from .base import (
    Claim,
    Ledger,
    Outcome,
    Policy,
    RunRow,
    RunState,
    Uptime,
    Verdict,
    grid_key,
    judge,
    settled,
)
from .contract_ends import GRID, ME, POLICY, RUNS, EndsContract

OTHER_HOST = ProcessRef("another-host", 4242, 1)


class FakeClock:
    """A clock that moves only when told to: the one fake clock of the tests, for a ledger's
    time as for a lease's or a training run's. ``offset_s`` plays a machine whose clock is off."""

    def __init__(self, start: float = 1000.0, *, offset_s: float = 0.0) -> None:
        self.now = start + offset_s

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


#: A worker that takes every run it can, one at a time, and prints what it took: the many-process
#: test starts several of these at once against one ledger.
CLAIMER = """
import json, sys
from sweeprun.ledger import Outcome, Policy, RunState, open_ledger
from sweeprun.procs import ProcessRef
led = open_ledger(sys.argv[1], sys.argv[2])
me, policy = ProcessRef.me(), Policy()
got = []
while (c := led.claim(me, policy, 600)) is not None:
    got.append(c.run_id)
    assert led.finish(c, Outcome.DONE, policy) is RunState.DONE
led.close()
print(json.dumps(got))
"""
#: Where this sweeprun is imported from, for the claimer processes.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def claim_order(row: RunRow) -> tuple[bool, int]:
    """The order claims take runnable runs in: interrupted first (their checkpoints hold
    work), then grid order."""
    return row.state is not RunState.INTERRUPTED, row.index


def dead_process() -> ProcessRef:
    """A process of this host that has exited: its pid is free (for now)."""
    proc = subprocess.Popen(["true"])
    ref = ProcessRef.of(proc.pid)
    proc.wait()
    return ref


def hostile_workers() -> list[ProcessRef]:
    """Holders a run can have, each judged differently: alive here, dead here, a pid reused by
    another process, another host (alive as far as anyone here can tell), a label whose pid
    cannot be a process, hosts whose names extend ours or hold LIKE's wildcards."""
    me = ProcessRef.me()
    return [me, dead_process(), ProcessRef(HOST, me.pid, (me.start or 0) + 1), OTHER_HOST,
            ProcessRef(HOST, 0, None), ProcessRef(HOST + "x", me.pid, me.start),
            ProcessRef(HOST[:-1] + "_" if HOST else "_", me.pid, me.start),
            ProcessRef("h%st", 7, 1)]


class LedgerContract(EndsContract):
    """What every backend promises; see :mod:`sweeprun.ledger.base` for the contract itself."""

    #: How many processes race for how many runs in the exactly-once test.
    claimers = 10
    many_runs = 200

    @pytest.fixture
    def location(self) -> str:  # pragma: no cover - each backend overrides it
        raise NotImplementedError

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def ledger(self, location: str, clock: FakeClock) -> Iterator[Ledger]:
        led = self.open(location, clock)
        led.sync(RUNS, done=set(), started=set())
        yield led
        led.close()

    @staticmethod
    def open(location: str, clock: FakeClock, sweep: str = "sweep") -> Ledger:
        return open_ledger(location, sweep, clock=clock)

    def state(self, ledger: Ledger, run_id: str) -> RunState:
        return next(r.state for r in ledger.rows() if r.run_id == run_id)

    # -- claims -----------------------------------------------------------------------------

    def test_claims_in_grid_order_each_once(self, ledger: Ledger) -> None:
        claims = [ledger.claim(ME, POLICY, 60, GRID) for _ in RUNS]
        assert [c.run_id for c in claims if c] == [r.run_id for r in RUNS]
        assert all(c is not None and c.attempt == 1 for c in claims)
        assert ledger.claim(ME, POLICY, 60, GRID) is None
        assert not ledger.settled(POLICY, GRID)  # all held: not over yet

    def test_runs_held_elsewhere_are_passed_over(self, ledger: Ledger) -> None:
        elsewhere = {RUNS[0].run_id, RUNS[1].run_id}  # another machine holds them (store leases)
        first = ledger.claim(ME, POLICY, 60, GRID, skip=elsewhere)
        assert first and first.run_id == RUNS[2].run_id
        again = ledger.claim(ME, POLICY, 60, GRID)
        assert again and again.run_id == RUNS[0].run_id

    def test_a_released_claim_uses_no_attempt(self, ledger: Ledger) -> None:
        c = ledger.claim(ME, POLICY, 60, GRID)
        assert c and ledger.release(c)
        assert ledger.release(c) is False  # no longer current
        again = ledger.claim(ME, POLICY, 60, GRID)
        assert again and again.run_id == c.run_id and again.attempt == c.attempt == 1

    def test_interrupted_run_is_claimed_again_before_new_ones(self, ledger: Ledger) -> None:
        first = ledger.claim(ME, POLICY, 60, GRID)
        assert first and ledger.finish(first, Outcome.INTERRUPTED, POLICY) is RunState.INTERRUPTED
        again = ledger.claim(ME, POLICY, 60, GRID)
        assert again and again.run_id == first.run_id and again.attempt == 2

    def test_failures_count_interruptions_do_not(self, ledger: Ledger) -> None:
        policy = Policy(max_attempts=2)
        c = ledger.claim(ME, policy, 60, GRID)
        assert c is not None
        run = c.run_id
        for _ in range(3):
            ledger.finish(c, Outcome.INTERRUPTED, policy)
            c = ledger.claim(ME, policy, 60, GRID)
            assert c and c.run_id == run
        assert ledger.finish(c, Outcome.FAILED, policy) is RunState.PENDING
        c = ledger.claim(ME, policy, 60, GRID)
        assert c and c.run_id == run and c.attempt == 5
        assert ledger.finish(c, Outcome.FAILED, policy) is RunState.FAILED
        row = next(r for r in ledger.rows() if r.run_id == run)
        assert (row.state, row.attempts, row.failures) == (RunState.FAILED, 5, 2)
        others = ledger.claim(ME, policy, 60, GRID)
        assert others and others.run_id != run
        # raising max_attempts re-opens the failed run
        assert any((c := ledger.claim(ME, POLICY, 60, GRID)) and c.run_id == run for _ in RUNS)

    def test_a_reopened_failed_run_keeps_its_place_in_grid_order(self, ledger: Ledger) -> None:
        strict = Policy(max_attempts=1)
        first = ledger.claim(ME, strict, 60, GRID)
        assert first and ledger.finish(first, Outcome.FAILED, strict) is RunState.FAILED
        second = ledger.claim(ME, strict, 60, GRID)
        assert second and second.run_id == RUNS[1].run_id
        assert ledger.finish(second, Outcome.INTERRUPTED, strict) is RunState.INTERRUPTED
        # a raised limit: the interrupted run first, then the failed one before the pending ones
        order = [c.run_id for _ in range(3) if (c := ledger.claim(ME, POLICY, 60, GRID))]
        assert order == [RUNS[1].run_id, RUNS[0].run_id, RUNS[2].run_id]

    def test_live_lease_is_respected_until_it_expires_by_the_ledgers_clock(
            self, ledger: Ledger, location: str, clock: FakeClock) -> None:
        held = ledger.claim(OTHER_HOST, POLICY, 60, GRID)
        assert held is not None
        taken = {c.run_id for _ in RUNS[1:] if (c := ledger.claim(ME, POLICY, 60, GRID))}
        assert held.run_id not in taken
        other = self.open(location, clock)  # a second connection, as another worker has
        try:
            clock.advance(59)
            assert other.claim(ME, POLICY, 60, GRID) is None
            clock.advance(2)
            stolen = other.claim(ME, POLICY, 60, GRID)
            assert stolen and stolen.run_id == held.run_id and stolen.attempt == held.attempt + 1
            assert stolen.took_over
            # the old holder is fenced out: no heartbeat, no start, no finish
            assert ledger.heartbeat(held, 60) is False
            assert ledger.start(held, 60, None, POLICY) is None
            assert ledger.finish(held, Outcome.DONE, POLICY) is None
            assert other.finish(stolen, Outcome.DONE, POLICY) is RunState.DONE
        finally:
            other.close()

    def test_rows_without_params_keep_everything_else(self, ledger: Ledger) -> None:
        c = ledger.claim(ME, POLICY, 60, GRID)
        assert c
        full, light = ledger.rows(GRID), ledger.rows(GRID, params=False)
        assert [r.params for r in light] == [{}] * len(full) and full[0].params
        assert [(r.run_id, r.state, r.attempts, r.worker) for r in light] == [
            (r.run_id, r.state, r.attempts, r.worker) for r in full]

    def test_uptime_counts_running_time_and_interruptions(self, ledger: Ledger, clock: FakeClock) -> None:
        """What the automatic checkpoint interval is chosen from: an interrupted attempt
        and a lost one count, a finished one and a failed one do not; a running attempt
        adds its time so far."""
        assert ledger.uptime() == Uptime(0.0, 0)
        a = ledger.claim(ME, POLICY, 60, GRID)
        b = ledger.claim(OTHER_HOST, POLICY, 60, GRID)
        c = ledger.claim(ME, POLICY, 60, GRID)
        assert a and b and c
        clock.advance(100)
        ledger.finish(a, Outcome.INTERRUPTED, POLICY)
        ledger.finish(c, Outcome.FAILED, POLICY)
        clock.advance(100)  # b's lease ran out 140 s ago: lost with its machine
        taken = [ledger.claim(ME, POLICY, 60, GRID) for _ in range(3)]
        assert b.run_id in {t.run_id for t in taken if t}
        clock.advance(50)
        up = ledger.uptime()
        # a 100 + c 100 + b 200 (to its takeover) + the three new claims' 50 each
        assert up.running_s == pytest.approx(550) and up.interruptions == 2
        assert up.mtbi_s(prior_s=3 * 3600) == pytest.approx((550 + 3 * 3600) / 3)

    def test_attempts_tell_each_start_of_a_run(self, ledger: Ledger, clock: FakeClock) -> None:
        """What `sweeprun show` lists: every start, oldest first, by whom, when, how it ended."""
        first = ledger.claim(ME, POLICY, 60, GRID)
        assert first
        assert ledger.start(first, 60, None, POLICY) is RunState.RUNNING
        clock.advance(10)
        ledger.finish(first, Outcome.FAILED, POLICY, exit_code=3)
        second = ledger.claim(OTHER_HOST, POLICY, 60, GRID)
        assert second and second.run_id == first.run_id
        ledger.start(second, 60, None, POLICY)
        rows = ledger.attempts(first.run_id)
        assert [(a.attempt, a.worker, a.outcome, a.exit_code) for a in rows] == [
            (1, ME.label, "failed", 3), (2, OTHER_HOST.label, None, None)]
        assert rows[0].ended_at == pytest.approx(rows[0].started_at + 10)
        assert rows[1].started_at == pytest.approx(clock.now) and rows[1].ended_at is None
        assert ledger.attempts(RUNS[1].run_id) == [] and ledger.attempts("no-such-run") == []
        assert ledger.every_attempt() == {first.run_id: rows}  # all runs at once: the report's read

    def test_heartbeat_extends_the_lease(self, ledger: Ledger, clock: FakeClock) -> None:
        held = ledger.claim(OTHER_HOST, POLICY, 60, GRID)
        assert held
        for _ in range(5):
            clock.advance(40)
            assert ledger.heartbeat(held, 60)
        assert all(c is None or c.run_id != held.run_id
                   for c in [ledger.claim(ME, POLICY, 60, GRID) for _ in RUNS])

    def test_dead_holder_on_this_host_is_reclaimed_at_once(self, ledger: Ledger) -> None:
        held = ledger.claim(dead_process(), POLICY, 3600, GRID)
        again = ledger.claim(ME, POLICY, 60, GRID)
        assert held and again and again.run_id == held.run_id and again.attempt == 2

    def test_orphan_child_is_reported_only_when_provably_ours(self, ledger: Ledger) -> None:
        child = subprocess.Popen(["sleep", "30"])
        try:
            held = ledger.claim(dead_process(), POLICY, 3600, GRID)
            assert held and ledger.heartbeat(held, 3600, ProcessRef.of(child.pid))
            again = ledger.claim(ME, POLICY, 60, GRID)
            assert again and again.orphan is not None and again.orphan.pid == child.pid
            # a claim whose child was never recorded names no orphan, and never the old
            # launcher's own pid (which may be alive, or reused by another process)
            held = ledger.claim(dead_process(), POLICY, 3600, GRID)
            assert held is not None
            again = ledger.claim(ME, POLICY, 60, GRID)
            assert again and again.run_id == held.run_id and again.orphan is None
        finally:
            child.kill()
            child.wait()

    # -- one definition of runnable, held and settled ------------------------------------------

    def test_lowering_max_attempts_below_the_failures_settles_instead_of_hanging(
            self, ledger: Ledger) -> None:
        c = ledger.claim(ME, POLICY, 60, GRID)
        assert c and ledger.finish(c, Outcome.FAILED, POLICY) is RunState.PENDING
        c = ledger.claim(ME, POLICY, 60, GRID)
        assert c and ledger.finish(c, Outcome.INTERRUPTED, POLICY) is RunState.INTERRUPTED
        strict = Policy(max_attempts=1)
        # the interrupted run has used its one allowed failure: the others are claimed, it is not
        for other in RUNS[1:]:
            o = ledger.claim(ME, strict, 60, GRID)
            assert o and o.run_id == other.run_id
            ledger.finish(o, Outcome.DONE, strict)
        assert ledger.claim(ME, strict, 60, GRID) is None
        assert ledger.settled(strict, GRID)
        assert ledger.settled(POLICY, GRID) is False

    def test_an_abandoned_run_at_its_failure_limit_is_not_claimed_again(
            self, ledger: Ledger, clock: FakeClock) -> None:
        policy = Policy(max_attempts=1)
        c = ledger.claim(ME, POLICY, 60, GRID)
        assert c and ledger.finish(c, Outcome.FAILED, POLICY) is RunState.PENDING
        again = ledger.claim(OTHER_HOST, POLICY, 60, GRID)
        assert again and again.run_id == c.run_id
        clock.advance(120)  # its holder vanished
        row = next(r for r in ledger.rows() if r.run_id == c.run_id)
        assert judge(row, ledger.now(), policy) is Verdict.EXHAUSTED
        claimed = [x.run_id for _ in RUNS if (x := ledger.claim(ME, policy, 60, GRID))]
        assert c.run_id not in claimed

    def test_lost_attempts_without_progress_are_capped(self, ledger: Ledger) -> None:
        policy = Policy(max_attempts=3, max_lost=2)
        c = ledger.claim(dead_process(), policy, 3600, GRID)
        assert c and ledger.start(c, 3600, None, policy) is RunState.RUNNING
        # each holder dies; the next start compares the newest checkpoint with the last one
        c = ledger.claim(dead_process(), policy, 3600, GRID)
        assert c and c.took_over and ledger.start(c, 3600, "ckpt-1", policy) is RunState.RUNNING
        c = ledger.claim(dead_process(), policy, 3600, GRID)  # lost after a save: not counted
        assert c and ledger.start(c, 3600, "ckpt-1", policy) is RunState.RUNNING
        c = ledger.claim(ME, policy, 3600, GRID)  # a second loss in a row with no new checkpoint
        assert c and ledger.start(c, 3600, "ckpt-1", policy) is RunState.FAILED
        assert self.state(ledger, c.run_id) is RunState.FAILED
        assert all(x is None or x.run_id != c.run_id
                   for x in [ledger.claim(ME, policy, 60, GRID) for _ in RUNS])

    # -- the store is the truth ----------------------------------------------------------------

    def test_sync_follows_the_store(self, ledger: Ledger) -> None:
        c = ledger.claim(ME, POLICY, 60, GRID)
        assert c and ledger.finish(c, Outcome.DONE, POLICY) is RunState.DONE
        ledger.sync(RUNS, done={RUNS[5].run_id}, started={RUNS[1].run_id})
        # DONE deleted from the store -> pending again; DONE found in the store -> done
        assert self.state(ledger, RUNS[0].run_id) is RunState.PENDING
        assert self.state(ledger, RUNS[5].run_id) is RunState.DONE

    def test_done_in_the_store_wins_over_a_live_lease(self, ledger: Ledger) -> None:
        # a launcher killed after writing DONE, before recording it: its lease is still live
        c = ledger.claim(OTHER_HOST, POLICY, 3600, GRID)
        assert c is not None
        ledger.sync(RUNS, done={c.run_id}, started=set())
        assert self.state(ledger, c.run_id) is RunState.DONE
        assert all(x is None or x.run_id != c.run_id
                   for x in [ledger.claim(ME, POLICY, 60, GRID) for _ in RUNS])
        # and the holder, if it was alive after all, records its finish without complaint
        assert ledger.finish(c, Outcome.DONE, POLICY) is RunState.DONE

    def test_a_stale_listing_never_reopens_a_run_finished_meanwhile(self, ledger: Ledger) -> None:
        listed_done: set[str] = set()  # listed before the other worker finished the run
        c = ledger.claim(ME, POLICY, 60, GRID)
        assert c and ledger.finish(c, Outcome.DONE, POLICY) is RunState.DONE
        ledger.sync(RUNS, done=listed_done, started=set(), still_done=lambda run_id: run_id == c.run_id)
        assert self.state(ledger, c.run_id) is RunState.DONE

    # -- resets made on another machine -------------------------------------------------------

    def test_forget_honours_each_reset_once(self, ledger: Ledger) -> None:
        """A reset elsewhere (a marker in the store) gives a failed run a fresh count here; the
        same marker seen at the next launch changes nothing, so failures after it count."""
        strict = Policy(max_attempts=1, max_lost=3)
        c = ledger.claim(ME, strict, 60, GRID)
        assert c and ledger.finish(c, Outcome.FAILED, strict) is RunState.FAILED
        assert ledger.forget({c.run_id: "t1", "no-such-run": "t1"}) == {c.run_id}
        row = next(r for r in ledger.rows() if r.run_id == c.run_id)
        assert (row.state, row.failures, row.attempts) == (RunState.PENDING, 0, 1)
        again = ledger.claim(ME, strict, 60, GRID)
        assert again and again.run_id == c.run_id and again.attempt == 2
        assert ledger.finish(again, Outcome.FAILED, strict) is RunState.FAILED
        assert ledger.forget({c.run_id: "t1"}) == set()  # honoured already: the failure stands
        assert self.state(ledger, c.run_id) is RunState.FAILED
        assert ledger.honoured() == {c.run_id: "t1"}
        assert ledger.forget({c.run_id: "t2"}) == {c.run_id}  # a second reset
        assert self.state(ledger, c.run_id) is RunState.PENDING

    def test_forget_leaves_done_and_held_runs_as_they_are(self, ledger: Ledger) -> None:
        done = ledger.claim(ME, POLICY, 60, GRID)
        held = ledger.claim(OTHER_HOST, POLICY, 60, GRID)
        assert done and held and ledger.finish(done, Outcome.DONE, POLICY) is RunState.DONE
        assert ledger.forget({done.run_id: "t", held.run_id: "t"}) == {done.run_id, held.run_id}
        assert self.state(ledger, done.run_id) is RunState.DONE
        assert self.state(ledger, held.run_id) is RunState.RUNNING
        assert ledger.heartbeat(held, 60)  # its holder keeps the run
        assert ledger.forget({}) == set()

    def test_two_grids_share_a_sweep_and_keep_their_runs(self, ledger: Ledger) -> None:
        extra = [RunSpec.from_params({"i": i}, index=i) for i in range(4, 9)]
        ledger.sync(extra, done=set(), started=set())  # another launcher, another grid
        assert {r.run_id for r in ledger.rows()} == {r.run_id for r in RUNS + extra}
        mine = {c.run_id for _ in range(20) if (c := ledger.claim(ME, POLICY, 60, GRID))}
        assert mine == {r.run_id for r in RUNS}
        theirs = {c.run_id for _ in range(20) if (c := ledger.claim(ME, POLICY, 60, grid_key(extra)))}
        assert theirs == {r.run_id for r in extra} - mine
        assert [r.run_id for r in ledger.rows(GRID)] == [r.run_id for r in RUNS]
        ledger.sync(RUNS[:2], done=set(), started=set())  # a smaller grid deletes nothing
        assert len(ledger.rows()) == 9

    def test_renumber_moves_the_fencing_token(self, ledger: Ledger) -> None:
        c = ledger.claim(ME, POLICY, 60, GRID)
        assert c is not None
        moved = ledger.renumber(c, 7)
        assert moved and moved.attempt == 7
        assert ledger.heartbeat(c, 60) is False
        assert ledger.heartbeat(moved, 60)
        assert ledger.renumber(c, 9) is None
        assert ledger.finish(moved, Outcome.INTERRUPTED, POLICY) is RunState.INTERRUPTED
        again = ledger.claim(ME, POLICY, 60, GRID)
        assert again and again.attempt == 8

    # -- a resume at another world size --------------------------------------------------------

    def test_an_approximate_resume_stays_with_the_run_until_it_begins_anew(
            self, ledger: Ledger, location: str, clock: FakeClock) -> None:
        """What ``status`` marks as ``~resumed 2->1 procs``: the attempt that resumed a checkpoint
        saved by 2 processes with 1 reports it as it ends; the row keeps it for every reader
        (a read-only handle opened afterwards, as ``status`` opens one), through a later exact
        resume; a stale claim cannot set it, and a start with no checkpoint forgets it."""
        def resume(attempt: int) -> Resume:
            return Resume(attempt, "step-00000008", 8, saved_world_size=2, world_size=1,
                          approximate=("rng", "data position"))

        def reread(run_id: str) -> Resume | None:
            reader = open_ledger(location, "sweep", readonly=True)
            try:
                return next(r.resumed for r in reader.rows(GRID) if r.run_id == run_id)
            finally:
                reader.close()

        first = ledger.claim(ME, POLICY, 60, GRID)
        assert first and ledger.start(first, 60, None, POLICY) is RunState.RUNNING
        assert ledger.finish(first, Outcome.INTERRUPTED, POLICY, 75) is RunState.INTERRUPTED
        assert all(r.resumed is None for r in ledger.rows())  # none reported: none known
        second = ledger.claim(ME, POLICY, 60, GRID)
        assert second and second.run_id == first.run_id
        assert ledger.start(second, 60, "ckpt-1", POLICY) is RunState.RUNNING
        assert ledger.finish(second, Outcome.INTERRUPTED, POLICY, 75, resumed=resume(2)) is RunState.INTERRUPTED
        assert reread(first.run_id) == resume(2)
        assert ledger.finish(second, Outcome.FAILED, POLICY, 1, resumed=resume(9)) is None  # fenced
        third = ledger.claim(ME, POLICY, 60, GRID)  # resumes exactly, at 1, from a later save
        assert third and third.run_id == first.run_id
        assert ledger.start(third, 60, "ckpt-2", POLICY) is RunState.RUNNING
        assert ledger.finish(third, Outcome.DONE, POLICY, 0) is RunState.DONE
        assert reread(first.run_id) == resume(2)
        # its folder deleted (a re-run asked for): the run begins anew and tells of no resume
        ledger.sync(RUNS, done=set(), started=set())
        assert reread(first.run_id) is None
        other = ledger.claim(ME, POLICY, 60, GRID)
        assert other and other.run_id == first.run_id
        assert ledger.start(other, 60, "ckpt-1", POLICY) is RunState.RUNNING
        assert ledger.finish(other, Outcome.INTERRUPTED, POLICY, 75, resumed=resume(4)) is RunState.INTERRUPTED
        again = ledger.claim(ME, POLICY, 60, GRID)
        assert again and ledger.start(again, 60, None, POLICY) is RunState.RUNNING  # no checkpoint left
        assert ledger.finish(again, Outcome.INTERRUPTED, POLICY, 75) is RunState.INTERRUPTED
        assert reread(first.run_id) is None
        assert [r.resumed for r in ledger.rows() if r.run_id != first.run_id] == [None] * (len(RUNS) - 1)

    # -- many processes at once ------------------------------------------------------------------

    def test_many_processes_take_each_run_exactly_once(self, location: str) -> None:
        """Real processes, each with its own connections, race to claim; every run is taken
        by exactly one of them, once."""
        runs = [RunSpec.from_params({"i": i}, index=i) for i in range(self.many_runs)]
        led = open_ledger(location, "race")
        led.sync(runs, set(), set())
        led.close()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [_PACKAGE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
        procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, location, "race"], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(self.claimers)]
        taken = [rid for p in procs for rid in json.loads(p.communicate(timeout=600)[0])]
        assert all(p.returncode == 0 for p in procs)
        assert Counter(taken) == Counter(r.run_id for r in runs)
        led = open_ledger(location, "race", readonly=True)
        try:
            assert {(r.state, r.attempts) for r in led.rows()} == {(RunState.DONE, 1)}
        finally:
            led.close()

    # -- the SQL pre-filters never hide a run that judge would take ----------------------------

    @pytest.mark.parametrize("seed", range(16))
    def test_a_claim_takes_exactly_what_judge_says(self, location: str, seed: int) -> None:
        """Generated row states (every state, holders alive, dead, reused or elsewhere, leases
        just before, at and just after their end, failures and lost attempts at and around
        the limits, renumbered attempts, resets) judged at a generated time and policy: the
        claims take exactly the runs :func:`judge` calls runnable, in claim order, and
        ``settled`` agrees with it. A backend's SQL may drop runs for speed, only ever ones
        judge would not take."""
        rng = random.Random(seed)
        clock = FakeClock()
        led = self.open(location, clock, sweep=f"judge-{seed}")
        try:
            runs = [RunSpec.from_params({"seed": seed, "i": i}, index=i) for i in range(14)]
            grid = grid_key(runs)
            ids = [r.run_id for r in runs]
            led.sync(runs, done={i for i in ids if rng.random() < 0.05},
                     started={i for i in ids if rng.random() < 0.3})
            workers = hostile_workers()
            for _ in range(rng.randint(1, 3)):
                for run_id in rng.sample(ids, len(ids)):
                    self._live_a_little(led, clock, rng, workers, grid, run_id, ids)
            rows = led.rows(grid)
            # At, just before or just after a lease's end; mostly one that the SQL could drop
            # (held elsewhere: only the lease tells), where an off-by-one would hide a run.
            running = [r for r in rows if r.state is RunState.RUNNING and r.lease_until]
            remote = [r for r in running if not (r.worker or "").startswith(HOST + ":")]
            if running and rng.random() < 0.9:
                end = rng.choice(remote if remote and rng.random() < 0.7 else running).lease_until
                assert end is not None
                clock.now = rng.choice([end, end, math.nextafter(end, -math.inf),
                                      math.nextafter(end, math.inf)])
            policy = Policy(max_attempts=rng.randint(1, 4), max_lost=rng.randint(1, 3))
            skip = set(rng.sample(ids, rng.randint(0, 2)))
            now = led.now()
            expected = [r.run_id for r in sorted(rows, key=claim_order)
                        if judge(r, now, policy) is Verdict.RUNNABLE and r.run_id not in skip]
            assert led.settled(policy, grid) is settled(rows, now, policy)
            taken = []
            while len(taken) <= len(ids) and (c := led.claim(ME, policy, 3600, grid, skip)):
                taken.append(c.run_id)
            verdicts = {r.run_id: (r.state.value, r.worker, r.lease_until, r.failures, r.lost,
                                   judge(r, now, policy).value) for r in rows}
            assert taken == expected, (now, policy, verdicts)
        finally:
            led.close()

    @staticmethod
    def _live_a_little(led: Ledger, clock: FakeClock, rng: random.Random, workers: list[ProcessRef],
                       grid: str, run_id: str, ids: list[str]) -> None:
        """A few random steps of ``run_id``'s life, through the ledger's own calls."""
        policy = Policy(max_attempts=rng.randint(1, 4), max_lost=rng.randint(1, 3))
        lease_s = rng.choice([0.5, 2.0, 60.0])
        claim: Claim | None = led.claim(rng.choice(workers), policy, lease_s, grid,
                                        skip=[i for i in ids if i != run_id])
        while claim is not None:
            step = rng.choice(["start", "start", "heartbeat", "renumber", "release", "finish",
                               "forget", "leave", "leave"])
            clock.advance(rng.choice([0.0, 0.25, 1.0, 3.0]))
            if step == "start":
                if led.start(claim, lease_s, rng.choice([None, "ckpt-1"]), policy) is not RunState.RUNNING:
                    return
            elif step == "heartbeat":
                child = rng.choice([None, ProcessRef.me(), dead_process()])
                if not led.heartbeat(claim, lease_s, child):
                    return
            elif step == "renumber":
                claim = led.renumber(claim, claim.attempt + rng.randint(1, 3))
            elif step == "release":
                led.release(claim)
                return
            elif step == "finish":
                outcome = rng.choice([Outcome.DONE, Outcome.INTERRUPTED, Outcome.FAILED, Outcome.FAILED])
                led.finish(claim, outcome, policy, rng.choice([None, 0, 1]))
                return
            elif step == "forget":
                led.forget({run_id: f"reset-{rng.randint(0, 2)}"})
            else:
                return

