"""The ledger contract on a real PostgreSQL server, plus what only a shared server can get wrong:
many processes and machines at once, many sweeps in one database, bad URLs, a network that drops
and a server that restarts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sweeprun.errors import LedgerError
from sweeprun.ledger import Outcome, Policy, RunState, open_ledger
from sweeprun.ledger.contract import GRID, ME, OTHER_HOST, POLICY, RUNS, FakeClock, LedgerContract
from sweeprun.ledger.postgres import PostgresLedger
from sweeprun.resumes import Resume
from sweeprun.settings import SettingError
from sweeprun.spec import load_spec
from sweeprun.sweep import Sweep

from conftest import REPO, Sandbox
from servers import PostgresServer, TcpProxy


class TestPostgresLedger(LedgerContract):
    """The contract on a shared server: the exactly-once race with 16 processes for 1,000 runs."""

    claimers = 16
    many_runs = 1000

    @pytest.fixture
    def location(self, postgres_url: str) -> str:
        return postgres_url


def with_port(url: str, port: int, **query: str) -> str:
    """``url`` pointed at another port on the same host (a proxy, or nothing at all)."""
    head, _, tail = url.rpartition("@")
    host, _, rest = tail.partition(":")
    database = rest.split("/", 1)[1]
    params = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{head}@{host}:{port}/{database}" + (f"?{params}" if params else "")


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``fn`` in a thread; the dict gets its ``result`` or its ``error``."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def sweeprun_cli(sandbox: Sandbox, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m sweeprun ARGS`` as a real process, with only the ledger the test names."""
    return subprocess.run([sys.executable, "-m", "sweeprun", *args], env=sandbox.env(**(env or {})),
                          cwd=sandbox.root, text=True, capture_output=True, timeout=timeout)


# -- many sweeps in one database ---------------------------------------------------------------

READER = """
import json, sys
from sweeprun.ledger import open_ledger
led = open_ledger(sys.argv[1], sys.argv[2], readonly=True)
print(json.dumps([[r.run_id, r.state.value, r.worker] for r in led.rows()]))
"""


def test_two_sweeps_share_a_database_and_status_reads_it_from_another_machine(
        postgres_url: str) -> None:
    # the same run ids in two sweeps: the sweep column keeps them apart
    a, b = open_ledger(postgres_url, "sweep-a"), open_ledger(postgres_url, "sweep-b")
    try:
        a.sync(RUNS, set(), set())
        b.sync(RUNS, done={RUNS[0].run_id}, started=set())
        taken = [c for _ in RUNS if (c := a.claim(OTHER_HOST, POLICY, 600, GRID))]
        assert len(taken) == len(RUNS) and a.claim(ME, POLICY, 600, GRID) is None
        assert [r.state for r in b.rows()] == [RunState.DONE] + [RunState.PENDING] * 5
        assert b.claim(ME, POLICY, 600, GRID).run_id == RUNS[1].run_id
    finally:
        a.close()
        b.close()
    # `sweeprun status` on a fresh machine: another host name, its own process, read-only
    reader = subprocess.run([sys.executable, "-c", READER, postgres_url, "sweep-a"], cwd=REPO,
                            env={"SWEEPRUN_HOST": "fresh-machine", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(reader.stdout)
    assert [run_id for run_id, _, _ in seen] == [r.run_id for r in RUNS]
    assert {(state, worker) for _, state, worker in seen} == {("running", OTHER_HOST.label)}


def tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "ORDER BY 1")]


