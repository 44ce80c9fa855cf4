"""One sweep is coordinated one way (issue 18): the store records how (``COORDINATION``), and a
worker whose ledger would coordinate differently is refused in one line instead of running
every run a second time.

The probe that found it: one machine without ``SWEEPRUN_LEDGER`` (its own SQLite ledger,
plus leases in the store) beside PostgreSQL workers (no store leases) on one bucket ran all
runs twice. Each simulated machine here has its own ``SWEEPRUN_HOST``, ``SWEEPRUN_HOME``
and ``HOME``; they share the store and, for the PostgreSQL ones, the database.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import fsspec
import pytest

from sweeprun.errors import LedgerError
from sweeprun.fleet import STORE_LEASES, Coordination, CoordinationRecord
from sweeprun.store import SweepPaths

from conftest import REPO, Sandbox, wait_for
from servers import PostgresServer

PASSWORD = "hunter2-sekrit"
EXCLUSIVE = REPO / "tests" / "scripts" / "exclusive.py"
STEPS = REPO / "tests" / "scripts" / "steps.py"


def machine(sandbox: Sandbox, host: str, *args: str, ledger: str | None = None,
            **env: str) -> subprocess.Popen[str]:
    """``sweeprun ARGS`` on the simulated machine ``host``; ``ledger``: its ``SWEEPRUN_LEDGER``
    (none: the default, a SQLite file under its own ``SWEEPRUN_HOME``)."""
    home = sandbox.root / "hosts" / host
    full = {**sandbox.env(SWEEPRUN_HOST=host, HOME=str(home), **env), "SWEEPRUN_HOME": str(home / "state")}
    full.pop("SWEEPRUN_LEDGER", None)
    if ledger:
        full["SWEEPRUN_LEDGER"] = ledger
    return subprocess.Popen([sys.executable, "-m", "sweeprun", *args], env=full, cwd=sandbox.root,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def with_password(postgres_url: str) -> str:
    """The session's server trusts everyone, so a password in the URL is accepted and unused:
    what matters is that it never reaches a message or the store."""
    return postgres_url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def store_files(store: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(store)
    return {path: fs.cat_file(path) for path in fs.find(root)}


@pytest.fixture(params=["folder", "bucket"])
def store(request: pytest.FixtureRequest, sandbox: Sandbox) -> str:
    if request.param == "folder":
        return str(sandbox.store)
    return request.getfixturevalue("s3_bucket") + "/sweeps"


def each_run_once(sandbox: Sandbox, runs: int) -> Counter:
    events = sandbox.events()
    assert not [e for e in events if e["event"] == "overlap"], "a run had two processes at once"
    starts = Counter(e["run"] for e in events if e["event"] == "start")
    assert len(starts) == runs and set(starts.values()) == {1}, starts
    return starts


@pytest.mark.slow
def test_a_sqlite_machine_beside_a_postgresql_worker_never_runs_a_run_twice(
        sandbox: Sandbox, store: str, postgres_url: str) -> None:
    """Launched at once on one store: the first to record the sweep's coordination runs every
    run, once; the other is refused in one line (exit 2) and runs nothing. Running the same
    command again: the first's finds nothing to do, the other's is refused again."""
    sweep = sandbox.write_sweep({"a": [1, 2, 3, 4]}, store=store,
                                command=f"python {EXCLUSIVE} sleep 2")
    pg = with_password(postgres_url)
    commands = {"vm-sqlite": None, "vm-postgres": pg}
    procs = {host: machine(sandbox, host, "worker", str(sweep), "--workers", "4", ledger=ledger)
             for host, ledger in commands.items()}
    results = {host: finish(proc) for host, proc in procs.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    (winner,) = [host for host, (code, _, _) in results.items() if code == 0]
    (loser,) = [host for host, (code, _, _) in results.items() if code == 2]
    _, out, err = results[loser]
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: sweep t in ") and "--move-ledger" in err and "twice" in err
    each_run_once(sandbox, 4)
    for _code, out, err in results.values():
        assert PASSWORD not in out + err
    assert not [path for path, blob in store_files(store).items() if PASSWORD.encode() in blob]

    # the habit: run the same command again, on each machine
    again = finish(machine(sandbox, winner, "worker", str(sweep), ledger=commands[winner]))
    assert again[0] == 0 and "0 process(es) started" in again[1], again
    refused = finish(machine(sandbox, loser, "worker", str(sweep), ledger=commands[loser]))
    assert refused[0] == 2 and refused[2] == results[loser][2]
    # status reads whatever the ledger: never refused
    status = finish(machine(sandbox, loser, "status", str(sweep), "--json", ledger=commands[loser]))
    assert status[0] == 0 and status[1].count('"done"') == 4, status
    each_run_once(sandbox, 4)


@pytest.mark.slow
def test_the_same_database_by_another_name_is_the_same_coordination(
        sandbox: Sandbox, postgres_url: str, postgres_server: PostgresServer) -> None:
    """The record holds the id the database keeps, not its URL: a machine that reaches it as
    ``localhost`` (or through a pooler) joins; another database on the same server does not."""
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 1, "sleep": 0}, command=f"python {STEPS}")
    assert finish(machine(sandbox, "vm-a", "launch", str(sweep), ledger=postgres_url))[0] == 0
    other_name = postgres_url.replace("127.0.0.1", "localhost")
    again = finish(machine(sandbox, "vm-b", "worker", str(sweep), ledger=other_name))
    assert again[0] == 0 and "0 process(es) started" in again[1], again
    other_db = postgres_server.database()
    refused = finish(machine(sandbox, "vm-c", "worker", str(sweep), ledger=other_db))
    assert refused[0] == 2 and "Give it the same ledger" in refused[2], refused
    each_run_once(sandbox, 2)


@pytest.mark.slow
def test_a_sweep_moved_from_sqlite_to_postgresql_on_purpose(sandbox: Sandbox, postgres_url: str) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 1, "sleep": 0}, command=f"python {STEPS}")
    assert finish(machine(sandbox, "laptop", "launch", str(sweep)))[0] == 0
    record = CoordinationRecord(SweepPaths(fsspec.filesystem("file"), str(sandbox.store / "t")))
    assert record.read() == Coordination(STORE_LEASES)
    # the grid grows; the fleet is to take it over, but a worker without the flag is refused first
    sweep = sandbox.write_sweep({"a": [1, 2, 3]}, {"steps": 1, "sleep": 0}, command=f"python {STEPS}")
    before = store_files(str(sandbox.store))
    refused = finish(machine(sandbox, "vm-1", "worker", str(sweep), ledger=postgres_url))
    assert refused[0] == 2 and "leases in the store" in refused[2] and "--move-ledger" in refused[2]
    assert "Run it with its own SQLite ledger" in refused[2] and "stop its workers" in refused[2]
    assert store_files(str(sandbox.store)) == before  # nothing written, nothing run
    moved = finish(machine(sandbox, "vm-1", "worker", str(sweep), "--move-ledger", ledger=postgres_url))
    assert moved[0] == 0 and "now coordinated by the PostgreSQL ledger" in moved[1], moved
    each_run_once(sandbox, 3)  # only the new run started
    assert record.read().kind == "postgresql"
    # the flag again (a relaunch with the same command): nothing to move, nothing to run
    again = finish(machine(sandbox, "vm-2", "worker", str(sweep), "--move-ledger", ledger=postgres_url))
    assert again[0] == 0 and "now coordinated" not in again[1] and "0 process(es) started" in again[1]
    # the laptop without SWEEPRUN_LEDGER is now the odd one out, and is told how to join
    late = finish(machine(sandbox, "laptop", "launch", str(sweep)))
    assert late[0] == 2 and "Give it the same ledger (--ledger or SWEEPRUN_LEDGER)" in late[2], late
    # and back again (e.g. the database is going away)
    back = finish(machine(sandbox, "laptop", "launch", str(sweep), "--move-ledger"))
    assert back[0] == 0 and record.read() == Coordination(STORE_LEASES), back
    each_run_once(sandbox, 3)


@pytest.mark.slow
def test_a_move_is_refused_while_a_run_is_held_under_store_leases(
        sandbox: Sandbox, postgres_url: str) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 400, "sleep": 0.05}, command=f"python {STEPS}")
    worker = machine(sandbox, "vm-a", "worker", str(sweep))
    try:
        wait_for(lambda: any(e["event"] == "start" for e in sandbox.events()), what="the run")
        refused = finish(machine(sandbox, "vm-b", "worker", str(sweep), "--move-ledger", ledger=postgres_url))
        assert refused[0] == 2 and "is still held by vm-a:" in refused[2], refused
    finally:
        worker.kill()
        worker.wait()
    each_run_once(sandbox, 1)


@pytest.mark.slow
def test_a_worker_whose_sweep_was_moved_away_saves_its_runs_and_exits(
        sandbox: Sandbox, postgres_url: str) -> None:
    """Moved from a shared ledger, whose holders no other ledger can see: its workers, still
    running, see the move at their next look at the store and drain, as after `sweeprun stop`."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 400, "sleep": 0.05}, command=f"python {STEPS}")
    worker = machine(sandbox, "vm-a", "worker", str(sweep), ledger=postgres_url, SWEEPRUN_STOP_POLL_S="0.2")
    wait_for(lambda: any(e["event"] == "start" for e in sandbox.events()), what="the run")
    record = CoordinationRecord(SweepPaths(fsspec.filesystem("file"), str(sandbox.store / "t")))
    assert record.join(Coordination(STORE_LEASES), "t", move=True)
    code, out, err = finish(worker)
    assert code == 75 and "the sweep was moved to leases in the store" in out, out + err
    assert [e["event"] for e in sandbox.events()] == ["start", "preempted"]


