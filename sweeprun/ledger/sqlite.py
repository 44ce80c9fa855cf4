"""SQLite ledger for workers on one machine: a file on local disk, WAL, BEGIN IMMEDIATE."""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import LedgerError
from ..faults import crash_point
from ..identity import RunSpec
from ..procs import HOST, ProcessRef
from ..store import mount_fstype
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


def _import_sqlite_utils() -> Any:
    """sqlite-utils, without numpy when numpy is not loaded yet.

    sqlite-utils imports numpy (and pays ~60 ms for it) only to map numpy values in
    inserts; the ledger inserts none. The launcher and ``status`` start faster by that
    much, and a process that already uses numpy (a training script) is not affected.
    """
    if "numpy" in sys.modules or "sqlite_utils" in sys.modules:
        import sqlite_utils
        return sqlite_utils
    sys.modules["numpy"] = None  # type: ignore[assignment]  # makes `import numpy` fail
    try:
        import sqlite_utils
    finally:
        del sys.modules["numpy"]
    return sqlite_utils


sqlite_utils = _import_sqlite_utils()

#: Filesystems where SQLite's locks do not hold (NFS, SMB, FUSE mounts such as
#: Colab's Google Drive, gcsfuse, s3fs, rclone): two workers could both claim a run.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse", "ceph", "glusterfs", "lustre", "afs")
ALLOW_NETWORK_ENV = "SWEEPRUN_ALLOW_NETWORK_LEDGER"

BUSY_TIMEOUT_ENV = "SWEEPRUN_BUSY_TIMEOUT_S"  # how long to wait for another process's lock

#: Version 1 had no application id, no grid membership and no lost-attempt count.
SCHEMA_VERSION = 2
#: ``PRAGMA application_id`` of a sweeprun ledger ("SWPR"): lets us recognise our own file
#: from its header, and refuse another application's database without changing a byte of it.
APPLICATION_ID = 0x53575052
_SQLITE_MAGIC = b"SQLite format 3\x00"

#: The runs a claim may take, and the order it takes them in: interrupted runs first (their
#: checkpoints hold work), then grid order. Both are spelled as the ``runs_claim`` index is.
_OPEN = "r.state NOT IN ('done', 'failed')"
_CLAIM_ORDER = "r.state <> 'interrupted', r.idx"
#: How this host's workers are labelled: a run leased by any other label is surely held.
_LOCAL = HOST + ":"


def _is_network_fs(fstype: str | None) -> bool:
    return fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse."))


def busy_timeout_from_env() -> float:
    raw = os.environ.get(BUSY_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return 30.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= 86400):
        raise LedgerError(f"{BUSY_TIMEOUT_ENV}={raw!r} must be a number of seconds between 0 and "
                          "86400; unset it or fix its value")
    return value


