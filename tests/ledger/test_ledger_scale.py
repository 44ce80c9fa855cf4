"""Claims on the SQLite ledger cost the same at any sweep size.

Never timed (a shared machine): the work of a call is counted in SQLite virtual-machine
instructions, through the connection's progress handler, which is the same on every
machine for the same database. A claim that scanned every open run (as it used to)
does a hundred times more at 20,000 runs than at 200; one that walks an index does not.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from sweeprun.identity import RunSpec
from sweeprun.ledger import Outcome, Policy, RunState, SqliteLedger, grid_key, open_ledger
from sweeprun.procs import ProcessRef

ME = ProcessRef.me()
POLICY = Policy(max_attempts=3)
T = TypeVar("T")


def sweep(tmp_path: Path, size: int, name: str = "ledger") -> tuple[SqliteLedger, list[RunSpec], str]:
    runs = [RunSpec.from_params({"i": i, "lr": 0.1, "opt": "adamw"}, index=i) for i in range(size)]
    led = open_ledger(tmp_path / f"{name}-{size}.sqlite", "sweep")
    assert isinstance(led, SqliteLedger)
    led.sync(runs, done=set(), started=set())
    return led, runs, grid_key(runs)


def instructions(led: SqliteLedger, call: Callable[[], T]) -> tuple[T, int]:
    """``call()``'s result and about how many SQLite instructions it ran on ``led``'s connection."""
    conn: sqlite3.Connection = led.file.db().conn
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, 10)
    try:
        return call(), count[0] * 10
    finally:
        conn.set_progress_handler(None, 10)


def claim_work(led: SqliteLedger, grid: str | None, held: int = 4) -> int:
    """Instructions of one claim after ``held`` runs were taken by live workers of this host
    and one run finished (the launcher's own slots: passed over by every claim)."""
    for _ in range(held):
        assert led.claim(ME, POLICY, 3600, grid)
    c = led.claim(ME, POLICY, 3600, grid)
    assert c and led.finish(c, Outcome.DONE, POLICY) is RunState.DONE
    claim, work = instructions(led, lambda: led.claim(ME, POLICY, 3600, grid))
    assert claim is not None and claim.run_id.startswith(f"i={held + 1},")
    return work


def test_a_claim_does_the_same_work_at_200_and_20000_pending(tmp_path: Path) -> None:
    for of_grid in (False, True):  # any run, and one grid's runs (a members lookup per row)
        work = []
        for size in (200, 20_000):
            led, _, grid = sweep(tmp_path, size, name=f"grid-{of_grid}")
            work.append(claim_work(led, grid if of_grid else None))
            led.close()
        assert work[1] < 2 * work[0], work


def test_failed_runs_are_not_walked_by_claims(tmp_path: Path) -> None:
    """A sweep where most runs failed for good: claims and the launcher's "is it over" check
    go straight to the runs that can still run, and a raised limit re-opens failed runs."""
    led, runs, grid = sweep(tmp_path, 20_000)
    led.file.db().conn.execute("UPDATE runs SET state = 'failed', failures = 3 WHERE idx < 19000")
    claim, work = instructions(led, lambda: led.claim(ME, POLICY, 3600, grid))
    assert claim and claim.run_id == runs[19_000].run_id
    assert work < 5_000, work
    over, work = instructions(led, lambda: led.settled(POLICY, grid))
    assert over is False and work < 5_000, work
    again = led.claim(ME, Policy(max_attempts=4), 3600, grid)  # raised: the first failed run is next
    assert again and again.run_id == runs[0].run_id and again.attempt == 1
    led.close()


def test_settled_does_not_read_a_finished_sweep(tmp_path: Path) -> None:
    led, runs, grid = sweep(tmp_path, 20_000)
    led.sync(runs, done={r.run_id for r in runs[1:]}, started=set())
    over, work = instructions(led, lambda: led.settled(POLICY, grid))
    assert over is False and work < 5_000, work
    c = led.claim(ME, POLICY, 60, grid)
    assert c and c.run_id == runs[0].run_id
    assert led.settled(POLICY, grid) is False  # held by a live worker: not over yet
    led.finish(c, Outcome.DONE, POLICY)
    over, work = instructions(led, lambda: led.settled(POLICY, grid))
    assert over is True and work < 5_000, work
    led.close()


def test_a_large_skip_set_is_passed_over(tmp_path: Path) -> None:
    """Runs held elsewhere (by the store's leases) can be thousands; they go as one parameter."""
    led, runs, grid = sweep(tmp_path, 6_000)
    skip = {r.run_id for r in runs[:5_000]}
    c = led.claim(ME, POLICY, 60, grid, skip=skip)
    assert c and c.run_id == runs[5_000].run_id
    led.close()


@pytest.mark.parametrize("index", ["runs_claim", "runs_failed", "runs_running"])
def test_a_ledger_without_the_claim_indexes_gets_them_when_opened(tmp_path: Path, index: str) -> None:
    """Ledgers written before the indexes existed (or by an older sweeprun) are given them."""
    led, _, grid = sweep(tmp_path, 10)
    led.close()
    conn = sqlite3.connect(tmp_path / "ledger-10.sqlite")
    conn.execute(f"DROP INDEX {index}")
    conn.commit()
    conn.close()
    led = open_ledger(tmp_path / "ledger-10.sqlite", "sweep")
    c = led.claim(ME, POLICY, 60, grid)
    assert c and c.run_id.startswith("i=0,")
    led.close()
    conn = sqlite3.connect(tmp_path / "ledger-10.sqlite")
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert index in names
