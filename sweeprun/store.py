"""The run layout on durable storage, over any fsspec filesystem.

The store is the source of truth: a run with ``DONE`` is finished, a run with a
verified checkpoint resumes from it. So every state write goes through
:func:`atomic_write`, and only :class:`RunPaths` / :class:`SweepPaths` know
where files live.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import StoreError
from .faults import crash_point


@contextmanager
def store_errors(action: str, path: str) -> Iterator[None]:
    """Turn low-level I/O errors into one actionable :class:`StoreError`."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = {errno.ENOSPC: "free space on it and run the same command again",
                errno.EROFS: "the filesystem is read-only; remount it or choose another --store",
                errno.EACCES: "check its permissions or choose another --store",
                errno.EDQUOT: "the disk quota is exceeded; free space and run again"}.get(
                    exc.errno or 0, "check that the store is reachable and writable")
        raise StoreError(f"cannot {action} {path}: {reason}; {hint}") from exc


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes,
                 crash_prefix: str | None = None) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one.

    On local disk: temp file in the same directory, fsync, rename, fsync of the
    directory, so the rename itself survives a power loss. On object stores a
    single ``pipe_file`` is one PUT, which is atomic by itself. ``crash_prefix``
    names the fault-injection points (``<prefix>.mid_write``,
    ``<prefix>.before_rename``) for writes whose torn state a test must probe.
    """
    with store_errors("write", path):
        if not is_local(fs):
            fs.pipe_file(path, data)
            return
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                if crash_prefix:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    crash_point(f"{crash_prefix}.mid_write")
                    f.write(data[len(data) // 2:])
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if crash_prefix:
                crash_point(f"{crash_prefix}.before_rename")
            os.replace(tmp, path)
        except BaseException:
            with _suppress_oserror():
                os.unlink(tmp)
            raise
        _fsync_dir(directory)


@contextmanager
def _suppress_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    atomic_write(fs, path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with store_errors("read", path):
        return json.loads(fs.cat_file(path))


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run's directory (SPEC's layout)."""

    fs: fsspec.AbstractFileSystem
    dir: str

    @property
    def url(self) -> str:
        """What the child gets as SWEEPRUN_RUN_DIR: a path for local disk, a URL otherwise."""
        return self.dir if is_local(self.fs) else self.fs.unstrip_protocol(self.dir)

    @property
    def params(self) -> str:
        return posixpath.join(self.dir, "params.json")

    @property
    def checkpoints(self) -> str:
        return posixpath.join(self.dir, "checkpoints")

    @property
    def metrics(self) -> str:
        return posixpath.join(self.dir, "metrics.jsonl")

    @property
    def logs(self) -> str:
        return posixpath.join(self.dir, "logs")

    def log(self, attempt: int) -> str:
        return posixpath.join(self.logs, f"attempt-{attempt}.log")

    @property
    def done(self) -> str:
        return posixpath.join(self.dir, "DONE")

    @property
    def attempts(self) -> str:
        """``attempts/``: the durable record of every start of the run (the ledger may be rebuilt)."""
        return posixpath.join(self.dir, "attempts")

    def attempt_record(self, attempt: int) -> str:
        """``attempts/<n>.json``: written create-only by the launcher when it starts attempt ``n``."""
        return posixpath.join(self.attempts, f"{attempt}.json")

    def api_started(self, attempt: int) -> str:
        """``attempts/<n>.started``: written by ``sweeprun.init()`` under the launcher.

        Its presence says the script uses the training API, so exit 0 alone does not make
        the run done: :meth:`api_finished` must exist too.
        """
        return posixpath.join(self.attempts, f"{attempt}.started")

    def api_finished(self, attempt: int) -> str:
        """``attempts/<n>.finished``: written by ``Run.finish()`` after the final checkpoint."""
        return posixpath.join(self.attempts, f"{attempt}.finished")

    def is_done(self) -> bool:
        with store_errors("read", self.done):
            return self.fs.exists(self.done)

    def write_done(self, summary: dict[str, Any]) -> None:
        """Mark the run finished. Written last: everything it summarises is already durable."""
        write_json(self.fs, self.done, {"finished_at": time.time(), **summary})

    def read_done(self) -> dict[str, Any] | None:
        try:
            return read_json(self.fs, self.done)
        except (StoreError, ValueError, FileNotFoundError):
            return None