def test_two_first_launchers_at_once_agree_on_one_record(tmp_path: Path) -> None:
    record = CoordinationRecord(SweepPaths(fsspec.filesystem("file"), str(tmp_path / "t")))
    (tmp_path / "t").mkdir()
    ways = [Coordination(STORE_LEASES), Coordination("postgresql", "ab" * 16, "db:5432/sweeps")] * 4
    start = threading.Barrier(len(ways))
    outcome: list[str] = []

    def launch(way: Coordination) -> None:
        start.wait()
        try:
            record.join(way, "t")
            outcome.append(way.kind)
        except LedgerError:
            outcome.append("refused")

    threads = [threading.Thread(target=launch, args=(way,)) for way in ways]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = record.read()
    assert kept is not None and Counter(outcome) == {kept.kind: 4, "refused": 4}


def test_on_a_late_folder_a_record_replaced_while_settling_refuses_its_creator(tmp_path: Path) -> None:
    """Drive: two machines' creates of one name can both succeed and one replaces the other
    when they sync. The creator reads its record again after the settle delay."""
    (tmp_path / "t").mkdir()
    record = CoordinationRecord(SweepPaths(fsspec.filesystem("file"), str(tmp_path / "t")))
    other = Coordination("postgresql", "cd" * 16, "db:5432/sweeps")
    replaced = lambda _s: (tmp_path / "t" / "COORDINATION").write_bytes(other.to_bytes())  # noqa: E731
    with pytest.raises(LedgerError, match="coordinated by the PostgreSQL ledger db:5432/sweeps"):
        record.join(Coordination(STORE_LEASES), "t", settle_s=5, sleep=replaced)
    assert record.join(other, "t", settle_s=5, sleep=replaced) is None


def test_a_stray_record_is_one_line_and_the_flag_replaces_it(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "COORDINATION").write_text("hello")
    record = CoordinationRecord(SweepPaths(fsspec.filesystem("file"), str(tmp_path / "t")))
    with pytest.raises(Exception, match="not a coordination record written by sweeprun.*--move-ledger"):
        record.join(Coordination(STORE_LEASES), "t")
    assert record.join(Coordination(STORE_LEASES), "t", move=True)
    assert record.read() == Coordination(STORE_LEASES)
