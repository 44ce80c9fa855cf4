"""A PostgreSQL ledger's database: connections, retries through outages, a watchdog for calls
that hang, and the schema with its upgrades.

Apart from :mod:`sweeprun.ledger.postgres` (what the ledger does with its rows) because
reaching a server over an unreliable network, and trusting what it holds, are concerns of
their own that every operation shares.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from .. import settings
from ..errors import LedgerError
from ..redact import redact, redact_url

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")


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
ALTER TABLE sweeprun_runs ADD COLUMN IF NOT EXISTS resumed text;
ALTER TABLE sweeprun_runs ADD COLUMN IF NOT EXISTS rollbacks text;
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
#: Columns that came after schema 1 without a new version: nullable, and an older sweeprun
#: never reads them. ``reset``: the last reset a run honoured (:meth:`PostgresLedger.forget`);
#: ``resumed``: the run's resume at another world size (JSON, :attr:`RunRow.resumed`);
#: ``rollbacks``: its loss-spike rollbacks (JSON, :attr:`RunRow.rollbacks`). Added
#: once, to databases created before them, under the schema lock.
_ADDED_COLUMNS = {name: f"ALTER TABLE sweeprun_runs ADD COLUMN IF NOT EXISTS {name} text"
                  for name in ("reset", "resumed", "rollbacks")}
_PRESENT_COLUMNS = ("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('sweeprun_runs') "
                    "AND attname = ANY(%s) AND NOT attisdropped")
HAS_RESET = ("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('sweeprun_runs') "
              "AND attname = 'reset' AND NOT attisdropped")


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


class PostgresDatabase:
    """The connections of a PostgreSQL ledger: opened with the schema checked (and created or
    upgraded), kept one per thread, retried through outages, cut when a call hangs."""

    def __init__(self, url: str, *, readonly: bool = False, wait_s: float | None = None) -> None:
        self._pg = _psycopg()
        self.url = url
        self.shown = redact_url(url)  # a password may hold what ends a word in text
        self.readonly = readonly
        self.wait_s = wait_s if wait_s is not None else settings.LEDGER_WAIT_S.value()
        self.call_timeout_s = CALL_TIMEOUT_S
        self._local = threading.local()
        self._given_up = threading.Event()
        self._conns: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._watchdog = _Watchdog()
        try:
            given = self._pg.conninfo.conninfo_to_dict(url)
        except self._pg.Error as exc:
            raise LedgerError(f"ledger {self.shown} is not a usable PostgreSQL URL ({_one_line(exc)}); "
                              "give --ledger postgresql://user@host:port/database") from None
        self._connect_args = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        self._tables = True
        #: The added columns ``sweeprun_runs`` has: a read-only handle on an older ledger reads
        #: its rows without the others (a writer adds them on opening).
        self.has_columns: set[str] = set(_ADDED_COLUMNS)
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
        adding: list[str] = []  # columns added to a ledger an older sweeprun created
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
                else:
                    present = {r[0] for r in conn.execute(_PRESENT_COLUMNS, [list(_ADDED_COLUMNS)])}
                    self.has_columns = present
                    if not self.readonly:
                        adding = [_ADDED_COLUMNS[c] for c in _ADDED_COLUMNS if c not in present]
                    if adding:
                        with conn.transaction():
                            conn.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK])
                            for statement in adding:
                                conn.execute(statement)
                        self.has_columns = set(_ADDED_COLUMNS)
        except self._pg.Error as exc:
            self.close()
            hint = ""
            if isinstance(exc, self._pg.errors.InsufficientPrivilege):
                # Only the owner of a table may add a column to it: a role granted the rows of
                # a ledger another role created meets this on the first launch of a newer sweeprun.
                more = "one more column" if len(adding) == 1 else f"{len(adding)} more columns"
                hint = (f"; this sweeprun needs {more}: have the owner of sweeprun_runs run "
                        f"`{'; '.join(adding)}` once" if adding else
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

    def stop_waiting(self) -> None:
        self._given_up.set()

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