def test_reading_a_database_without_a_ledger_shows_no_rows_and_creates_nothing(
        postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE experiments (id serial PRIMARY KEY, name text)")
    reader = open_ledger(postgres_url, "sweep", readonly=True)
    assert reader.rows() == [] and reader.settled(POLICY)
    with pytest.raises(LedgerError, match="read-only"):
        reader.sync(RUNS, set(), set())
    reader.close()
    assert tables(postgres_url) == ["experiments"]
    open_ledger(postgres_url, "sweep").close()  # a launcher creates its tables beside the app's
    assert tables(postgres_url) == ["experiments", "sweeprun_attempts", "sweeprun_members",
                                    "sweeprun_meta", "sweeprun_runs"]


def test_many_launchers_creating_the_schema_at_once_do_not_collide(postgres_url: str) -> None:
    threads = [run_in_thread(lambda: open_ledger(postgres_url, "sweep").close()) for _ in range(8)]
    for thread, out in threads:
        thread.join(60)
        assert "error" not in out, out.get("error")


# -- bad input: one line, exit 2, no password -------------------------------------------------

def dump(url: str) -> list[tuple[Any, ...]]:
    """Everything sweeprun's tables hold, to prove that nothing changed."""
    with psycopg.connect(url) as conn:
        return [(t, conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()) for t in tables(url)]


def test_a_ledger_from_a_newer_sweeprun_is_refused_untouched(postgres_url: str) -> None:
    led = open_ledger(postgres_url, "sweep")
    led.sync(RUNS, set(), set())
    led.close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE sweeprun_meta SET value = '99' WHERE key = 'schema_version'")
    before = dump(postgres_url)
    for readonly in (False, True):
        with pytest.raises(LedgerError, match="newer sweeprun.*schema 99.*upgrade sweeprun"):
            open_ledger(postgres_url, "sweep", readonly=readonly)
    assert dump(postgres_url) == before


@pytest.fixture(scope="module")
def password_user(postgres_server: PostgresServer) -> Iterator[tuple[str, str, str]]:
    """A role that must give its password (the session server trusts everyone else), and a
    database of its own: ``(user, password, database)``."""
    hba = postgres_server.data / "pg_hba.conf"
    original = hba.read_text()
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS sweeprun_pw")
        conn.execute("CREATE ROLE sweeprun_pw LOGIN PASSWORD 'right-horse-battery'")
        conn.execute("CREATE DATABASE sweeprun_pw OWNER sweeprun_pw")
        hba.write_text("host all sweeprun_pw 127.0.0.1/32 scram-sha-256\n" + original)
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield "sweeprun_pw", "right-horse-battery", "sweeprun_pw"
    finally:
        hba.write_text(original)
        with psycopg.connect(postgres_server.url, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("DROP DATABASE sweeprun_pw WITH (FORCE)")
            conn.execute("DROP ROLE sweeprun_pw")


def bad_urls(server: PostgresServer, user: str) -> dict[str, str]:
    base = f"127.0.0.1:{server.port}"
    return {
        "wrong port": f"postgresql://{user}:wrong-secret-1@127.0.0.1:1/postgres",
        "wrong database": f"postgresql://{user}:wrong-secret-2@{base}/no_such_db",
        "wrong password": f"postgresql://{user}:wrong-secret-3@{base}/{user}",
        "unknown option": f"postgres://{user}:wrong-secret-4@{base}/postgres?colour=blue",
    }


def test_a_wrong_url_is_a_one_line_error_without_the_password(
        postgres_server: PostgresServer, password_user: tuple[str, str, str]) -> None:
    user, password, database = password_user
    good = open_ledger(f"postgresql://{user}:{password}@127.0.0.1:{postgres_server.port}/{database}",
                       "sweep-pw")  # the right password gets in
    good.close()
    for what, url in bad_urls(postgres_server, user).items():
        with pytest.raises(LedgerError) as caught:
            open_ledger(url, "sweep")
        message = str(caught.value)
        assert "wrong-secret" not in message and "\n" not in message, (what, message)
        assert "ledger postgres" in message and "://***@127.0.0.1:" in message, (what, message)


@pytest.mark.slow  # a dozen CLI starts; the test above checks the same messages in process
def test_the_cli_refuses_a_wrong_ledger_url_with_exit_2(
        sandbox: Sandbox, postgres_server: PostgresServer, password_user: tuple[str, str, str]) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 1})
    for what, url in bad_urls(postgres_server, password_user[0]).items():
        for command in ("status", "launch"):
            result = sweeprun_cli(sandbox, command, str(sweep), "--ledger", url)
            assert result.returncode == 2, (what, command, result.stderr)
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            assert "wrong-secret" not in result.stderr + result.stdout
            assert "ledger postgres" in result.stderr
        # the same URL from SWEEPRUN_LEDGER (how a notebook keeps it out of the sweep file)
        result = sweeprun_cli(sandbox, "launch", str(sweep), env={"SWEEPRUN_LEDGER": url})
        assert result.returncode == 2 and "wrong-secret" not in result.stderr, result.stderr
    assert not list((sandbox.store / "t" / "runs").glob("*/DONE"))