class SqliteLedger(Ledger):
    """The default ledger. Safe for many processes on one host; never on a network mount."""

    def __init__(self, path: str | Path, sweep: str, *, busy_timeout_s: float | None = None,
                 readonly: bool = False) -> None:
        if str(path).strip() in ("", ":memory:") or str(path).startswith("file::memory:"):
            raise LedgerError(f"ledger {str(path)!r} is an in-memory database, which dies with this "
                              "process and cannot coordinate workers; give a file path on local disk")
        self.path = Path(path).expanduser()
        self.sweep = sweep
        self.busy_timeout_s = busy_timeout_s if busy_timeout_s is not None else busy_timeout_from_env()
        self.readonly = readonly
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if self.path.is_dir():
            raise LedgerError(f"ledger {self.path} is a folder; give a file path with --ledger")
        if readonly:
            if not self.path.exists():
                raise LedgerError(f"ledger {self.path} does not exist")
        else:
            parent = self.path.parent
            fstype = mount_fstype(parent if parent.exists() else Path(os.path.dirname(os.path.abspath(parent))))
            if _is_network_fs(fstype) and not os.environ.get(ALLOW_NETWORK_ENV):
                raise LedgerError(f"ledger {self.path} is on a {fstype} mount, where SQLite locking is "
                                  "unsafe; put it on local disk with --ledger (the store can stay there)")
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LedgerError(f"cannot create the ledger's folder {parent}: "
                                  f"{exc.strerror or exc}; choose another --ledger") from None
        self._check_existing()
        if not readonly:
            with self._tx(durable=True) as db:
                self._ensure_schema(db)

    # -- opening safely -------------------------------------------------------------------

    def _check_existing(self) -> None:
        """Refuse a file that is not a sweeprun ledger, or one from a newer sweeprun, before
        any connection that could write to it (WAL mode alone changes the header)."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(100)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise LedgerError(f"cannot read ledger {self.path}: {exc.strerror or exc}") from None
        if not head:
            return  # an empty file: SQLite treats it as a new database
        if not head.startswith(_SQLITE_MAGIC):
            raise LedgerError(f"ledger {self.path} is corrupt or not a database; delete it and run "
                              "again: it is rebuilt from the store without re-running finished runs")
        try:
            conn = self._reader()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = None
            if "meta" in tables:
                found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = found[0] if found else None
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            conn.close()
        ours = app_id == APPLICATION_ID or (app_id == 0 and {"runs", "meta"} <= tables
                                            and version is not None)
        if not ours:
            if not tables and app_id == 0:
                return  # an empty database: ours to initialise
            raise LedgerError(f"{self.path} is not a sweeprun ledger (it holds tables "
                              f"{', '.join(sorted(tables)) or 'none'}); it was left untouched: give "
                              "--ledger a new file path")
        try:
            number = int(version) if version is not None else None
        except ValueError:
            number = None
        if number is None:
            raise LedgerError(f"ledger {self.path} has no readable schema version; delete it and "
                              "run again: it is rebuilt from the store")
        if number > SCHEMA_VERSION:
            raise LedgerError(f"ledger {self.path} was written by a newer sweeprun (schema {number}, "
                              f"this one knows up to {SCHEMA_VERSION}); upgrade sweeprun, or give "
                              "--ledger a new file (it is rebuilt from the store)")

    # -- connections and transactions -------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if not self.readonly:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")  # see _tx: FULL where a commit must outlive power loss
            return conn
        return self._reader()

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch a new ledger to WAL, even when several launchers create it at once.

        The switch needs an exclusive lock; two processes that both hold a shared lock
        while waiting for it would wait on each other for the whole busy timeout. Short
        tries with random pauses let one of them win at once.
        """
        deadline = time.monotonic() + self.busy_timeout_s
        conn.execute("PRAGMA busy_timeout = 50")
        try:
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() >= deadline:
                        raise
                    time.sleep(random.uniform(0.01, 0.2))
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")

    def _reader(self) -> sqlite3.Connection:
        """A connection that leaves nothing behind (``mode=ro`` alone creates -wal and -shm).

        Without a writer's -wal file the database is opened immutable, which creates
        nothing; with one, a writer is live or died mid-way, and its WAL must be read.
        """
        wal = Path(str(self.path) + "-wal")
        mode = "mode=ro" if wal.exists() else "immutable=1"
        return sqlite3.connect(f"file:{_uri_path(self.path)}?{mode}", uri=True,
                               timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)

    def _db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                conn = self._connect()
            except sqlite3.DatabaseError as exc:
                raise self._error(exc) from None
            with self._lock:
                self._conns.append(conn)
            db = sqlite_utils.Database(conn)
            self._local.db = db
        return db

    def _error(self, exc: sqlite3.Error) -> LedgerError:
        msg = str(exc)
        if "locked" in msg or "busy" in msg:
            return LedgerError(f"ledger {self.path} stayed locked for {self.busy_timeout_s:g} s by another "
                               "process; wait for it or remove that process, then run again")
        if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
            return LedgerError(f"ledger {self.path} is corrupt ({msg}); delete it and run again: "
                               "it is rebuilt from the store without re-running finished runs")
        return LedgerError(f"ledger {self.path}: {msg}")

    @contextmanager
    def _tx(self, write: bool = True, durable: bool = False) -> Iterator[sqlite_utils.Database]:
        """One transaction; writes take the lock up front (BEGIN IMMEDIATE) so a claim never upgrades mid-way.

        Every commit survives the death of any process (it is in the WAL, in the
        kernel's cache, before COMMIT returns). Only a ``durable`` one is also fsynced,
        so that it survives the loss of the machine: the outcome of a run (a failure
        that counts toward max_attempts) and what a sync rebuilt. The rest (claims,
        starts, heartbeats, releases) only matter to workers of this machine, which a
        power loss kills too: after it, a lost claim or renewal is a run held by a dead
        worker, which is taken over as when the machine died a moment earlier, and the
        store's attempt records keep the attempt numbers rising. An fsynced commit makes
        every earlier one durable too (the WAL is written in order).
        """
        db = self._db()
        if durable and not self.readonly:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE" if write and not self.readonly else "BEGIN")
        except sqlite3.Error as exc:
            self._relax(db, durable)
            raise self._error(exc) from None
        try:
            yield db
        except BaseException as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._relax(db, durable)
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from None
            raise
        else:
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(exc) from None
            finally:
                self._relax(db, durable)

    def _relax(self, db: sqlite_utils.Database, durable: bool) -> None:
        if durable and not self.readonly:
            try:
                db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error:
                pass  # the connection is broken; the next transaction says so

    def _ensure_schema(self, db: sqlite_utils.Database) -> None:
        db["runs"].create({
            "sweep": str, "run_id": str, "idx": int, "params": str, "state": str,
            "attempts": int, "failures": int, "lost": int, "progress": str,
            "worker": str, "worker_start": int, "child_pid": int, "child_start": int,
            "lease_until": float, "heartbeat_at": float, "last_exit": int, "updated_at": float,
        }, pk=("sweep", "run_id"), not_null={"state", "attempts", "failures"},
            defaults={"attempts": 0, "failures": 0, "lost": 0}, if_not_exists=True)
        columns = {c.name for c in db["runs"].columns}
        if "lost" not in columns:  # schema 1
            db.execute("ALTER TABLE runs ADD COLUMN lost INTEGER NOT NULL DEFAULT 0")
        if "progress" not in columns:
            db.execute("ALTER TABLE runs ADD COLUMN progress TEXT")
        if "reset" not in columns:  # the last reset honoured (forget); older sweeprun leaves it alone
            db.execute("ALTER TABLE runs ADD COLUMN reset TEXT")
        db["members"].create({"sweep": str, "grid": str, "run_id": str, "idx": int},
                             pk=("sweep", "grid", "run_id"), if_not_exists=True)
        db.execute("CREATE INDEX IF NOT EXISTS members_order ON members (sweep, grid, idx)")
        # What claims walk (see _next_runnable). Extra indexes need no new schema version:
        # an older sweeprun keeps them up to date without knowing of them.
        db.execute(f"CREATE INDEX IF NOT EXISTS runs_claim ON runs (sweep, {_CLAIM_ORDER.replace('r.', '')}) "
                   f"WHERE {_OPEN.replace('r.', '')}")
        db.execute("CREATE INDEX IF NOT EXISTS runs_failed ON runs (sweep, failures, idx) "
                   "WHERE state = 'failed'")
        db.execute("CREATE INDEX IF NOT EXISTS runs_running ON runs (sweep) WHERE state = 'running'")
        db["attempts"].create({
            "sweep": str, "run_id": str, "attempt": int, "worker": str, "started_at": float,
            "ended_at": float, "outcome": str, "exit_code": int,
        }, pk=("sweep", "run_id", "attempt"), if_not_exists=True)
        db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    # -- reading rows ---------------------------------------------------------------------

    _COLUMNS = ("run_id, idx, params, state, attempts, failures, lost, progress, worker, "
                "worker_start, child_pid, child_start, lease_until, heartbeat_at, last_exit, updated_at")

    def _row(self, r: tuple[Any, ...]) -> tuple[RunRow, dict[str, Any]]:
        return decode_row(r, str(self.path), "delete the ledger and run again: it is rebuilt from "
                          "the store")

    # -- the contract -------------------------------------------------------------------

    def sync(self, runs: Iterable[RunSpec], done: set[str], started: set[str],
             still_done: Callable[[str], bool] | None = None) -> None:
        runs = list(runs)
        key = grid_key(runs)
        gone: set[str] | None = None  # None: trust the listing
        if still_done is not None:
            # Ask the store outside the transaction (it may be slow: a bucket, a Drive),
            # only about runs the ledger has as done and the listing lacks. A run that
            # becomes done after this read is not in `gone`, so it is left alone below.
            with self._tx(write=False) as db:
                ledger_done = {r[0] for r in db.execute(
                    "SELECT run_id FROM runs WHERE sweep = ? AND state = 'done'", [self.sweep])}
            gone = {run.run_id for run in runs if run.run_id in ledger_done
                    and run.run_id not in done and not still_done(run.run_id)}
        now = self.now()
        with self._tx(durable=True) as db:
            existing = {r[0]: r[1] for r in db.execute(
                "SELECT run_id, state FROM runs WHERE sweep = ?", [self.sweep])}
            new = []
            for run in runs:
                state = existing.get(run.run_id)
                if state is None:
                    initial = (RunState.DONE if run.run_id in done else
                               RunState.INTERRUPTED if run.run_id in started else RunState.PENDING)
                    new.append({"sweep": self.sweep, "run_id": run.run_id, "idx": run.index,
                                "params": json.dumps(run.params), "state": initial.value,
                                "attempts": 0, "failures": 0, "lost": 0, "updated_at": now})
                    continue
                if run.run_id in done and state != RunState.DONE.value:
                    # DONE in the store is the truth, even under a live lease: the holder's
                    # finish is accepted for a done run, and no one will start it again.
                    db.execute("UPDATE runs SET state = 'done', worker = NULL, worker_start = NULL, "
                               "child_pid = NULL, child_start = NULL, lease_until = NULL, "
                               "updated_at = ? WHERE sweep = ? AND run_id = ?",
                               [now, self.sweep, run.run_id])
                elif (run.run_id not in done and state == RunState.DONE.value
                      and (gone is None or run.run_id in gone)):
                    target = RunState.INTERRUPTED if run.run_id in started else RunState.PENDING
                    db.execute("UPDATE runs SET state = ?, failures = 0, lost = 0, updated_at = ? "
                               "WHERE sweep = ? AND run_id = ?",
                               [target.value, now, self.sweep, run.run_id])
            if new:
                db["runs"].insert_all(new)
            known = db.execute("SELECT 1 FROM members WHERE sweep = ? AND grid = ? LIMIT 1",
                               [self.sweep, key]).fetchone()
            if known is None:
                db["members"].insert_all(({"sweep": self.sweep, "grid": key, "run_id": run.run_id,
                                           "idx": run.index} for run in runs), ignore=True)

    def forget(self, resets: Mapping[str, str]) -> set[str]:
        if not resets:
            return set()
        with self._tx(durable=True) as db:
            now = self.now()
            found = db.execute("SELECT run_id, reset FROM runs WHERE sweep = ? AND run_id IN "
                               "(SELECT value FROM json_each(?))",
                               [self.sweep, json.dumps(sorted(resets))]).fetchall()
            fresh = {run_id for run_id, seen in found if seen != resets[run_id]}
            for run_id in sorted(fresh):
                db.execute("UPDATE runs SET failures = 0, lost = 0, reset = ?, updated_at = ?, "
                           "state = CASE WHEN state = 'failed' THEN 'pending' ELSE state END "
                           "WHERE sweep = ? AND run_id = ?", [resets[run_id], now, self.sweep, run_id])
            crash_point("ledger.in_forget")
        return fresh

    def honoured(self) -> dict[str, str]:
        with self._tx(write=False) as db:
            if "reset" not in {r[1] for r in db.execute("PRAGMA table_info(runs)")}:
                return {}  # a ledger written before resets were honoured, opened read-only
            return {r[0]: r[1] for r in db.execute(
                "SELECT run_id, reset FROM runs WHERE sweep = ? AND reset IS NOT NULL", [self.sweep])}

    def claim(self, worker: ProcessRef, policy: Policy, lease_s: float,
              grid: str | None = None, skip: Collection[str] = ()) -> Claim | None:
        check_lease(lease_s)
        with self._tx() as db:
            now = self.now()
            found = self._next_runnable(db, policy, now, grid, skip)
            if found is None:
                return None
            row, extra = found
            orphan, took_over = None, False
            if row.state is RunState.RUNNING:
                took_over = True
                orphan = orphan_of(row, extra)
                self._close_attempt(db, row.run_id, row.attempts, "lost", None, now)
            attempt = row.attempts + 1
            db.execute(
                "UPDATE runs SET state = 'running', attempts = ?, worker = ?, worker_start = ?, "
                "child_pid = NULL, child_start = NULL, lease_until = ?, heartbeat_at = ?, "
                "updated_at = ? WHERE sweep = ? AND run_id = ?",
                [attempt, worker.label, worker.start, now + lease_s, now, now, self.sweep, row.run_id])
            db.execute("INSERT OR REPLACE INTO attempts (sweep, run_id, attempt, worker, started_at) "
                       "VALUES (?, ?, ?, ?, ?)", [self.sweep, row.run_id, attempt, worker.label, now])
            crash_point("ledger.in_claim")
            return Claim(run_id=row.run_id, attempt=attempt, params=row.params, worker=worker,
                         orphan=orphan, took_over=took_over)

    def _next_runnable(self, db: sqlite_utils.Database, policy: Policy, now: float, grid: str | None,
                       skip: Collection[str]) -> tuple[RunRow, dict[str, Any]] | None:
        """The first runnable run in claim order (interrupted first, then index), found by
        walking an index from its start, so that it costs the same at the first run and the
        hundred-thousandth; a scan of every open run, params decoded, cost 14 ms at 10,000.

        ``runs_claim`` holds the open runs in that order. The SQL drops what is surely not
        runnable (over a limit, leased by a worker of another host, in ``skip``); :func:`judge`
        decides the rest, since a holder on this host is checked by its pid and start time:
        only the runs of this host's live workers are looked at and passed over, a few
        per claim. Failed runs are kept out of that index (they pile up in a sweep that
        fails a lot, and would be walked by every claim); one of them is runnable again only
        when ``max_attempts`` was raised or it failed by lost attempts, and ``runs_failed``
        finds those without visiting the others.
        """
        member = ("" if grid is None else
                  "AND EXISTS (SELECT 1 FROM members m WHERE m.sweep = r.sweep AND m.grid = ? "
                  "AND m.run_id = r.run_id) ")
        args_grid = [] if grid is None else [grid]
        seen = list(skip)
        limit = 4  # usually the first row is it
        best: tuple[RunRow, dict[str, Any]] | None = None
        while best is None:
            found = db.execute(
                f"SELECT {self._prefixed()} FROM runs r "
                f"WHERE r.sweep = ? AND {_OPEN} AND r.failures < ? AND r.lost < ? "
                "AND NOT (r.state = 'running' AND COALESCE(r.lease_until, 0) > ? "
                "AND (r.worker IS NULL OR substr(r.worker, 1, ?) <> ?)) "
                f"AND r.run_id NOT IN (SELECT value FROM json_each(?)) {member}"
                f"ORDER BY {_CLAIM_ORDER} LIMIT ?",
                [self.sweep, policy.max_attempts, policy.max_lost, now, len(_LOCAL), _LOCAL,
                 json.dumps(seen), *args_grid, limit]).fetchall()
            for raw in found:
                row, extra = self._row(raw)
                if judge(row, now, policy) is Verdict.RUNNABLE:
                    best = row, extra
                    break
                seen.append(row.run_id)
            if best is None and len(found) < limit:
                break
            limit *= 4
        reopened = db.execute(
            f"SELECT {self._prefixed()} FROM runs r "
            "WHERE r.sweep = ? AND r.state = 'failed' AND r.failures < ? AND r.lost < ? "
            f"AND r.run_id NOT IN (SELECT value FROM json_each(?)) {member}"
            "ORDER BY r.idx LIMIT 1",
            [self.sweep, policy.max_attempts, policy.max_lost, json.dumps(list(skip)), *args_grid]
        ).fetchone()
        if reopened is not None:
            candidate = self._row(reopened)
            if best is None or (best[0].state is not RunState.INTERRUPTED
                                and candidate[0].index < best[0].index):
                best = candidate
        return best

    def settled(self, policy: Policy, grid: str | None = None) -> bool:
        """See :func:`~sweeprun.ledger.base.settled`: a run with tries left (runnable or held) is
        found through the claim's indexes, and only running runs are judged one by one,
        so an idle launcher's check does not read the whole sweep."""
        member = ("" if grid is None else
                  "AND EXISTS (SELECT 1 FROM members m WHERE m.sweep = r.sweep AND m.grid = ? "
                  "AND m.run_id = r.run_id) ")
        args = [self.sweep, policy.max_attempts, policy.max_lost, *([] if grid is None else [grid])]
        with self._tx(write=False) as db:
            now = self.now()
            for where in (_OPEN, "r.state = 'failed'"):
                if db.execute(f"SELECT 1 FROM runs r WHERE r.sweep = ? AND {where} "
                              f"AND r.failures < ? AND r.lost < ? {member}LIMIT 1", args).fetchone():
                    return False
            running = db.execute(f"SELECT {self._prefixed()} FROM runs r "
                                 f"WHERE r.sweep = ? AND r.state = 'running' {member}",
                                 [self.sweep, *args[3:]]).fetchall()
        return not any(judge(self._row(raw)[0], now, policy) is Verdict.HELD for raw in running)

    def _prefixed(self) -> str:
        return ", ".join(f"r.{c.strip()}" for c in self._COLUMNS.split(","))

    def release(self, claim: Claim) -> bool:
        now = self.now()
        with self._tx() as db:
            cur = db.execute("UPDATE runs SET state = 'interrupted', attempts = attempts - 1, "
                             "worker = NULL, worker_start = NULL, child_pid = NULL, child_start = NULL, "
                             "lease_until = NULL, updated_at = ? WHERE sweep = ? AND run_id = ? AND "
                             "attempts = ? AND state = 'running'",
                             [now, self.sweep, claim.run_id, claim.attempt])
            if cur.rowcount != 1:
                return False
            db.execute("DELETE FROM attempts WHERE sweep = ? AND run_id = ? AND attempt = ?",
                       [self.sweep, claim.run_id, claim.attempt])
            return True

    def renumber(self, claim: Claim, at_least: int) -> Claim | None:
        if at_least <= claim.attempt:
            return claim
        now = self.now()
        with self._tx() as db:
            cur = db.execute("UPDATE runs SET attempts = ?, updated_at = ? WHERE sweep = ? AND "
                             "run_id = ? AND attempts = ? AND state = 'running'",
                             [at_least, now, self.sweep, claim.run_id, claim.attempt])
            if cur.rowcount != 1:
                return None
            db.execute("UPDATE attempts SET attempt = ? WHERE sweep = ? AND run_id = ? AND attempt = ?",
                       [at_least, self.sweep, claim.run_id, claim.attempt])
        return with_attempt(claim, at_least)

    def start(self, claim: Claim, lease_s: float, progress: str | None,
              policy: Policy) -> RunState | None:
        check_lease(lease_s)
        now = self.now()
        with self._tx() as db:
            found = db.execute("SELECT attempts, state, lost, progress FROM runs WHERE sweep = ? AND "
                               "run_id = ?", [self.sweep, claim.run_id]).fetchone()
            if found is None or found[0] != claim.attempt or found[1] != RunState.RUNNING.value:
                return None
            lost = found[2] or 0
            if claim.took_over:
                lost = lost + 1 if progress == found[3] else 0
            else:
                lost = 0
            if lost >= policy.max_lost:
                db.execute("UPDATE runs SET state = 'failed', lost = ?, progress = ?, worker = NULL, "
                           "worker_start = NULL, lease_until = NULL, updated_at = ? "
                           "WHERE sweep = ? AND run_id = ?", [lost, progress, now, self.sweep, claim.run_id])
                self._close_attempt(db, claim.run_id, claim.attempt, "lost-limit", None, now)
                return RunState.FAILED
            db.execute("UPDATE runs SET lost = ?, progress = ?, lease_until = ?, heartbeat_at = ?, "
                       "updated_at = ? WHERE sweep = ? AND run_id = ?",
                       [lost, progress, now + lease_s, now, now, self.sweep, claim.run_id])
            return RunState.RUNNING

    def heartbeat(self, claim: Claim, lease_s: float, child: ProcessRef | None = None) -> bool:
        now = self.now()
        values: dict[str, Any] = {"lease_until": now + lease_s, "heartbeat_at": now}
        if child is not None:
            values.update(child_pid=child.pid, child_start=child.start)
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} "
                "WHERE sweep = ? AND run_id = ? AND attempts = ? AND state = 'running'",
                [*values.values(), self.sweep, claim.run_id, claim.attempt])
            crash_point("ledger.in_heartbeat")
            return cur.rowcount == 1

    def finish(self, claim: Claim, outcome: Outcome, policy: Policy,
               exit_code: int | None = None) -> RunState | None:
        now = self.now()
        with self._tx(durable=True) as db:
            row = db.execute("SELECT attempts, failures, state FROM runs WHERE sweep = ? AND run_id = ?",
                             [self.sweep, claim.run_id]).fetchone()
            if row is None:
                return None
            if outcome is Outcome.DONE and row[2] == RunState.DONE.value:
                self._close_attempt(db, claim.run_id, claim.attempt, outcome.value, exit_code, now)
                return RunState.DONE  # a sync saw our DONE file first
            if row[0] != claim.attempt or row[2] != RunState.RUNNING.value:
                return None
            failures = row[1] + (outcome is Outcome.FAILED)
            state = {Outcome.DONE: RunState.DONE, Outcome.INTERRUPTED: RunState.INTERRUPTED,
                     Outcome.FAILED: RunState.FAILED if failures >= policy.max_attempts else RunState.PENDING,
                     }[outcome]
            db.execute("UPDATE runs SET state = ?, failures = ?, lost = 0, last_exit = ?, worker = NULL, "
                       "worker_start = NULL, child_pid = NULL, child_start = NULL, lease_until = NULL, "
                       "updated_at = ? WHERE sweep = ? AND run_id = ?",
                       [state.value, failures, exit_code, now, self.sweep, claim.run_id])
            self._close_attempt(db, claim.run_id, claim.attempt, outcome.value, exit_code, now)
            return state

    def _close_attempt(self, db: sqlite_utils.Database, run_id: str, attempt: int, outcome: str,
                       exit_code: int | None, now: float) -> None:
        db.execute("UPDATE attempts SET ended_at = ?, outcome = ?, exit_code = ? "
                   "WHERE sweep = ? AND run_id = ? AND attempt = ? AND ended_at IS NULL",
                   [now, outcome, exit_code, self.sweep, run_id, attempt])

    def uptime(self) -> Uptime:
        with self._tx(write=False) as db:
            found = db.execute(_UPTIME_SQL.replace("%s", "?"), [self.now(), self.sweep]).fetchone()
        return Uptime(float(found[0] or 0.0), int(found[1] or 0))

    def attempts(self, run_id: str) -> list[AttemptRow]:
        with self._tx(write=False) as db:
            found = db.execute(f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE sweep = ? AND run_id = ? "
                               "ORDER BY attempt", [self.sweep, run_id]).fetchall()
        return [AttemptRow(*r) for r in found]

    def rows(self, grid: str | None = None, *, params: bool = True) -> list[RunRow]:
        columns = self._prefixed() if params else self._prefixed().replace("r.params", "'{}'")
        with self._tx(write=False) as db:
            if grid is None:
                found = db.execute(f"SELECT {columns} FROM runs r WHERE r.sweep = ? "
                                   "ORDER BY r.idx, r.run_id", [self.sweep]).fetchall()
            else:
                found = db.execute(f"SELECT {columns} FROM members m JOIN runs r "
                                   "ON r.sweep = m.sweep AND r.run_id = m.run_id "
                                   "WHERE m.sweep = ? AND m.grid = ? ORDER BY m.idx",
                                   [self.sweep, grid]).fetchall()
        return [self._row(r)[0] for r in found]

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()


def _uri_path(path: Path) -> str:
    """``path`` quoted for a ``file:`` URI (a '?' or '#' in a folder name would end the path)."""
    from urllib.parse import quote

    return quote(str(path.absolute()))
