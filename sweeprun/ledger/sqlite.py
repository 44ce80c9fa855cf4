"""SQLite ledger for workers on one machine: a file on local disk, WAL, BEGIN IMMEDIATE."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from ..errors import LedgerError
from ..faults import crash_point
from ..identity import RunSpec
from ..procs import ProcessRef
from .base import Claim, Ledger, Outcome, RunRow, RunState

#: Filesystems where SQLite's locks do not hold (NFS, SMB, FUSE mounts such as
#: Colab's Google Drive, gcsfuse, s3fs, rclone): two workers could both claim a run.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse", "ceph", "glusterfs", "lustre", "afs")
ALLOW_NETWORK_ENV = "SWEEPRUN_ALLOW_NETWORK_LEDGER"

BUSY_TIMEOUT_ENV = "SWEEPRUN_BUSY_TIMEOUT_S"  # how long to wait for another process's lock

SCHEMA_VERSION = 1


def mount_fstype(path: Path) -> str | None:
    """Filesystem type of the mount holding ``path``, from /proc/mounts (Linux), else ``None``."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, fstype = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fstype = mount, parts[2]
    return fstype


def _is_network_fs(fstype: str | None) -> bool:
    return fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse."))


class SqliteLedger(Ledger):
    """The default ledger. Safe for many processes on one host; never on a network mount."""

    def __init__(self, path: str | Path, sweep: str, *, busy_timeout_s: float | None = None,
                 readonly: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.sweep = sweep
        self.busy_timeout_s = (busy_timeout_s if busy_timeout_s is not None
                               else float(os.environ.get(BUSY_TIMEOUT_ENV, 30.0)))
        self.readonly = readonly
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        parent = self.path.parent
        if not readonly:
            fstype = mount_fstype(parent if parent.exists() else Path(os.path.dirname(os.path.abspath(parent))))
            if _is_network_fs(fstype) and not os.environ.get(ALLOW_NETWORK_ENV):
                raise LedgerError(f"ledger {self.path} is on a {fstype} mount, where SQLite locking is "
                                  "unsafe; put it on local disk with --ledger (the store can stay there)")
            if self.path.is_dir():
                raise LedgerError(f"ledger {self.path} is a folder; give a file path with --ledger")
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LedgerError(f"cannot create the ledger's folder {parent}: {exc.strerror}; "
                                  "choose another --ledger") from None
        elif not self.path.exists():
            raise LedgerError(f"ledger {self.path} does not exist")
        with self._tx() as db:
            self._ensure_schema(db)

    # -- connections and transactions -------------------------------------------------

    def _db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                if self.readonly:
                    conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                           timeout=self.busy_timeout_s, isolation_level=None,
                                           check_same_thread=False)
                else:
                    conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s,
                                           isolation_level=None, check_same_thread=False)
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=FULL")
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
    def _tx(self, write: bool = True) -> Iterator[sqlite_utils.Database]:
        """One transaction; writes take the lock up front (BEGIN IMMEDIATE) so a claim never upgrades mid-way."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE" if write and not self.readonly else "BEGIN")
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            yield db
        except BaseException as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from None
            raise
        else:
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def _ensure_schema(self, db: sqlite_utils.Database) -> None:
        if self.readonly:
            if "runs" not in db.table_names():
                raise LedgerError(f"ledger {self.path} holds no sweeprun tables")
            return
        db["runs"].create({
            "sweep": str, "run_id": str, "idx": int, "params": str, "state": str,
            "attempts": int, "failures": int, "worker": str, "worker_start": int,
            "child_pid": int, "child_start": int, "lease_until": float, "heartbeat_at": float,
            "last_exit": int, "updated_at": float,
        }, pk=("sweep", "run_id"), not_null={"state", "attempts", "failures"},
            defaults={"attempts": 0, "failures": 0}, if_not_exists=True)
        db["attempts"].create({
            "sweep": str, "run_id": str, "attempt": int, "worker": str, "started_at": float,
            "ended_at": float, "outcome": str, "exit_code": int,
        }, pk=("sweep", "run_id", "attempt"), if_not_exists=True)
        db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db["meta"].insert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, ignore=True)

    # -- the contract -------------------------------------------------------------------

    def sync(self, runs: Iterable[RunSpec], done: set[str], started: set[str]) -> None:
        now = time.time()
        with self._tx() as db:
            existing = {r["run_id"]: r for r in db["runs"].rows_where("sweep = ?", [self.sweep])}
            runs = list(runs)
            wanted = {run.run_id for run in runs}
            for run_id, row in existing.items():
                # Runs no longer in the grid leave the index (their files stay in the store);
                # if the grid grows back, the store brings them back with their progress.
                if run_id not in wanted and row["state"] != RunState.RUNNING.value:
                    db.execute("DELETE FROM runs WHERE sweep = ? AND run_id = ?", [self.sweep, run_id])
            new = []
            for run in runs:
                row = existing.get(run.run_id)
                if row is None:
                    state = (RunState.DONE if run.run_id in done else
                             RunState.INTERRUPTED if run.run_id in started else RunState.PENDING)
                    new.append({"sweep": self.sweep, "run_id": run.run_id, "idx": run.index,
                                "params": json.dumps(run.params), "state": state.value,
                                "attempts": 0, "failures": 0, "updated_at": now})
                    continue
                state = RunState(row["state"])
                target = state
                if run.run_id in done:
                    target = RunState.DONE
                elif state is RunState.DONE:
                    target = RunState.INTERRUPTED if run.run_id in started else RunState.PENDING
                updates: dict[str, Any] = {}
                if target is not state and not (state is RunState.RUNNING and (row["lease_until"] or 0) > now):
                    updates["state"] = target.value
                if row["idx"] != run.index:
                    updates["idx"] = run.index
                if updates:
                    db["runs"].update((self.sweep, run.run_id), {**updates, "updated_at": now})
            if new:
                db["runs"].insert_all(new)

    def claim(self, worker: ProcessRef, max_attempts: int, lease_s: float) -> Claim | None:
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                """SELECT run_id, params, state, attempts, failures, worker, worker_start,
                          child_pid, child_start, lease_until FROM runs
                   WHERE sweep = ? AND (state IN ('pending', 'interrupted', 'running')
                                        OR (state = 'failed' AND failures < ?))
                   ORDER BY CASE state WHEN 'interrupted' THEN 0 ELSE 1 END, idx""",
                [self.sweep, max_attempts]).fetchall()
            for run_id, params, state, attempts, failures, holder, holder_start, child_pid, \
                    child_start, lease_until in rows:
                orphan = None
                if state == RunState.RUNNING.value:
                    ref = _ref(holder, holder_start)
                    if (lease_until or 0) > now and ref is not None and ref.alive():
                        continue  # held under a live lease
                    child = _ref(holder, child_start, pid=child_pid)
                    orphan = child if child is not None and child.alive() else None
                    self._close_attempt(db, run_id, attempts, "lost", None, now)
                elif failures >= max_attempts:
                    continue
                attempt = attempts + 1
                db["runs"].update((self.sweep, run_id), {
                    "state": RunState.RUNNING.value, "attempts": attempt,
                    "worker": worker.label, "worker_start": worker.start,
                    "child_pid": None, "child_start": None,
                    "lease_until": now + lease_s, "heartbeat_at": now, "updated_at": now})
                db["attempts"].insert({"sweep": self.sweep, "run_id": run_id, "attempt": attempt,
                                       "worker": worker.label, "started_at": now}, replace=True)
                crash_point("ledger.in_claim")
                return Claim(run_id=run_id, attempt=attempt, params=json.loads(params),
                             worker=worker, orphan=orphan)
        return None

    def heartbeat(self, claim: Claim, lease_s: float, child: ProcessRef | None = None) -> bool:
        now = time.time()
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

    def finish(self, claim: Claim, outcome: Outcome, max_attempts: int,
               exit_code: int | None = None) -> RunState | None:
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT attempts, failures, state FROM runs WHERE sweep = ? AND run_id = ?",
                             [self.sweep, claim.run_id]).fetchone()
            if row is None or row[0] != claim.attempt or row[2] != RunState.RUNNING.value:
                return None
            failures = row[1] + (outcome is Outcome.FAILED)
            state = {Outcome.DONE: RunState.DONE, Outcome.INTERRUPTED: RunState.INTERRUPTED,
                     Outcome.FAILED: RunState.FAILED if failures >= max_attempts else RunState.PENDING,
                     }[outcome]
            db["runs"].update((self.sweep, claim.run_id), {
                "state": state.value, "failures": failures, "last_exit": exit_code,
                "worker": None, "worker_start": None, "child_pid": None, "child_start": None,
                "lease_until": None, "updated_at": now})
            self._close_attempt(db, claim.run_id, claim.attempt, outcome.value, exit_code, now)
            return state

    def _close_attempt(self, db: sqlite_utils.Database, run_id: str, attempt: int, outcome: str,
                       exit_code: int | None, now: float) -> None:
        db.execute("UPDATE attempts SET ended_at = ?, outcome = ?, exit_code = ? "
                   "WHERE sweep = ? AND run_id = ? AND attempt = ? AND ended_at IS NULL",
                   [now, outcome, exit_code, self.sweep, run_id, attempt])

    def rows(self) -> list[RunRow]:
        with self._tx(write=False) as db:
            found = list(db.query("SELECT * FROM runs WHERE sweep = ? ORDER BY idx", [self.sweep]))
        return [RunRow(run_id=r["run_id"], index=r["idx"], params=json.loads(r["params"]),
                       state=RunState(r["state"]), attempts=r["attempts"], failures=r["failures"],
                       worker=r["worker"], heartbeat_at=r["heartbeat_at"],
                       lease_until=r["lease_until"], last_exit=r["last_exit"],
                       updated_at=r["updated_at"]) for r in found]

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()


def _ref(label: str | None, start: int | None, pid: int | None = None) -> ProcessRef | None:
    if not label:
        return None
    host, _, worker_pid = label.rpartition(":")
    try:
        return ProcessRef(host, pid if pid is not None else int(worker_pid), start)
    except ValueError:
        return None
