"""The ledger contract, run against every backend: exclusive claims, leases, fencing, rebuild."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sweeprun.identity import RunSpec
from sweeprun.ledger import Ledger, Outcome, RunState, SqliteLedger, open_ledger
from sweeprun.procs import ProcessRef

RUNS = [RunSpec.from_params({"i": i}, index=i) for i in range(6)]
ME = ProcessRef.me()
OTHER_HOST = ProcessRef("another-host", 4242, None)


def dead_process() -> ProcessRef:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return ProcessRef.of(proc.pid)


@pytest.fixture(params=["sqlite"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    led = {"sqlite": lambda: SqliteLedger(tmp_path / "ledger.sqlite", "sweep")}[request.param]()
    led.sync(RUNS, done=set(), started=set())
    yield led
    led.close()


class TestLedgerContract:
    def test_claims_in_grid_order_each_once(self, ledger: Ledger) -> None:
        claims = [ledger.claim(ME, max_attempts=3, lease_s=60) for _ in RUNS]
        assert [c.run_id for c in claims] == [r.run_id for r in RUNS]
        assert all(c.attempt == 1 for c in claims)
        assert ledger.claim(ME, max_attempts=3, lease_s=60) is None

    def test_interrupted_run_is_claimed_again_before_new_ones(self, ledger: Ledger) -> None:
        first = ledger.claim(ME, 3, 60)
        ledger.finish(first, Outcome.INTERRUPTED, 3)
        again = ledger.claim(ME, 3, 60)
        assert again.run_id == first.run_id and again.attempt == 2

    def test_failures_count_interruptions_do_not(self, ledger: Ledger) -> None:
        run = None
        for _ in range(3):
            c = ledger.claim(ME, 2, 60)
            run = run or c.run_id
            assert c.run_id == run
            ledger.finish(c, Outcome.INTERRUPTED, 2)
        c = ledger.claim(ME, 2, 60)
        assert ledger.finish(c, Outcome.FAILED, 2) is RunState.PENDING
        c = ledger.claim(ME, 2, 60)
        assert c.run_id == run and c.attempt == 5
        assert ledger.finish(c, Outcome.FAILED, 2) is RunState.FAILED
        row = next(r for r in ledger.rows() if r.run_id == run)
        assert (row.state, row.attempts, row.failures) == (RunState.FAILED, 5, 2)
        assert ledger.claim(ME, 2, 60).run_id != run
        # raising max_attempts re-opens the failed run
        assert any(ledger.claim(ME, 3, 60).run_id == run for _ in RUNS)

    def test_live_lease_is_respected_expired_one_taken_over(self, ledger: Ledger) -> None:
        held = ledger.claim(OTHER_HOST, 3, lease_s=60)
        taken = {ledger.claim(ME, 3, 60).run_id for _ in RUNS[1:]}
        assert held.run_id not in taken
        short = SqliteLedger(ledger.path, "sweep")  # same file, second connection
        short.sync(RUNS, set(), set())
        # expire the other host's lease by heartbeating it with a negative lease
        assert ledger.heartbeat(held, lease_s=-1)
        stolen = short.claim(ME, 3, 60)
        assert stolen.run_id == held.run_id and stolen.attempt == held.attempt + 1
        # the old holder is fenced out: no heartbeat, no finish
        assert ledger.heartbeat(held, 60) is False
        assert ledger.finish(held, Outcome.DONE, 3) is None
        assert ledger.finish(stolen, Outcome.DONE, 3) is RunState.DONE
        short.close()

    def test_dead_holder_on_this_host_is_reclaimed_at_once(self, ledger: Ledger) -> None:
        dead = dead_process()
        held = ledger.claim(dead, 3, lease_s=3600)
        again = ledger.claim(ME, 3, 60)
        assert again.run_id == held.run_id and again.attempt == 2

    def test_orphan_child_is_reported(self, ledger: Ledger) -> None:
        child = subprocess.Popen(["sleep", "30"])
        try:
            held = ledger.claim(dead_process(), 3, 3600)
            ledger.heartbeat(held, 3600, ProcessRef.of(child.pid))
            again = ledger.claim(ME, 3, 60)
            assert again.orphan is not None and again.orphan.pid == child.pid
        finally:
            child.kill()
            child.wait()

    def test_sync_follows_the_store(self, ledger: Ledger) -> None:
        c = ledger.claim(ME, 3, 60)
        ledger.finish(c, Outcome.DONE, 3)
        ledger.sync(RUNS, done={RUNS[5].run_id}, started=set())
        states = {r.run_id: r.state for r in ledger.rows()}
        # DONE deleted from the store -> pending again; DONE found in the store -> done
        assert states[RUNS[0].run_id] is RunState.PENDING
        assert states[RUNS[5].run_id] is RunState.DONE
        # runs dropped from the grid leave the index
        ledger.sync(RUNS[:2], done=set(), started=set())
        assert [r.run_id for r in ledger.rows()] == [r.run_id for r in RUNS[:2]]


CLAIMER = """
import json, sys
from sweeprun.ledger import Outcome, RunState, open_ledger
from sweeprun.procs import ProcessRef
led = open_ledger(sys.argv[1], "sweep")
me = ProcessRef.me()
got = []
while (c := led.claim(me, 3, 600)) is not None:
    got.append(c.run_id)
    assert led.finish(c, Outcome.DONE, 3) is RunState.DONE
print(json.dumps(got))
"""


def test_ten_processes_take_each_run_exactly_once(tmp_path: Path) -> None:
    runs = [RunSpec.from_params({"i": i}, index=i) for i in range(200)]
    path = tmp_path / "ledger.sqlite"
    led = open_ledger(path, "sweep")
    led.sync(runs, set(), set())
    led.close()
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(10)]
    taken = [rid for p in procs for rid in json.loads(p.communicate(timeout=120)[0])]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(taken) == sorted(r.run_id for r in runs)


def test_corrupt_ledger_is_a_clear_error(tmp_path: Path) -> None:
    from sweeprun.errors import LedgerError

    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="corrupt.*delete it"):
        open_ledger(path, "sweep")
