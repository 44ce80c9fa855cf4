"""PostgreSQL ledger for workers on many machines: row locks with SKIP LOCKED, the server's clock."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from .. import settings
from ..errors import LedgerError
from ..faults import crash_point
from ..identity import RunSpec
from ..procs import HOST, ProcessRef
from ..redact import redact
from .base import (
    _ATTEMPT_COLUMNS,
    _UPTIME_SQL,
    AttemptRow,
    Claim,
    Ledger,
    Outcome,
    Policy,
    RunRow,
    RunState,
    Uptime,
    Verdict,
    check_lease,
    decode_row,
    grid_key,
    judge,
    orphan_of,
    with_attempt,
)

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

#: How long a launcher keeps retrying a ledger call while the database is unreachable,
#: after the ledger was opened once (a restarted server, a notebook's dropped network).
WAIT_ENV = settings.LEDGER_WAIT_S.name

#: Version 1: the first PostgreSQL schema.
SCHEMA_VERSION = 1
#: ``pg_advisory_xact_lock`` key for creating the schema ("sweeprun" as a number):
#: launchers starting at once would otherwise collide in ``CREATE TABLE IF NOT EXISTS``.
SCHEMA_LOCK = 0x7377656570_72756E % (1 << 62)

#: Connection settings applied unless the URL sets them. A silently dead network (no RST,
#: packets dropped) must fail a call in seconds, not after the kernel's 15 minutes of
#: retransmissions: keepalives notice an idle connection, ``tcp_user_timeout`` one with
#: unacknowledged data.
CONNECT_DEFAULTS = {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "5",
                    "keepalives_interval": "2", "keepalives_count": "3",
                    "tcp_user_timeout": "10000", "application_name": "sweeprun"}
#: A call that has not returned after this long has its socket cut by the watchdog. The TCP
#: timeouts cannot see a peer that acknowledges packets and never answers (a stalled proxy
#: or load balancer in the path), and libpq has no client-side query timeout.
CALL_TIMEOUT_S = 15.0
HEARTBEAT_TIMEOUT_S = 10.0  # one row; the runner's lease clock is ticking meanwhile
SYNC_TIMEOUT_S = 120.0  # sync writes a whole grid at once

_COLUMNS = ("run_id", "idx", "params", "state", "attempts", "failures", "lost", "progress", "worker",
            "worker_start", "child_pid", "child_start", "lease_until", "heartbeat_at", "last_exit",
            "updated_at")
_R_COLUMNS = ", ".join(f"r.{c}" for c in _COLUMNS)

#: The ledger's time in SQL: the test's clock when one was set on the instance, else the server's.
_NOW = "COALESCE(%(now)s::float8, extract(epoch from clock_timestamp())::float8)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeprun_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS sweeprun_runs (
    sweep text NOT NULL, run_id text NOT NULL, idx integer NOT NULL DEFAULT 0,
    params text NOT NULL, state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0, failures integer NOT NULL DEFAULT 0,
    lost integer NOT NULL DEFAULT 0, progress text,
    worker text, worker_start bigint, child_pid bigint, child_start bigint,
    lease_until double precision, heartbeat_at double precision, last_exit integer,
    updated_at double precision NOT NULL,
    claim_token text,
    PRIMARY KEY (sweep, run_id));
ALTER TABLE sweeprun_runs ADD COLUMN IF NOT EXISTS reset text;
CREATE INDEX IF NOT EXISTS sweeprun_runs_claim ON sweeprun_runs (sweep, (state <> 'interrupted'), idx)
    WHERE state <> 'done';
CREATE TABLE IF NOT EXISTS sweeprun_members (
    sweep text NOT NULL, grid text NOT NULL, run_id text NOT NULL, idx integer NOT NULL,
    PRIMARY KEY (sweep, grid, run_id));
CREATE INDEX IF NOT EXISTS sweeprun_members_order ON sweeprun_members (sweep, grid, idx);
CREATE TABLE IF NOT EXISTS sweeprun_attempts (
    sweep text NOT NULL, run_id text NOT NULL, attempt integer NOT NULL, worker text,
    started_at double precision, ran_at double precision, ended_at double precision,
    outcome text, exit_code integer, result text,
    PRIMARY KEY (sweep, run_id, attempt));
"""
#: ``reset``, the last reset a run honoured (:meth:`PostgresLedger.forget`), came after schema 1
#: without a new version: a nullable column an older sweeprun never reads. Added once, to
#: databases created before it, under the schema lock.
_RESET_COLUMN = "ALTER TABLE sweeprun_runs ADD COLUMN IF NOT EXISTS reset text"
_HAS_RESET = ("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('sweeprun_runs') "
              "AND attname = 'reset' AND NOT attisdropped")


