"""`status` and `show` of runs whose attempts ran as several processes (issue 20).

The training API records each attempt's world size in ``attempts/<n>.started`` and, after a
resume at another world size, that the resume was approximate (RNG and data position cannot
follow a change of world size). These tests write such records by hand into the folders of a
finished tiny sweep (no torch): what a user sees is the same.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from test_manage import cli

from sweeprun import Sweep, load_spec
from sweeprun.manage import run_detail
from sweeprun.render import run_view, status_table
from sweeprun.resumes import Resume, Started, parse_started
from sweeprun.store import RunPaths, layout

from conftest import Sandbox

#: What restore.py records as approximate after a resume at another world size.
APPROXIMATE = ["rng", "data position"]
#: A sharded checkpoint saved by attempt 1 at step 8.
SAVED = layout.CheckpointName(attempt=1, seq=3, step=8)


def resumed(attempt: int, now: int, saved: int = 2, step: int = 8) -> dict[str, Any]:
    """The start record of an attempt that resumed at world size ``now`` from ``saved``."""
    return {"attempt": attempt, "step": 0, "world_size": now,
            layout.STARTED_RESUMED: {"checkpoint": SAVED.shards, "step": step, "world_size": saved,
                                     "approximate": APPROXIMATE}}


def write_started(run: RunPaths, attempt: int, record: Any) -> None:
    path = Path(run.api_started(attempt))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record if isinstance(record, bytes) else json.dumps(record).encode())


def statuses(sweep: Sweep) -> dict[str, dict[str, Any]]:
    """``status --json`` in this process: run id -> its row."""
    return {row.run_id: row.as_json() for row in sweep.status()}


@pytest.fixture
def finished(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Sweep, dict[str, str]]:
    """A finished sweep of a done run (one attempt) and a failed one (two attempts), and
    which is which."""
    sweep = sandbox.write_sweep({"fail": [False, True]}, {"steps": 2, "sleep": 0}, max_attempts=2)
    assert sandbox.run("launch", str(sweep)).returncode == 1
    monkeypatch.setenv("SWEEPRUN_HOME", str(sandbox.root / "state"))
    loaded = Sweep(load_spec(sweep), str(sandbox.ledger))
    ids = {("failed" if run.params["fail"] else "done"): run.run_id for run in loaded.runs}
    return sweep, loaded, ids


def test_show_and_status_say_a_resume_at_another_world_size_was_approximate(
        sandbox: Sandbox, finished: tuple[Path, Sweep, dict[str, str]]) -> None:
    """Killed at 2 processes, resumed at 1: `show` lists each attempt's world size and says
    how the resume was approximate; `status` marks the run."""
    sweep, loaded, ids = finished
    run = loaded.paths.run(ids["failed"])
    write_started(run, 1, {"attempt": 1, "step": 0, "world_size": 2})
    write_started(run, 2, resumed(2, now=1))

    console = Console(record=True, width=120)
    console.print(run_view(run_detail(loaded, ids["failed"])))
    text = console.export_text()
    assert "attempt 2: resumed from step 8 saved at 2 processes, now 1: approximate (rng, data position)" in text
    header = next(line for line in text.splitlines() if "how it ended" in line)
    assert header.split()[:3] == ["#", "worker", "procs"]
    attempts = [line.split() for line in text.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert [(a[0], a[2]) for a in attempts] == [("1", "2"), ("2", "1")]

    shown = json.loads(cli(sandbox, "show", str(sweep), "fail=true", "--json").stdout)
    expected = {"attempt": 2, "checkpoint": SAVED.shards, "step": 8, "saved_world_size": 2,
                "world_size": 1, "approximate": APPROXIMATE}
    assert [(a["attempt"], a["world_size"], a["resumed"]) for a in shown["attempts"]] == [
        (1, 2, None), (2, 1, expected)]
    assert shown["approximate_resume"] == expected

    rows = sandbox.status(sweep)
    assert rows[ids["failed"]]["approximate_resume"] == expected
    assert rows[ids["done"]]["approximate_resume"] is None
    console = Console(record=True, width=200)
    console.print(status_table(loaded.status(), title="sweep t"))
    table = console.export_text()
    assert "~resumed 2→1 procs" in table and table.count("~resumed") == 2  # the row, and the caption's key
    assert "RNG and data position approximate" in table


def test_status_shows_the_resume_the_ledger_kept_and_a_newer_one_in_the_store(
        sandbox: Sandbox, finished: tuple[Path, Sweep, dict[str, str]]) -> None:
    """The launcher hands an ended attempt's resume to the ledger (``Ledger.finish``), which
    keeps it with the run through later exact resumes: `status` and `show` take it from
    there; a newer attempt's record in the store (one still running, or run on a machine
    whose ledger this one cannot see) wins over it."""
    sweep, loaded, ids = finished
    run = loaded.paths.run(ids["failed"])
    kept = Resume(1, SAVED.shards, 8, saved_world_size=2, world_size=1, approximate=tuple(APPROXIMATE))
    with closing(sqlite3.connect(sandbox.ledger)) as db, db:  # as attempt 1's end recorded it
        db.execute("UPDATE runs SET resumed = ? WHERE run_id = ?", [json.dumps(kept.as_json()), run.run_id])
    write_started(run, 2, {"attempt": 2, "step": 0, "world_size": 1})  # attempt 2 resumed exactly
    assert statuses(loaded)[ids["failed"]]["approximate_resume"] == kept.as_json()
    assert run_detail(loaded, ids["failed"]).as_json()["approximate_resume"] == kept.as_json()
    assert statuses(loaded)[ids["done"]]["approximate_resume"] is None

    write_started(run, 2, resumed(2, now=1, saved=4))
    newer = statuses(loaded)[ids["failed"]]["approximate_resume"]
    assert (newer["attempt"], newer["saved_world_size"]) == (2, 4)
    assert run_detail(loaded, ids["failed"]).as_json()["approximate_resume"] == newer


def test_a_done_single_process_run_costs_status_no_read_until_it_has_a_sharded_checkpoint(
        sandbox: Sandbox, finished: tuple[Path, Sweep, dict[str, str]]) -> None:
    """A big sweep's done runs are mostly single-process: `status` reads a start record only
    where a world-size change is possible (several processes, not done, or a multi-rank
    checkpoint in the folder). `show` reads every attempt's record."""
    sweep, loaded, ids = finished
    run = loaded.paths.run(ids["done"])
    write_started(run, 1, resumed(1, now=1))
    assert statuses(loaded)[ids["done"]]["approximate_resume"] is None
    assert run_detail(loaded, ids["done"]).as_json()["approximate_resume"]["saved_world_size"] == 2

    shards = Path(run.checkpoints) / SAVED.shards
    shards.mkdir(parents=True)
    (shards / layout.DCP_METADATA).write_bytes(b"")
    assert statuses(loaded)[ids["done"]]["approximate_resume"]["world_size"] == 1