def test_a_missing_psycopg_names_the_pip_install(sandbox: Sandbox, postgres_url: str) -> None:
    code = ("import sys; sys.modules['psycopg'] = None\n"
            "from sweeprun.ledger import open_ledger\n"
            f"open_ledger({postgres_url!r}, 'sweep')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert "the PostgreSQL ledger needs psycopg: pip install 'sweeprun[postgres]'" in result.stderr


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan"])
def test_a_garbage_ledger_wait_is_a_clear_error(postgres_url: str, monkeypatch: pytest.MonkeyPatch,
                                                value: str) -> None:
    monkeypatch.setenv("SWEEPRUN_LEDGER_WAIT_S", value)
    with pytest.raises(SettingError, match="SWEEPRUN_LEDGER_WAIT_S=.*between 0 and 86400"):
        open_ledger(postgres_url, "sweep")


# -- a lost connection -----------------------------------------------------------------------

@pytest.fixture
def proxy(postgres_server: PostgresServer) -> Iterator[TcpProxy]:
    p = TcpProxy(postgres_server.port)
    yield p
    p.close()


@pytest.fixture
def proxied(postgres_url: str, proxy: TcpProxy) -> Iterator[PostgresLedger]:
    """A ledger whose connections go through ``proxy``, with its runs synced."""
    led = open_ledger(with_port(postgres_url, proxy.port, connect_timeout="2"), "sweep")
    assert isinstance(led, PostgresLedger)
    led.sync(RUNS, set(), set())
    yield led
    led.close()


def test_a_cut_network_fails_a_heartbeat_at_once_and_it_works_again_after(
        proxied: PostgresLedger, proxy: TcpProxy) -> None:
    claim = proxied.claim(ME, POLICY, 600, GRID)
    assert claim is not None
    proxy.cut()
    with pytest.raises(LedgerError, match="renewing a lease failed.*could not be reached") as caught:
        proxied.heartbeat(claim, 600)
    assert "\n" not in str(caught.value)
    proxy.restore()
    assert proxied.heartbeat(claim, 600) is True


def test_a_frozen_network_fails_a_heartbeat_instead_of_hanging(
        proxied: PostgresLedger, proxy: TcpProxy) -> None:
    # Packets are taken and never answered: only the ledger's own deadline ends the call.
    # (15 s by default; shortened here to keep the test quick. It asserts that the call
    # returns at all, never how fast.)
    proxied.call_timeout_s = 3
    claim = proxied.claim(ME, POLICY, 600, GRID)
    assert claim is not None
    proxy.freeze()
    thread, out = run_in_thread(lambda: proxied.heartbeat(claim, 600))
    thread.join(120)
    assert not thread.is_alive(), "a heartbeat hung on a frozen network"
    assert isinstance(out.get("error"), LedgerError)
    proxy.restore()
    assert proxied.heartbeat(claim, 600) is True


def test_a_claim_during_a_cut_waits_and_gets_through_after_it(
        proxied: PostgresLedger, proxy: TcpProxy) -> None:
    proxy.cut()
    thread, out = run_in_thread(lambda: proxied.claim(ME, POLICY, 600, GRID))
    thread.join(1.5)  # it is still trying: a launcher waits out an outage
    assert thread.is_alive() and not out
    proxy.restore()
    thread.join(120)
    assert "error" not in out, out.get("error")
    assert out["result"].run_id == RUNS[0].run_id and out["result"].attempt == 1


def test_an_outage_longer_than_the_wait_is_a_clear_error(
        proxied: PostgresLedger, proxy: TcpProxy) -> None:
    proxied.wait_s = 1
    proxy.cut()
    with pytest.raises(LedgerError, match="claiming a run failed.*could not be reached within 1 s"):
        proxied.claim(ME, POLICY, 600, GRID)


def test_a_server_restart_is_waited_out(postgres_server: PostgresServer, postgres_url: str) -> None:
    led = open_ledger(postgres_url, "sweep")
    try:
        led.sync(RUNS, set(), set())
        held = led.claim(ME, POLICY, 600, GRID)
        assert held is not None
        postgres_server.stop()
        try:
            with pytest.raises(LedgerError, match="renewing a lease"):
                led.heartbeat(held, 600)
            thread, out = run_in_thread(lambda: led.claim(ME, POLICY, 600, GRID))
            finish_thread, finished = run_in_thread(lambda: led.finish(held, Outcome.DONE, POLICY))
        finally:
            postgres_server.start()
        thread.join(120)
        finish_thread.join(120)
        assert "error" not in out and "error" not in finished, (out, finished)
        assert out["result"].run_id == RUNS[1].run_id
        assert finished["result"] is RunState.DONE
        assert led.heartbeat(out["result"], 600) is True
    finally:
        led.close()


# -- a commit whose reply was lost ---------------------------------------------------------------

def lose_the_first_reply(led: PostgresLedger) -> None:
    """Every call's first try commits, then its connection drops before the answer arrives."""
    real = led._run

    def run(what: str, fn: Callable[..., Any], **kw: Any) -> Any:
        lost: list[bool] = []

        def flaky(conn: psycopg.Connection[Any], retry: bool) -> Any:
            result = fn(conn, retry)
            if not lost:
                lost.append(True)
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return result

        return real(what, flaky, **kw)

    led._run = run  # type: ignore[method-assign]


def test_calls_retried_after_a_lost_reply_count_once(postgres_url: str) -> None:
    clock = FakeClock()
    led = open_ledger(postgres_url, "sweep", clock=clock)
    assert isinstance(led, PostgresLedger)
    policy = Policy(max_attempts=3, max_lost=3)
    try:
        led.sync(RUNS, set(), set())
        dead = led.claim(OTHER_HOST, policy, 60, GRID)
        assert dead is not None
        clock.advance(120)  # its holder vanished: the next claim takes it over
        lose_the_first_reply(led)
        claim = led.claim(ME, policy, 60, GRID)
        # the retry found the claim it had committed: no second run taken, no phantom holder
        assert claim and claim.run_id == dead.run_id and claim.attempt == 2 and claim.took_over
        assert [r.state for r in led.rows()].count(RunState.RUNNING) == 1
        moved = led.renumber(claim, 5)
        assert moved and moved.attempt == 5
        assert led.start(moved, 60, None, policy) is RunState.RUNNING
        assert led.rows()[0].lost == 1  # one loss, counted once
        assert led.finish(moved, Outcome.FAILED, policy) is RunState.PENDING
        row = led.rows()[0]
        assert (row.state, row.failures, row.attempts) == (RunState.PENDING, 1, 5)
    finally:
        led.close()


# -- end to end ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_sweep_launched_on_postgresql_finishes_and_a_relaunch_starts_nothing(
        sandbox: Sandbox, postgres_url: str) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2, 3], "b": ["x", "y"]}, {"steps": 3, "sleep": 0.02})
    first = sweeprun_cli(sandbox, "launch", str(sweep), "--ledger", postgres_url, "--workers", "3")
    assert first.returncode == 0, first.stderr
    events = sandbox.events()
    starts = Counter(e["run"] for e in events if e["event"] == "start")
    assert len(starts) == 6 and set(starts.values()) == {1}
    assert not [e for e in events if e["event"] == "overlap"]
    # from "another machine", with the URL in the environment instead of on the command line
    env = {"SWEEPRUN_LEDGER": postgres_url, "SWEEPRUN_HOST": "second-machine"}
    again = sweeprun_cli(sandbox, "launch", str(sweep), env=env)
    assert again.returncode == 0, again.stderr
    assert sandbox.events() == events  # nothing started again
    status = sweeprun_cli(sandbox, "status", str(sweep), "--json", env=env)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert len(rows) == 6 and {(r["state"], r["attempts"]) for r in rows} == {("done", 1)}
    led = open_ledger(postgres_url, Sweep(load_spec(sweep)).ledger_key(), readonly=True)
    assert {r.state for r in led.rows()} == {RunState.DONE}
    led.close()


