"""A SQLite ledger's file: opened safely, its connections and transactions, its schema and upgrades.

Apart from :mod:`sweeprun.ledger.sqlite` (what the ledger does with its rows) because how a
file is trusted, locked and upgraded is a concern of its own, and every operation shares it.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import settings
from ..errors import LedgerError
from ..store import mount_fstype


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


#: Version 1 had no application id, no grid membership and no lost-attempt count.
SCHEMA_VERSION = 2
#: ``PRAGMA application_id`` of a sweeprun ledger ("SWPR"): lets us recognise our own file
#: from its header, and refuse another application's database without changing a byte of it.
APPLICATION_ID = 0x53575052
_SQLITE_MAGIC = b"SQLite format 3\x00"

#: The runs a claim may take, and the order it takes them in: interrupted runs first (their
#: checkpoints hold work), then grid order. Both are spelled as the ``runs_claim`` index is.
#: Runs that may still be claimed or are held (judge() decides). ``diverged`` is a term of its
#: own: an index made with the first one still serves the query (SQLite uses a partial index
#: whose terms all appear in the query).
OPEN_RUNS = "r.state NOT IN ('done', 'failed') AND r.state <> 'diverged'"
CLAIM_ORDER = "r.state <> 'interrupted', r.idx"


def _is_network_fs(fstype: str | None) -> bool:
    return fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse."))


class SqliteFile:
    """One ledger file, opened safely: never on a network mount, never another application's
    database, never one from a newer sweeprun; WAL, and BEGIN IMMEDIATE for writes."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float | None = None,
                 readonly: bool = False) -> None:
        if str(path).strip() in ("", ":memory:") or str(path).startswith("file::memory:"):
            raise LedgerError(f"ledger {str(path)!r} is an in-memory database, which dies with this "
                              "process and cannot coordinate workers; give a file path on local disk")
        self.path = Path(path).expanduser()
        self.busy_timeout_s = busy_timeout_s if busy_timeout_s is not None else settings.BUSY_TIMEOUT_S.value()
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
            if _is_network_fs(fstype) and not settings.ALLOW_NETWORK_LEDGER.get():
                raise LedgerError(f"ledger {self.path} is on a {fstype} mount, where SQLite locking is "
                                  "unsafe; put it on local disk with --ledger (the store can stay there)")
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LedgerError(f"cannot create the ledger's folder {parent}: "
                                  f"{exc.strerror or exc}; choose another --ledger") from None
        self._check_existing()
        if not readonly:
            with self.tx(durable=True) as db:
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
            raise self.error(exc) from None
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = None
            if "meta" in tables:
                found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = found[0] if found else None
        except sqlite3.Error as exc:
            raise self.error(exc) from None
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
            conn.execute("PRAGMA synchronous=NORMAL")  # see tx: FULL where a commit must outlive power loss
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

    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                conn = self._connect()
            except sqlite3.DatabaseError as exc:
                raise self.error(exc) from None
            with self._lock:
                self._conns.append(conn)
            db = sqlite_utils.Database(conn)
            self._local.db = db
        return db

    def error(self, exc: sqlite3.Error) -> LedgerError:
        msg = str(exc)
        if "locked" in msg or "busy" in msg:
            return LedgerError(f"ledger {self.path} stayed locked for {self.busy_timeout_s:g} s by another "
                               "process; wait for it or remove that process, then run again")
        if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
            return LedgerError(f"ledger {self.path} is corrupt ({msg}); delete it and run again: "
                               "it is rebuilt from the store without re-running finished runs")
        return LedgerError(f"ledger {self.path}: {msg}")

    @contextmanager
    def tx(self, write: bool = True, durable: bool = False) -> Iterator[sqlite_utils.Database]:
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
        db = self.db()
        if durable and not self.readonly:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE" if write and not self.readonly else "BEGIN")
        except sqlite3.Error as exc:
            self._relax(db, durable)
            raise self.error(exc) from None
        try:
            yield db
        except BaseException as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._relax(db, durable)
            if isinstance(exc, sqlite3.Error):
                raise self.error(exc) from None
            raise
        else:
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self.error(exc) from None
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
        if "resumed" not in columns:  # a resume at another world size (JSON); the same holds
            db.execute("ALTER TABLE runs ADD COLUMN resumed TEXT")
        if "rollbacks" not in columns:  # loss-spike rollbacks (JSON)
            db.execute("ALTER TABLE runs ADD COLUMN rollbacks TEXT")
        db["members"].create({"sweep": str, "grid": str, "run_id": str, "idx": int},
                             pk=("sweep", "grid", "run_id"), if_not_exists=True)
        db.execute("CREATE INDEX IF NOT EXISTS members_order ON members (sweep, grid, idx)")
        # What claims walk (see SqliteLedger._next_runnable). Extra indexes need no new schema version:
        # an older sweeprun keeps them up to date without knowing of them.
        db.execute(f"CREATE INDEX IF NOT EXISTS runs_claim ON runs (sweep, {CLAIM_ORDER.replace('r.', '')}) "
                   f"WHERE {OPEN_RUNS.replace('r.', '')}")
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