@dataclass(frozen=True)
class SweepPaths:
    """The sweep's folder: ``<store>/<sweep name>/`` with ``sweep.yaml`` and ``runs/``."""

    fs: fsspec.AbstractFileSystem
    dir: str

    @property
    def spec(self) -> str:
        return posixpath.join(self.dir, "sweep.yaml")

    @property
    def runs(self) -> str:
        return posixpath.join(self.dir, "runs")

    def run(self, run_id: str) -> RunPaths:
        if "/" in run_id or run_id in ("", ".", ".."):
            raise StoreError(f"run id {run_id!r} is not a safe path segment")
        return RunPaths(self.fs, posixpath.join(self.runs, run_id))

    def done_ids(self) -> set[str]:
        """Ids of finished runs, from one listing of the sweep (one LIST on object stores)."""
        with store_errors("list", self.runs):
            if not self.fs.exists(self.runs):
                return set()
            return {posixpath.basename(posixpath.dirname(p))
                    for p in self.fs.glob(posixpath.join(self.runs, "*", "DONE"))}

    def listing(self) -> dict[str, dict[str, float]]:
        """``run id -> {relative path: mtime}`` for every file of the sweep, from one recursive listing."""
        out: dict[str, dict[str, float]] = {}
        with store_errors("list", self.runs):
            if not self.fs.exists(self.runs):
                return out
            found = self.fs.find(self.runs, detail=True)
        prefix = self.runs.rstrip("/") + "/"
        for path, info in found.items():
            rel = path[len(prefix):] if path.startswith(prefix) else path
            run_id, _, inner = rel.partition("/")
            out.setdefault(run_id, {})[inner] = _mtime(info)
        return out


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
    return 0.0


@dataclass(frozen=True)
class Store:
    """A root on some fsspec filesystem under which sweeps live."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @property
    def canonical_url(self) -> str:
        """One spelling per place: what identifies the store (the default ledger is keyed by it).

        ``/x``, ``file:///x`` and a symlink to ``/x`` all give ``/x``, so two spellings of
        one store never get two ledgers.
        """
        if is_local(self.fs):
            return os.path.realpath(self.root)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.root}"

    def sweep(self, name: str) -> SweepPaths:
        return SweepPaths(self.fs, posixpath.join(self.root, name))

    def check_writable(self) -> None:
        """Fail early, before anything is written, when the store cannot hold a sweep.

        The root itself may be created, but not its parent: a missing parent
        usually means an unmounted drive, and creating it would silently put the
        sweep on the local disk of a machine that is about to disappear.
        """
        with store_errors("use store", self.url):
            if not self.fs.exists(self.root):
                parent = posixpath.dirname(self.root.rstrip("/"))
                if is_local(self.fs) and parent and not self.fs.exists(parent):
                    raise StoreError(f"store {self.url}: parent folder {parent} does not exist "
                                     "(is the drive mounted?); create it or choose another --store")
                if is_local(self.fs):
                    if not os.access(parent or "/", os.W_OK):
                        raise StoreError(f"store {self.url}: cannot create it in {parent}: "
                                         "permission denied; choose another --store")
                    return
            if is_local(self.fs):
                if not self.fs.isdir(self.root):
                    raise StoreError(f"store {self.url} is a file, not a folder; choose another --store")
                if not os.access(self.root, os.W_OK):
                    raise StoreError(f"store {self.url} is not writable; check its permissions "
                                     "or choose another --store")


def open_store(url: str) -> Store:
    """Resolve a path or fsspec URL (``./out``, ``memory://x``, ``s3://bucket/x``) to a :class:`Store`."""
    if not url or not str(url).strip():
        raise StoreError("store is empty; give a path or an fsspec URL with --store or `store:`")
    try:
        fs, root = fsspec.core.url_to_fs(str(url))
    except (ValueError, ImportError) as exc:
        raise StoreError(f"store {url}: {exc}".splitlines()[0]) from exc
    return Store(fs=fs, root=root.rstrip("/") or "/", url=str(url))