def test_the_store_never_keeps_the_ledger_password(sandbox: Sandbox, postgres_server: PostgresServer,
                                                   password_user: tuple[str, str, str]) -> None:
    user, password, database = password_user
    url = f"postgresql://{user}:{password}@127.0.0.1:{postgres_server.port}/{database}"
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1, "sleep": 0}, ledger=url)
    result = sweeprun_cli(sandbox, "launch", str(sweep))
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr
    stored = [p for p in Path(sandbox.store).rglob("*") if p.is_file()]
    assert stored and not [p for p in stored if password.encode() in p.read_bytes()]


def older_database(url: str, column: str) -> None:
    """The database with the runs, as a sweeprun from before ``column`` left it."""
    led = open_ledger(url, "sweep")
    led.sync(RUNS, set(), set())
    led.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE sweeprun_runs DROP COLUMN {column}")


def test_a_database_from_before_resets_were_honoured_gains_the_column(postgres_url: str) -> None:
    older_database(postgres_url, "reset")
    reader = open_ledger(postgres_url, "sweep", readonly=True)
    assert reader.honoured() == {} and len(reader.rows()) == len(RUNS)
    reader.close()
    led = open_ledger(postgres_url, "sweep")  # a newer sweeprun's first open adds it
    assert led.forget({RUNS[0].run_id: "t"}) == {RUNS[0].run_id}
    assert led.honoured() == {RUNS[0].run_id: "t"}
    led.close()


