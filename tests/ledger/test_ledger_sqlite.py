"""The ledger contract on SQLite, plus what only a file on local disk can get wrong."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from sweeprun.errors import LedgerError
from sweeprun.ledger import Outcome, RunState, open_ledger
from sweeprun.ledger.contract import ME, POLICY, RUNS, LedgerContract
from sweeprun.resumes import Resume
from sweeprun.settings import SettingError


class TestSqliteLedger(LedgerContract):
    """The contract, with the exactly-once race between real processes (10 of them, 200 runs)
    and the generated states that check the claim's SQL against judge."""

    @pytest.fixture
    def location(self, tmp_path: Path) -> str:
        return str(tmp_path / "ledger.sqlite")


def test_corrupt_ledger_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="corrupt.*delete it"):
        open_ledger(path, "sweep")


def _other_apps_database(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE experiments (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO experiments (name) VALUES ('mine')")
    conn.commit()
    conn.close()
    return path.read_bytes()


def test_another_applications_database_is_refused_and_left_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "mlflow.db"
    before = _other_apps_database(path)
    for readonly in (False, True):
        with pytest.raises(LedgerError, match="not a sweeprun ledger.*untouched"):
            open_ledger(path, "sweep", readonly=readonly)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_ledger_from_a_newer_sweeprun_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    open_ledger(path, "sweep").close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="newer sweeprun.*schema 99"):
        open_ledger(path, "sweep")
    assert path.read_bytes() == before


def test_a_schema_1_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE runs (sweep TEXT, run_id TEXT, idx INTEGER, params TEXT, state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, worker TEXT,
            worker_start INTEGER, child_pid INTEGER, child_start INTEGER, lease_until FLOAT,
            heartbeat_at FLOAT, last_exit INTEGER, updated_at FLOAT, PRIMARY KEY (sweep, run_id));
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO meta VALUES ('schema_version', '1');
    """)
    conn.execute("INSERT INTO runs (sweep, run_id, idx, params, state, attempts, failures, updated_at) "
                 "VALUES ('sweep', ?, 0, ?, 'interrupted', 4, 1, 0)", [RUNS[0].run_id, json.dumps(RUNS[0].params)])
    conn.commit()
    conn.close()
    led = open_ledger(path, "sweep")
    row = led.rows()[0]
    assert (row.state.value, row.attempts, row.failures, row.lost) == ("interrupted", 4, 1, 0)
    led.close()


def older_ledger(path: Path, column: str) -> Path:
    """A ledger file with the runs, as a sweeprun from before ``column`` left it."""
    led = open_ledger(path, "sweep")
    led.sync(RUNS, set(), set())
    led.close()
    conn = sqlite3.connect(path)
    conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    conn.commit()
    conn.close()
    return path


def test_a_ledger_from_before_resets_were_honoured_gains_the_column(tmp_path: Path) -> None:
    """Read-only (status) it honours nothing yet; opened to write, the column is added and
    the rows are kept."""
    path = older_ledger(tmp_path / "ledger.sqlite", "reset")
    reader = open_ledger(path, "sweep", readonly=True)
    assert reader.honoured() == {} and len(reader.rows()) == len(RUNS)
    reader.close()
    led = open_ledger(path, "sweep")
    assert led.forget({RUNS[0].run_id: "t"}) == {RUNS[0].run_id}
    assert led.honoured() == {RUNS[0].run_id: "t"}
    led.close()


def test_a_ledger_from_before_resumes_were_recorded_gains_the_column(tmp_path: Path) -> None:
    """Read-only (status) its runs tell of no resume (the store's start records still do);
    opened to write, the column is added, the rows are kept and a finish records one."""
    path = older_ledger(tmp_path / "ledger.sqlite", "resumed")
    reader = open_ledger(path, "sweep", readonly=True)
    assert [r.resumed for r in reader.rows()] == [None] * len(RUNS)
    reader.close()
    led = open_ledger(path, "sweep")
    claim = led.claim(ME, POLICY, 60)
    assert claim and led.start(claim, 60, "ckpt-1", POLICY) is RunState.RUNNING
    resumed = Resume(claim.attempt, None, 8, saved_world_size=2, world_size=1, approximate=("rng",))
    assert led.finish(claim, Outcome.INTERRUPTED, POLICY, 75, resumed=resumed) is RunState.INTERRUPTED
    assert next(r.resumed for r in led.rows() if r.run_id == claim.run_id) == resumed
    led.close()


@pytest.mark.parametrize("value", [
    "{not json", "[]", "null", "", '{"attempt": 2}', '{"attempt": "2", "saved_world_size": 2}',
    '{"attempt": 2, "saved_world_size": true}', '{"attempt": 0, "saved_world_size": 2}',
    "[" * 100_000,
])
def test_a_damaged_resume_reads_as_none_and_the_row_as_it_is(tmp_path: Path, value: str) -> None:
    """The resume is only shown: a value edited by hand (or by another tool) is no resume,
    never an error that would stop ``status`` or a launch."""
    path = tmp_path / "ledger.sqlite"
    led = open_ledger(path, "sweep")
    led.sync(RUNS, set(), set())
    conn = sqlite3.connect(path)
    conn.execute("UPDATE runs SET resumed = ? WHERE run_id = ?", [value, RUNS[2].run_id])
    conn.commit()
    conn.close()
    row = next(r for r in led.rows() if r.run_id == RUNS[2].run_id)
    assert (row.resumed, row.state, row.params) == (None, RunState.PENDING, RUNS[2].params)
    led.close()


@pytest.mark.parametrize("column, value, message", [
    ("state", "exploded", "unknown state 'exploded'"),
    ("params", "{not json", "unreadable params"),
])
def test_a_damaged_row_is_a_clear_error(tmp_path: Path, column: str, value: str, message: str) -> None:
    path = tmp_path / "ledger.sqlite"
    led = open_ledger(path, "sweep")
    led.sync(RUNS, set(), set())
    led.close()
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE runs SET {column} = ? WHERE run_id = ?", [value, RUNS[2].run_id])
    conn.commit()
    conn.close()
    led = open_ledger(path, "sweep")
    with pytest.raises(LedgerError, match=f"{RUNS[2].run_id}.*{message}.*rebuilt from the store"):
        led.rows()
    led.close()


def test_reading_a_ledger_leaves_no_file_behind(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    led = open_ledger(path, "sweep")
    led.sync(RUNS, set(), set())
    led.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    reader = open_ledger(path, "sweep", readonly=True)
    assert len(reader.rows()) == len(RUNS)
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == files == ["ledger.sqlite"]


@pytest.mark.parametrize("location", [":memory:", "file::memory:?cache=shared"])
def test_an_in_memory_ledger_is_refused(location: str) -> None:
    with pytest.raises(LedgerError, match="in-memory.*cannot coordinate"):
        open_ledger(location, "sweep")


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan"])
def test_a_garbage_busy_timeout_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 value: str) -> None:
    monkeypatch.setenv("SWEEPRUN_BUSY_TIMEOUT_S", value)
    with pytest.raises(SettingError, match="SWEEPRUN_BUSY_TIMEOUT_S"):
        open_ledger(tmp_path / "ledger.sqlite", "sweep")
    assert not (tmp_path / "ledger.sqlite").exists()