def test_a_damaged_start_record_is_one_line_never_a_traceback(
        sandbox: Sandbox, finished: tuple[Path, Sweep, dict[str, str]]) -> None:
    sweep, loaded, ids = finished
    run = loaded.paths.run(ids["failed"])
    write_started(run, 1, b"\x00{ not json")
    write_started(run, 2, {"attempt": 2, "world_size": "two", layout.STARTED_RESUMED: {"world_size": 2.5}})

    result = cli(sandbox, "show", str(sweep), "fail=true")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.count("start record did not read") == 1
    assert "attempt 1: its start record did not read (not JSON)" in result.stdout
    assert "resumed" not in result.stdout
    shown = run_detail(loaded, ids["failed"]).as_json()
    assert [(a["world_size"], a["resumed"], a["start_record_problem"]) for a in shown["attempts"]] == [
        (None, None, "not JSON"), (None, None, None)]
    status = cli(sandbox, "status", str(sweep), "--json")
    assert status.returncode == 0 and status.stderr == ""
    assert [row["approximate_resume"] for row in json.loads(status.stdout)] == [None, None]


@pytest.mark.parametrize("record, expected", [
    ({"attempt": 3, "step": 0, "world_size": 2}, Started(3, world_size=2)),
    ({"world_size": True}, Started(3)),                        # a bool is not a world size
    ({"world_size": 0}, Started(3)),
    ({"world_size": 10**30}, Started(3)),
    ({"world_size": 1, "resumed": "yes"}, Started(3, world_size=1)),
    ({"world_size": 1, "resumed": {"world_size": "2"}}, Started(3, world_size=1)),
    ({"world_size": 1, "resumed": {"world_size": 2, "step": -1, "checkpoint": 7, "approximate": "rng"}},
     Started(3, 1, Resume(3, None, None, 2, 1, ()))),
    ({"resumed": {"world_size": 4, "step": 8, "approximate": ["rng", 5, ""]}},
     Started(3, None, Resume(3, None, 8, 4, None, ("rng",)))),
    ([1, 2], Started(3, problem="not a JSON object")),
])
def test_a_start_record_of_other_types_reads_field_by_field(record: Any, expected: Started) -> None:
    assert parse_started(3, record) == expected


def test_a_resume_reads_as_one_line() -> None:
    resume = parse_started(2, resumed(2, now=1)).resume
    assert resume is not None
    assert resume.text() == "resumed from step 8 saved at 2 processes, now 1: approximate (rng, data position)"
    assert Resume(2, None, None, 4, None, ()).text() == "resumed saved at 4 processes: approximate"