def test_a_database_from_before_resumes_were_recorded_gains_the_column(postgres_url: str) -> None:
    """Read-only (status) its runs tell of no resume; a newer sweeprun's first open adds the
    column, and a value edited by hand reads as no resume, never as an error."""
    older_database(postgres_url, "resumed")
    reader = open_ledger(postgres_url, "sweep", readonly=True)
    assert [r.resumed for r in reader.rows()] == [None] * len(RUNS)
    reader.close()
    led = open_ledger(postgres_url, "sweep")
    claim = led.claim(ME, POLICY, 60, GRID)
    assert claim and led.start(claim, 60, "ckpt-1", POLICY) is RunState.RUNNING
    resumed = Resume(claim.attempt, None, 8, saved_world_size=2, world_size=1, approximate=("rng",))
    assert led.finish(claim, Outcome.INTERRUPTED, POLICY, 75, resumed=resumed) is RunState.INTERRUPTED
    assert next(r.resumed for r in led.rows() if r.run_id == claim.run_id) == resumed
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE sweeprun_runs SET resumed = '{not json' WHERE run_id = %s", [claim.run_id])
    row = next(r for r in led.rows() if r.run_id == claim.run_id)
    assert (row.resumed, row.state) == (None, RunState.INTERRUPTED)
    led.close()


def test_a_role_that_does_not_own_an_old_ledger_is_told_what_its_owner_must_run(postgres_url: str) -> None:
    """Only a table's owner may add a column: a worker role granted another role's ledger
    meets that on the first open by a newer sweeprun, and is told the one statement to run."""
    led = open_ledger(postgres_url, "sweep")
    led.sync(RUNS, set(), set())
    led.close()
    role = "w_" + uuid.uuid4().hex[:8]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE sweeprun_runs DROP COLUMN reset")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    worker_url = postgres_url.replace("postgres@", f"{role}@", 1)
    with pytest.raises(LedgerError, match="have the owner of sweeprun_runs run `ALTER TABLE sweeprun_runs "
                                          "ADD COLUMN IF NOT EXISTS reset text` once"):
        open_ledger(worker_url, "sweep")
    reader = open_ledger(worker_url, "sweep", readonly=True)   # reading needs no new column
    assert len(reader.rows()) == len(RUNS)
    reader.close()