def wait_from_env() -> float:
    return settings.LEDGER_WAIT_S.value()


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise LedgerError("the PostgreSQL ledger needs psycopg: pip install 'sweeprun[postgres]'") from None
    # psycopg warns on stderr about every pipeline it tears down on a lost connection; the
    # retries here already say what matters. A handler of its own keeps them off the user's
    # console unless the application configured logging itself.
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    return psycopg


def _one_line(exc: BaseException) -> str:
    return redact(" ".join(str(exc).split()) or type(exc).__name__)


def _like_prefix(text: str) -> str:
    """``text`` as a literal LIKE prefix (a host name may hold ``_``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ":%"


class _Watchdog:
    """Cuts the socket of a call that overran its deadline, so the caller gets an error.

    ``shutdown`` (not ``close``) on a duplicate of the descriptor: libpq sees the
    connection end and fails the call in its own thread, and no descriptor is freed
    under it. Cutting happens under the lock that the call's exit also takes, so a
    connection is never cut after its call returned (its descriptor may be reused).
    """

    def __init__(self) -> None:
        self._due: dict[object, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, fd: int, seconds: float) -> Iterator[None]:
        key = object()
        with self._lock:
            self._due[key] = (time.monotonic() + seconds, fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sweeprun-ledger-watchdog",
                                                daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._due.pop(key, None)

    def _loop(self) -> None:
        while not self._wake.wait(0.5):
            now = time.monotonic()
            with self._lock:
                for key, (deadline, fd) in list(self._due.items()):
                    if deadline <= now:
                        del self._due[key]
                        _cut(fd)

    def stop(self) -> None:
        self._wake.set()


def _cut(fd: int) -> None:
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


class PostgresLedger(Ledger):
    """A ledger many machines share; many sweeps share one database (tables ``sweeprun_*``)."""

    def __init__(self, url: str, sweep: str, *, readonly: bool = False,
                 wait_s: float | None = None) -> None:
        self._pg = _psycopg()
        self.url = url
        self.shown = redact(url)
        self.sweep = sweep
        self.readonly = readonly
        self.wait_s = wait_s if wait_s is not None else wait_from_env()
        self.call_timeout_s = CALL_TIMEOUT_S
        self._local = threading.local()
        self._given_up = threading.Event()
        self._conns: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._watchdog = _Watchdog()
        self._local_worker = _like_prefix(HOST)
        try:
            given = self._pg.conninfo.conninfo_to_dict(url)
        except self._pg.Error as exc:
            raise LedgerError(f"ledger {self.shown} is not a usable PostgreSQL URL ({_one_line(exc)}); "
                              "give --ledger postgresql://user@host:port/database") from None
        self._connect_args = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        self._tables = True
        self._open()

    # -- opening --------------------------------------------------------------------------

    def _open(self) -> None:
        """The first connection fails fast: a wrong host, port, database or password is bad
        input, not an outage to wait out. The schema is checked before anything is written."""
        try:
            conn = self._conn()
        except self._pg.Error as exc:
            raise LedgerError(f"cannot open the ledger {self.shown}: {_one_line(exc)}; check the "
                              "host, port, database and password (PGPASSWORD or ~/.pgpass)") from None
        adding = False  # the reset column, to a ledger an older sweeprun created
        try:
            with self._watchdog.watch(conn.pgconn.socket, self.call_timeout_s):
                version = self._version(conn)
                if version is None and self.readonly:
                    self._tables = False  # nothing of ours here yet: no rows, nothing created
                elif version != SCHEMA_VERSION and not self.readonly:
                    with conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK])
                        self._version(conn)  # another launcher may have created it meanwhile
                        conn.execute(_SCHEMA)
                        conn.execute("INSERT INTO sweeprun_meta (key, value) VALUES "
                                     "('schema_version', %s) ON CONFLICT (key) DO UPDATE SET value "
                                     "= EXCLUDED.value", [str(SCHEMA_VERSION)])
                elif not self.readonly and conn.execute(_HAS_RESET).fetchone() is None:
                    adding = True
                    with conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK])
                        conn.execute(_RESET_COLUMN)
        except self._pg.Error as exc:
            self.close()
            hint = ""
            if isinstance(exc, self._pg.errors.InsufficientPrivilege):
                # Only the owner of a table may add a column to it: a role granted the rows of
                # a ledger another role created meets this on the first launch of a newer sweeprun.
                hint = (f"; this sweeprun needs one more column: have the owner of sweeprun_runs run "
                        f"`{_RESET_COLUMN}` once" if adding else
                        "; let the user create tables in the database (GRANT CREATE ON SCHEMA "
                        "public) or give --ledger a database it owns")
            raise LedgerError(f"cannot open the ledger {self.shown}: {_one_line(exc)}{hint}") from None
        except BaseException:
            self.close()
            raise

    def _version(self, conn: psycopg.Connection[Any]) -> int | None:
        """The schema version written there, ``None`` when none; refuses a newer one."""
        if conn.execute("SELECT to_regclass('sweeprun_meta')").fetchone()[0] is None:
            return None
        found = conn.execute("SELECT value FROM sweeprun_meta WHERE key = 'schema_version'").fetchone()
        if found is None:
            return None
        try:
            number = int(found[0])
        except ValueError:
            raise LedgerError(f"ledger {self.shown} has an unreadable schema version {found[0]!r}; "
                              "give --ledger another database (the ledger is rebuilt from the store)"
                              ) from None
        if number > SCHEMA_VERSION:
            raise LedgerError(f"ledger {self.shown} was written by a newer sweeprun (schema {number}, "
                              f"this one knows up to {SCHEMA_VERSION}); upgrade sweeprun, or give "
                              "--ledger another database (the ledger is rebuilt from the store)")
        return number

    # -- connections and retries ----------------------------------------------------------

    def _conn(self) -> psycopg.Connection[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        conn = self._pg.connect(self.url, autocommit=True, **self._connect_args)
        if self.readonly:
            conn.execute("SET default_transaction_read_only = on")
        with self._lock:
            self._conns.append(conn)
        self._local.conn = conn
        return conn

    def _drop(self, conn: psycopg.Connection[Any] | None) -> None:
        if conn is None:
            return
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is gone anyway
            pass
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _run(self, what: str, fn: Callable[[psycopg.Connection[Any], bool], T], *,
             tries: int | None = None, timeout_s: float | None = None) -> T:
        """Call ``fn(conn, retry)`` until it gets through.

        A lost connection (server restarted, network gone) is retried with backoff for up
        to ``wait_s``, or ``tries`` more times; ``retry`` tells ``fn`` that an earlier try
        may have committed without us hearing it. Other database errors are not retried.
        """
        pg = self._pg
        deadline = time.monotonic() + self.wait_s
        delay = 0.2
        retry = False
        failures = 0
        while True:
            conn = None
            try:
                conn = self._conn()
                # Pipeline mode: BEGIN travels with the first query and the last writes with
                # COMMIT, so a claim or a finish costs two round trips instead of five or six.
                with self._watchdog.watch(conn.pgconn.socket, timeout_s or self.call_timeout_s), \
                        conn.pipeline():
                    return fn(conn, retry)
            except (pg.OperationalError, pg.InterfaceError) as exc:
                self._drop(conn)
                last = exc
            except pg.Error as exc:
                if conn is not None and conn.broken:
                    self._drop(conn)
                raise LedgerError(f"ledger {self.shown}: {what} failed: {_one_line(exc)}") from None
            failures += 1
            if self._given_up.is_set():
                raise LedgerError(f"ledger {self.shown}: {what} failed: the database could not be "
                                  f"reached ({_one_line(last)}) and sweeprun is stopping")
            left = deadline - time.monotonic()
            if (tries is not None and failures > tries) or (tries is None and left <= 0):
                waited = "" if tries is not None else f" within {self.wait_s:g} s"
                raise LedgerError(f"ledger {self.shown}: {what} failed: the database could not be "
                                  f"reached{waited} ({_one_line(last)}); check the server and the "
                                  "network, then run again")
            if tries is None:
                self._given_up.wait(min(delay * random.uniform(0.5, 1.0), max(left, 0)))
                delay = min(delay * 2, 5.0)
            retry = True

    def shared(self) -> tuple[str, str, str]:
        """The id is created once, in ``sweeprun_meta`` (an older sweeprun reads only its schema
        version there); ``where`` is the connection's own host, port and database."""
        self._writable()

        def tx(conn: psycopg.Connection[Any], _retry: bool) -> tuple[str, str, str]:
            conn.execute("INSERT INTO sweeprun_meta (key, value) VALUES ('ledger_id', %s) "
                         "ON CONFLICT (key) DO NOTHING", [uuid.uuid4().hex])
            ident = conn.execute("SELECT value FROM sweeprun_meta WHERE key = 'ledger_id'").fetchone()[0]
            info = conn.info
            return "postgresql", str(ident), f"{info.host}:{info.port}/{info.dbname}"

        return self._run("reading its id", tx)

    def stop_waiting(self) -> None:
        self._given_up.set()

    def _fake_now(self) -> float | None:
        """The clock set on this instance (tests move time with it), else ``None``: the server's."""
        clock = self.__dict__.get("clock")
        return clock() if clock is not None else None

    def _tx_now(self, conn: psycopg.Connection[Any]) -> float:
        fake = self._fake_now()
        if fake is not None:
            return fake
        return conn.execute("SELECT extract(epoch from clock_timestamp())::float8").fetchone()[0]

    def now(self) -> float:
        fake = self._fake_now()
        if fake is not None:
            return fake
        return self._run("reading the database's clock", lambda conn, _: self._tx_now(conn))

    def _key(self, **extra: Any) -> dict[str, Any]:
        return {"sweep": self.sweep, "now": self._fake_now(), **extra}

    # -- reading rows -----------------------------------------------------------------------

    def _row(self, r: tuple[Any, ...]) -> tuple[RunRow, dict[str, Any]]:
        return decode_row(r, self.shown, "give --ledger another database: it is rebuilt from "
                          "the store")

    # -- the contract -------------------------------------------------------------------

    def sync(self, runs: Iterable[RunSpec], done: set[str], started: set[str],
             still_done: Callable[[str], bool] | None = None) -> None:
        self._writable()
        runs = list(runs)
        key = grid_key(runs)
        gone: set[str] | None = None  # None: trust the listing
        if still_done is not None:
            # Ask the store outside the transaction (it may be slow: a bucket, a Drive),
            # only about runs the ledger has as done and the listing lacks. A run that
            # becomes done after this read is not in `gone`, so it is left alone below.
            ledger_done = set(self._run("reading done runs", lambda conn, _: [r[0] for r in conn.execute(
                "SELECT run_id FROM sweeprun_runs WHERE sweep = %s AND state = 'done'",
                [self.sweep])]))
            gone = {run.run_id for run in runs if run.run_id in ledger_done
                    and run.run_id not in done and not still_done(run.run_id)}
        ids = [run.run_id for run in runs]
        initial = [(RunState.DONE if r.run_id in done else
                    RunState.INTERRUPTED if r.run_id in started else RunState.PENDING).value for r in runs]
        mark_done = sorted(r for r in ids if r in done)
        reopen = sorted(r for r in ids if r not in done and (gone is None or r in gone))

        def tx(conn: psycopg.Connection[Any], _retry: bool) -> None:
            # Every step is conditional on what the row holds now, so a retry (or another
            # launcher syncing at the same time) converges on the same rows.
            with conn.transaction():
                now = self._tx_now(conn)
                conn.execute(
                    "INSERT INTO sweeprun_runs (sweep, run_id, idx, params, state, attempts, failures, "
                    "lost, updated_at) SELECT %(sweep)s, u.run_id, u.idx, u.params, u.state, 0, 0, 0, "
                    "%(now)s FROM unnest(%(ids)s::text[], %(idx)s::int[], %(params)s::text[], "
                    "%(states)s::text[]) AS u(run_id, idx, params, state) "
                    "ORDER BY u.run_id ON CONFLICT (sweep, run_id) DO NOTHING",
                    {"sweep": self.sweep, "now": now, "ids": ids, "idx": [r.index for r in runs],
                     "params": [json.dumps(r.params) for r in runs], "states": initial})
                # DONE in the store is the truth, even under a live lease: the holder's
                # finish is accepted for a done run, and no one will start it again.
                conn.execute(
                    "UPDATE sweeprun_runs SET state = 'done', worker = NULL, worker_start = NULL, "
                    "child_pid = NULL, child_start = NULL, lease_until = NULL, updated_at = %(now)s "
                    "WHERE sweep = %(sweep)s AND run_id = ANY(%(ids)s::text[]) AND state <> 'done'",
                    {"sweep": self.sweep, "now": now, "ids": mark_done})
                conn.execute(
                    "UPDATE sweeprun_runs SET state = CASE WHEN run_id = ANY(%(started)s::text[]) "
                    "THEN 'interrupted' ELSE 'pending' END, failures = 0, lost = 0, updated_at = %(now)s "
                    "WHERE sweep = %(sweep)s AND run_id = ANY(%(ids)s::text[]) AND state = 'done'",
                    {"sweep": self.sweep, "now": now, "ids": reopen,
                     "started": sorted(r for r in reopen if r in started)})
                known = conn.execute("SELECT 1 FROM sweeprun_members WHERE sweep = %s AND grid = %s "
                                     "LIMIT 1", [self.sweep, key]).fetchone()
                if known is None:
                    conn.execute(
                        "INSERT INTO sweeprun_members (sweep, grid, run_id, idx) SELECT %(sweep)s, "
                        "%(grid)s, u.run_id, u.idx FROM unnest(%(ids)s::text[], %(idx)s::int[]) "
                        "AS u(run_id, idx) ON CONFLICT DO NOTHING",
                        {"sweep": self.sweep, "grid": key, "ids": ids, "idx": [r.index for r in runs]})

        self._run("syncing with the store", tx, timeout_s=SYNC_TIMEOUT_S + len(runs) / 1000)

    def forget(self, resets: Mapping[str, str]) -> set[str]:
        self._writable()
        if not resets:
            return set()
        ids = sorted(resets)

        def tx(conn: psycopg.Connection[Any], _retry: bool) -> set[str]:
            with conn.transaction():
                now = self._tx_now(conn)
                # rows locked in one order: two launchers honouring the same resets never deadlock
                conn.execute("SELECT 1 FROM sweeprun_runs WHERE sweep = %s AND run_id = ANY(%s::text[]) "
                             "ORDER BY run_id FOR UPDATE", [self.sweep, ids])
                found = conn.execute(
                    "UPDATE sweeprun_runs r SET failures = 0, lost = 0, reset = u.token, "
                    "updated_at = %(now)s, state = CASE WHEN r.state = 'failed' THEN 'pending' "
                    "ELSE r.state END FROM unnest(%(ids)s::text[], %(tokens)s::text[]) AS u(run_id, token) "
                    "WHERE r.sweep = %(sweep)s AND r.run_id = u.run_id AND r.reset IS DISTINCT FROM u.token "
                    "RETURNING r.run_id",
                    {"sweep": self.sweep, "now": now, "ids": ids, "tokens": [resets[i] for i in ids]}
                ).fetchall()
                crash_point("ledger.in_forget")
            return {r[0] for r in found}

        return self._run("honouring resets", tx, timeout_s=SYNC_TIMEOUT_S + len(ids) / 1000)

    def honoured(self) -> dict[str, str]:
        if not self._tables:
            return {}

        def read(conn: psycopg.Connection[Any], _retry: bool) -> dict[str, str]:
            if conn.execute(_HAS_RESET).fetchone() is None:
                return {}  # a database from before resets were honoured, read-only
            return {r[0]: r[1] for r in conn.execute(
                "SELECT run_id, reset FROM sweeprun_runs WHERE sweep = %s AND reset IS NOT NULL",
                [self.sweep]).fetchall()}

        return self._run("reading the resets honoured", read, timeout_s=SYNC_TIMEOUT_S)

    def claim(self, worker: ProcessRef, policy: Policy, lease_s: float,
              grid: str | None = None, skip: Collection[str] = ()) -> Claim | None:
        check_lease(lease_s)
        self._writable()
        # A claim whose COMMIT went through but whose reply was lost would, retried blindly,
        # leave that run "running" under our name with no one running it (it would look
        # held by a live process of this host until the lease ran out, then count as a lost
        # attempt) and take a second run. So each claim carries a token written with it,
        # and a retry first looks for a run already claimed with that token.
        token = uuid.uuid4().hex

        def tx(conn: psycopg.Connection[Any], retry: bool) -> Claim | None:
            with conn.transaction():
                if retry:
                    found = self._claimed_with(conn, token, worker)
                    if found is not None:
                        return found
                return self._claim(conn, worker, policy, lease_s, grid, token, skip)

        return self._run("claiming a run", tx)

    def _claim(self, conn: psycopg.Connection[Any], worker: ProcessRef, policy: Policy,
               lease_s: float, grid: str | None, token: str,
               skip: Collection[str] = ()) -> Claim | None:
        # Walks sweeprun_runs_claim (the sweep's runs that are not done, interrupted first,
        # then by index), so a claim costs the same at the first run and the ten-thousandth;
        # a join ordered by the grid's own member index had to sort every open run of the
        # grid on every claim. Grid membership is a filter, and within one grid the order is
        # the run's index as first synced (the same unless a grid was edited since).
        # The SQL drops what is surely not runnable (done, exhausted, leased by a worker of
        # another host); judge() decides the rest, since a holder on this host is checked by
        # its pid and start time. SKIP LOCKED: rows another claim is looking at are passed over.
        # (a scalar subquery, not EXISTS: the planner would turn EXISTS into a join driven
        # by the members table, which walks the done runs too)
        member = ("" if grid is None else
                  "AND (SELECT true FROM sweeprun_members m WHERE m.sweep = r.sweep "
                  "AND m.grid = %(grid)s AND m.run_id = r.run_id) ")
        query = (f"WITH t AS (SELECT {_NOW} AS now) SELECT t.now, {_R_COLUMNS} "
                 "FROM t, sweeprun_runs r WHERE r.sweep = %(sweep)s AND r.state <> 'done' "
                 "AND r.failures < %(max_attempts)s AND r.lost < %(max_lost)s "
                 "AND NOT (r.state = 'running' AND COALESCE(r.lease_until, 0) > t.now "
                 "AND (r.worker IS NULL OR r.worker NOT LIKE %(local)s)) "
                 f"AND NOT (r.run_id = ANY(%(seen)s::text[])) {member}"
                 "ORDER BY (r.state <> 'interrupted'), r.idx "
                 "LIMIT %(limit)s FOR UPDATE OF r SKIP LOCKED")
        seen: list[str] = list(skip)
        limit = 4  # usually the first row; rows held by live workers of this host come back too
        while True:
            found = conn.execute(query, self._key(
                grid=grid, max_attempts=policy.max_attempts, max_lost=policy.max_lost,
                local=self._local_worker, seen=seen, limit=limit)).fetchall()
            for raw in found:
                now = raw[0]
                row, extra = self._row(raw[1:])
                if judge(row, now, policy) is Verdict.RUNNABLE:
                    return self._take(conn, row, extra, worker, lease_s, now, token)
                seen.append(row.run_id)
            if len(found) < limit:
                return None
            limit *= 4

    def _take(self, conn: psycopg.Connection[Any], row: RunRow, extra: dict[str, Any],
              worker: ProcessRef, lease_s: float, now: float, token: str) -> Claim:
        orphan, took_over = None, False
        if row.state is RunState.RUNNING:
            took_over = True
            orphan = orphan_of(row, extra)
            self._close_attempt(conn, row.run_id, row.attempts, "lost", None, now, None)
        attempt = row.attempts + 1
        conn.execute(
            "UPDATE sweeprun_runs SET state = 'running', attempts = %(attempt)s, worker = %(worker)s, "
            "worker_start = %(start)s, child_pid = NULL, child_start = NULL, "
            "lease_until = %(at)s + %(lease)s, heartbeat_at = %(at)s, updated_at = %(at)s, "
            "claim_token = %(token)s WHERE sweep = %(sweep)s AND run_id = %(run)s",
            {"attempt": attempt, "worker": worker.label, "start": worker.start, "at": now,
             "lease": lease_s, "token": token, "sweep": self.sweep, "run": row.run_id})
        conn.execute(
            "INSERT INTO sweeprun_attempts (sweep, run_id, attempt, worker, started_at) "
            "VALUES (%(sweep)s, %(run)s, %(attempt)s, %(worker)s, %(at)s) "
            "ON CONFLICT (sweep, run_id, attempt) DO UPDATE SET worker = EXCLUDED.worker, "
            "started_at = EXCLUDED.started_at, ran_at = NULL, ended_at = NULL, outcome = NULL, "
            "exit_code = NULL, result = NULL",
            {"sweep": self.sweep, "run": row.run_id, "attempt": attempt, "worker": worker.label,
             "at": now})
        crash_point("ledger.in_claim")
        return Claim(run_id=row.run_id, attempt=attempt, params=row.params, worker=worker,
                     orphan=orphan, took_over=took_over)

    def _claimed_with(self, conn: psycopg.Connection[Any], token: str,
                      worker: ProcessRef) -> Claim | None:
        """The claim an earlier try of this call committed, if it did. (Its orphan, if it
        found one, is not known any more: that needs both a lost reply and a dead holder.)"""
        found = conn.execute(
            f"SELECT {_R_COLUMNS} FROM sweeprun_runs r WHERE r.sweep = %s AND r.claim_token = %s "
            "AND r.state = 'running' AND r.worker = %s", [self.sweep, token, worker.label]).fetchone()
        if found is None:
            return None
        row, _ = self._row(found)
        before = conn.execute("SELECT outcome FROM sweeprun_attempts WHERE sweep = %s AND run_id = %s "
                              "AND attempt = %s", [self.sweep, row.run_id, row.attempts - 1]).fetchone()
        return Claim(run_id=row.run_id, attempt=row.attempts, params=row.params, worker=worker,
                     took_over=before is not None and before[0] == "lost")

    def release(self, claim: Claim) -> bool:
        self._writable()

        def tx(conn: psycopg.Connection[Any], retry: bool) -> bool:
            with conn.transaction():
                now = self._tx_now(conn)
                cur = conn.execute(
                    "UPDATE sweeprun_runs SET state = 'interrupted', attempts = attempts - 1, "
                    "worker = NULL, worker_start = NULL, child_pid = NULL, child_start = NULL, "
                    "lease_until = NULL, updated_at = %s WHERE sweep = %s AND run_id = %s AND "
                    "attempts = %s AND state = 'running' RETURNING 1",
                    [now, self.sweep, claim.run_id, claim.attempt])
                if cur.fetchone() is None:  # (pipeline mode: rowcount is not known yet)
                    return False
                conn.execute("DELETE FROM sweeprun_attempts WHERE sweep = %s AND run_id = %s AND "
                             "attempt = %s", [self.sweep, claim.run_id, claim.attempt])
                return True

        return self._run("giving a claim back", tx)

    def renumber(self, claim: Claim, at_least: int) -> Claim | None:
        if at_least <= claim.attempt:
            return claim
        self._writable()

        def tx(conn: psycopg.Connection[Any], retry: bool) -> bool:
            with conn.transaction():
                now = self._tx_now(conn)
                cur = conn.execute(
                    "UPDATE sweeprun_runs SET attempts = %s, updated_at = %s WHERE sweep = %s AND "
                    "run_id = %s AND attempts = %s AND state = 'running' RETURNING 1",
                    [at_least, now, self.sweep, claim.run_id, claim.attempt])
                if cur.fetchone() is None:
                    # retried after a commit we did not hear of: the row already says so
                    return retry and conn.execute(
                        "SELECT 1 FROM sweeprun_runs WHERE sweep = %s AND run_id = %s AND "
                        "attempts = %s AND state = 'running' AND worker = %s AND "
                        "worker_start IS NOT DISTINCT FROM %s",
                        [self.sweep, claim.run_id, at_least, claim.worker.label,
                         claim.worker.start]).fetchone() is not None
                conn.execute("UPDATE sweeprun_attempts SET attempt = %s WHERE sweep = %s AND "
                             "run_id = %s AND attempt = %s",
                             [at_least, self.sweep, claim.run_id, claim.attempt])
                return True

        return with_attempt(claim, at_least) if self._run("renumbering an attempt", tx) else None

    def start(self, claim: Claim, lease_s: float, progress: str | None,
              policy: Policy) -> RunState | None:
        check_lease(lease_s)
        self._writable()

        def tx(conn: psycopg.Connection[Any], retry: bool) -> RunState | None:
            with conn.transaction():
                now = self._tx_now(conn)
                found = conn.execute(
                    "SELECT attempts, state, lost, progress FROM sweeprun_runs WHERE sweep = %s AND "
                    "run_id = %s FOR UPDATE", [self.sweep, claim.run_id]).fetchone()
                if found is None or found[0] != claim.attempt:
                    return None
                if retry:
                    # An earlier try may have committed: counting the loss again would be wrong.
                    mark = conn.execute(
                        "SELECT ran_at, outcome FROM sweeprun_attempts WHERE sweep = %s AND "
                        "run_id = %s AND attempt = %s",
                        [self.sweep, claim.run_id, claim.attempt]).fetchone()
                    if mark is not None and mark[1] == "lost-limit" and found[1] == RunState.FAILED.value:
                        return RunState.FAILED
                    if mark is not None and mark[0] is not None and found[1] == RunState.RUNNING.value:
                        self._renew(conn, claim, lease_s, now)
                        return RunState.RUNNING
                if found[1] != RunState.RUNNING.value:
                    return None
                lost = found[2] or 0
                if claim.took_over:
                    lost = lost + 1 if progress == found[3] else 0
                else:
                    lost = 0
                if lost >= policy.max_lost:
                    conn.execute(
                        "UPDATE sweeprun_runs SET state = 'failed', lost = %s, progress = %s, "
                        "worker = NULL, worker_start = NULL, lease_until = NULL, updated_at = %s "
                        "WHERE sweep = %s AND run_id = %s",
                        [lost, progress, now, self.sweep, claim.run_id])
                    self._close_attempt(conn, claim.run_id, claim.attempt, "lost-limit", None, now,
                                        RunState.FAILED)
                    return RunState.FAILED
                conn.execute("UPDATE sweeprun_runs SET lost = %s, progress = %s WHERE sweep = %s AND "
                             "run_id = %s", [lost, progress, self.sweep, claim.run_id])
                self._renew(conn, claim, lease_s, now)
                conn.execute("UPDATE sweeprun_attempts SET ran_at = %s WHERE sweep = %s AND "
                             "run_id = %s AND attempt = %s",
                             [now, self.sweep, claim.run_id, claim.attempt])
                return RunState.RUNNING

        return self._run("starting a run", tx)

    def _renew(self, conn: psycopg.Connection[Any], claim: Claim, lease_s: float, now: float) -> None:
        conn.execute("UPDATE sweeprun_runs SET lease_until = %s, heartbeat_at = %s, updated_at = %s "
                     "WHERE sweep = %s AND run_id = %s",
                     [now + lease_s, now, now, self.sweep, claim.run_id])

    def heartbeat(self, claim: Claim, lease_s: float, child: ProcessRef | None = None) -> bool:
        self._writable()
        values = self._key(lease=lease_s, run=claim.run_id, attempt=claim.attempt)
        child_sql = ""
        if child is not None:
            child_sql = ", child_pid = %(child_pid)s, child_start = %(child_start)s"
            values.update(child_pid=child.pid, child_start=child.start)
        query = (f"UPDATE sweeprun_runs SET lease_until = t.now + %(lease)s, heartbeat_at = t.now"
                 f"{child_sql} FROM (SELECT {_NOW} AS now) t WHERE sweep = %(sweep)s AND "
                 "run_id = %(run)s AND attempts = %(attempt)s AND state = 'running' RETURNING 1")

        def tx(conn: psycopg.Connection[Any], _retry: bool) -> bool:
            with conn.transaction():
                renewed = conn.execute(query, values).fetchone() is not None
                crash_point("ledger.in_heartbeat")
                return renewed

        # One reconnect, no long wait: the runner counts the silence by its own clock and
        # stops its children before the lease can run out.
        return self._run("renewing a lease", tx, tries=1,
                         timeout_s=min(HEARTBEAT_TIMEOUT_S, self.call_timeout_s))

    def finish(self, claim: Claim, outcome: Outcome, policy: Policy,
               exit_code: int | None = None) -> RunState | None:
        self._writable()

        def tx(conn: psycopg.Connection[Any], retry: bool) -> RunState | None:
            with conn.transaction():
                now = self._tx_now(conn)
                row = conn.execute(
                    "SELECT attempts, failures, state FROM sweeprun_runs WHERE sweep = %s AND "
                    "run_id = %s FOR UPDATE", [self.sweep, claim.run_id]).fetchone()
                if row is None:
                    return None
                if retry:
                    # The earlier try committed and only its reply was lost: answer what it
                    # recorded instead of recording a second outcome (or reporting a lost lease).
                    mark = conn.execute(
                        "SELECT outcome, result FROM sweeprun_attempts WHERE sweep = %s AND "
                        "run_id = %s AND attempt = %s",
                        [self.sweep, claim.run_id, claim.attempt]).fetchone()
                    if mark is not None and mark[0] == outcome.value and mark[1] is not None:
                        return RunState(mark[1])
                if outcome is Outcome.DONE and row[2] == RunState.DONE.value:
                    self._close_attempt(conn, claim.run_id, claim.attempt, outcome.value, exit_code,
                                        now, RunState.DONE)
                    return RunState.DONE  # a sync saw our DONE file first
                if row[0] != claim.attempt or row[2] != RunState.RUNNING.value:
                    return None
                failures = row[1] + (outcome is Outcome.FAILED)
                state = {Outcome.DONE: RunState.DONE, Outcome.INTERRUPTED: RunState.INTERRUPTED,
                         Outcome.FAILED: (RunState.FAILED if failures >= policy.max_attempts
                                          else RunState.PENDING)}[outcome]
                conn.execute(
                    "UPDATE sweeprun_runs SET state = %s, failures = %s, lost = 0, last_exit = %s, "
                    "worker = NULL, worker_start = NULL, child_pid = NULL, child_start = NULL, "
                    "lease_until = NULL, updated_at = %s WHERE sweep = %s AND run_id = %s",
                    [state.value, failures, exit_code, now, self.sweep, claim.run_id])
                self._close_attempt(conn, claim.run_id, claim.attempt, outcome.value, exit_code, now,
                                    state)
                return state

        return self._run("recording how a run ended", tx)

    def _close_attempt(self, conn: psycopg.Connection[Any], run_id: str, attempt: int, outcome: str,
                       exit_code: int | None, now: float, result: RunState | None) -> None:
        conn.execute("UPDATE sweeprun_attempts SET ended_at = %s, outcome = %s, exit_code = %s, "
                     "result = %s WHERE sweep = %s AND run_id = %s AND attempt = %s "
                     "AND ended_at IS NULL",
                     [now, outcome, exit_code, result.value if result else None, self.sweep, run_id,
                      attempt])

    def uptime(self) -> Uptime:
        if not self._tables:
            return Uptime(0.0, 0)
        query = _UPTIME_SQL.replace("FROM attempts", "FROM sweeprun_attempts")
        found = self._run("reading the attempts", lambda conn, _: conn.execute(
            query, [self._fake_now() or self._tx_now(conn), self.sweep]).fetchone(), timeout_s=SYNC_TIMEOUT_S)
        return Uptime(float(found[0] or 0.0), int(found[1] or 0))

    def attempts(self, run_id: str) -> list[AttemptRow]:
        if not self._tables:
            return []
        query = (f"SELECT {_ATTEMPT_COLUMNS} FROM sweeprun_attempts WHERE sweep = %s AND run_id = %s "
                 "ORDER BY attempt")
        found = self._run("reading the attempts", lambda conn, _: conn.execute(
            query, [self.sweep, run_id]).fetchall())
        return [AttemptRow(*r) for r in found]

    def rows(self, grid: str | None = None, *, params: bool = True) -> list[RunRow]:
        if not self._tables:
            return []
        columns = _R_COLUMNS if params else _R_COLUMNS.replace("r.params", "'{}'::text")
        if grid is None:
            query = (f"SELECT {columns} FROM sweeprun_runs r WHERE r.sweep = %s "
                     "ORDER BY r.idx, r.run_id")
            args = [self.sweep]
        else:
            query = (f"SELECT {columns} FROM sweeprun_members m JOIN sweeprun_runs r "
                     "ON r.sweep = m.sweep AND r.run_id = m.run_id "
                     "WHERE m.sweep = %s AND m.grid = %s ORDER BY m.idx")
            args = [self.sweep, grid]
        found = self._run("reading the runs", lambda conn, _: conn.execute(query, args).fetchall(),
                          timeout_s=SYNC_TIMEOUT_S)
        return [self._row(r)[0] for r in found]

    def _writable(self) -> None:
        if self.readonly:
            raise LedgerError(f"ledger {self.shown} was opened read-only (for status); it cannot be "
                              "changed through this handle")

    def close(self) -> None:
        self._watchdog.stop()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is gone
                pass
        self._local = threading.local()
