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
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import StoreError
from .redact import redact

#: How much of a JSON state file (params, DONE, attempt records) is ever read: far above any
#: real one, far below what a stray multi-gigabyte file would cost in memory.
JSON_MAX_BYTES = 16 * 2**20

#: Filesystems that cannot hold a sweep: archives and read-only views. fsspec opens some of
#: them happily (``zip://x`` reads the current folder as a zip), so they are refused by name.
_READ_ONLY_PROTOCOLS = frozenset({"zip", "tar", "libarchive", "reference", "http", "https",
                                  "github", "git", "data", "jlab", "jupyter", "dask"})

#: Where the exceptions of storage backends come from (besides OSError): see store_errors.
_BACKEND_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure",
                    "aiohttp", "requests", "urllib3", "ftplib", "paramiko", "smbprotocol", "webdav4",
                    "huggingface_hub", "ocifs", "ossfs")


def _is_backend_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.split(".", 1)[0] in _BACKEND_MODULES


def _error(message: str) -> StoreError:
    """Every store message passes here: it may quote a URL, and URLs may carry credentials."""
    return StoreError(redact(" ".join(message.split())))


@contextmanager
def store_errors(action: str, path: str) -> Iterator[None]:
    """Turn low-level I/O errors into one actionable, redacted :class:`StoreError`.

    Besides ``OSError``, the exceptions storage backends define themselves (botocore,
    ftplib, aiohttp, ...) are the store failing. Everything else passes unchanged: a
    parse error inside the block (callers catch ``ValueError``) or a bug must not turn
    into "check that the store is reachable".
    """
    try:
        yield
    except StoreError as exc:
        if redact(str(exc)) == str(exc):
            raise
        raise _error(str(exc)) from exc.__cause__
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
        hint = {errno.ENOSPC: "free space on it and run the same command again",
                errno.EROFS: "the filesystem is read-only; remount it or choose another --store",
                errno.EACCES: "check its permissions or choose another --store",
                errno.EDQUOT: "the disk quota is exceeded; free space and run again"}.get(
                    exc.errno or 0, "check that the store is reachable and writable")
        if isinstance(exc, PermissionError) and not exc.errno:  # an object store said 403
            hint = ("check the store's credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE, ...) and their permissions on it")
        raise _error(f"cannot {action} {path}: {reason}; {hint}") from exc
    except Exception as exc:
        if not _is_backend_error(exc):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _error(f"cannot {action} {path}: {reason}; check that the store is reachable, "
                     "that its credentials are valid, and that it is writable") from exc


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


class StoreFileSystem(LocalFileSystem):
    """Local disk under one store's root: no write, delete or trusted read follows a link there.

    The store is a folder the user shares with other tools; a symlink left inside it
    (``done/`` pointing at a home folder, say) would make sweeprun write, prune or trust
    files outside the store. The root itself may be a link (Colab's ``My Drive``); every
    name below it is checked by :func:`confine`, which each fsspec entry point that
    writes, deletes or opens goes through, as do the helpers here that use ``os`` directly.
    """

    def __init__(self, store_root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store_root = os.path.normpath(store_root)

    def _open(self, path: Any, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        return super()._open(confine(self, path), mode, *args, **kwargs)

    def touch(self, path: Any, truncate: bool = True, **kwargs: Any) -> None:
        super().touch(confine(self, path), truncate, **kwargs)

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        super().makedirs(confine(self, path), exist_ok)

    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        super().mkdir(confine(self, path), create_parents, **kwargs)

    def rm_file(self, path: Any) -> None:
        super().rm_file(confine(self, path, leaf=False))

    def rmdir(self, path: Any) -> None:
        super().rmdir(confine(self, path, leaf=False))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = path if isinstance(path, list) else [path]
        super().rm([confine(self, p, leaf=False) for p in paths], recursive, maxdepth)

    def cp_file(self, path1: Any, path2: Any, **kwargs: Any) -> None:
        super().cp_file(confine(self, path1), confine(self, path2), **kwargs)

    def put_file(self, path1: Any, path2: Any, callback: Any = None, **kwargs: Any) -> None:
        super().put_file(path1, confine(self, path2), callback, **kwargs)

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None,
           **kwargs: Any) -> None:
        super().mv(confine(self, path1), confine(self, path2), recursive, maxdepth, **kwargs)

    def link(self, src: Any, dst: Any, **kwargs: Any) -> None:
        super().link(confine(self, src), confine(self, dst), **kwargs)

    def symlink(self, src: Any, dst: Any, **kwargs: Any) -> None:
        raise _error(f"cannot link {dst} to {src}: sweeprun puts no links in a store")


def confine(fs: fsspec.AbstractFileSystem, path: Any, *, leaf: bool = True) -> str:
    """``path`` as ``fs`` names it on disk, once no name between the store's root and it is
    a symbolic link (the last one too, unless ``leaf`` is ``False``: removing a link only
    removes the link). Every local write, delete and trusted read of a store starts here.

    Only a :class:`StoreFileSystem` has a root to check below; object stores have no
    links, and other local paths (a Trainer's output folder) are the user's own.
    """
    local = fs._strip_protocol(path) if is_local(fs) else path
    if not isinstance(fs, StoreFileSystem):
        return local
    rel = os.path.relpath(os.path.normpath(local), fs.store_root)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return local  # the root itself, or not the store's (a spool file, a temp folder)
    parts = rel.split(os.sep)
    current = fs.store_root
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            break  # missing (about to be created) or unreadable: the operation says so
        if stat.S_ISLNK(mode) and (leaf or i < len(parts) - 1):
            raise _link_error(current)
    return local


_GLOB_MAGIC = re.compile(r"([*?\[])")


def literal(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` as fsspec's pattern-expanding calls (``rm`` with a list or ``recursive``,
    ``copy``, ``expand_path``) must be given it to mean this path only.

    They take ``*?[`` as glob characters, so ``s3://b/out[1]/...`` would match
    ``s3://b/out1/...``: a reset would delete another store's run. Each one is escaped as
    a one-character class. Local disk's ``rm`` takes names as they are.
    """
    return path if is_local(fs) else _GLOB_MAGIC.sub(r"[\1]", path)


def remove(fs: fsspec.AbstractFileSystem, paths: list[str], *, recursive: bool = False) -> None:
    """Delete exactly ``paths`` (folders too, with ``recursive``): never what a pattern in
    their names matches (:func:`literal`), never through a link (:func:`confine`)."""
    if paths:
        fs.rm([literal(fs, p) for p in paths], recursive=recursive)


class StoreLinkError(StoreError):
    """A symlink inside the store where sweeprun would write, delete or read: not a passing
    failure of the store, so no retry can help; the user replaces it."""


def _link_error(path: str) -> StoreError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return StoreLinkError(redact(f"{path} is a symbolic link{target} inside the store; sweeprun never writes, "
                                "deletes or trusts files through a link there, since they would be outside "
                                "the store: replace it with a real folder or file (move its content in) and "
                                "run the same command again"))


def _proc_umask() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _swap_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Only where /proc cannot tell: read once at import, before the launcher starts any thread.
_FALLBACK_UMASK = _swap_umask() if _proc_umask() is None else 0o022


def current_umask() -> int:
    """The process umask, read without changing it.

    ``os.umask()`` can only be read by setting it, and a thread creating a file
    meanwhile would get the wrong mode; /proc/self/status (Linux >= 4.7) shows it as it
    is, so a umask the user sets after import is honoured too.
    """
    mask = _proc_umask()
    return _FALLBACK_UMASK if mask is None else mask


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one.

    On local disk: temp file in the same directory, fsync, rename, fsync of the
    directory, so the rename itself survives a power loss. On object stores a
    single ``pipe_file`` is one PUT, which is atomic by itself.
    """
    with store_errors("write", path):
        if not is_local(fs):
            fs.pipe_file(path, data)
            return
        path = confine(fs, path)
        directory = os.path.dirname(path)
        tmp = _durable_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            with _suppress_oserror():
                os.unlink(tmp)
            raise
        fsync_dir(directory)


def _durable_temp(path: str, data: bytes) -> str:
    """``data`` in a new, fsynced temp file beside ``path`` (its folder is created); its name.

    Both ways of putting a whole file in place (rename, link) start here.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        # mkstemp makes 0600; a store shared with a group must stay readable to it, as
        # any file the user's own tools create would be.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with _suppress_oserror():
            os.unlink(tmp)
        raise
    return tmp


def create_only(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` only if nothing is there yet; ``False`` when something was.

    This is what keeps a stale writer (a worker whose run was taken over while its
    machine was frozen) from replacing a file the live attempt relies on: ``DONE``,
    checkpoint manifests, attempt records. Readers see no file or the whole file.

    On object stores it is one conditional PUT (``If-None-Match: *``); the store itself
    refuses the second writer. On local disk the data goes to a temp file, is fsynced,
    and is hard-linked to ``path``: ``link()`` fails if the name exists, atomically,
    even on NFS (it is the classic NFS-safe lock), and a crash leaves only a temp file,
    never a torn ``path``. Filesystems without hard links (some FUSE mounts, e.g.
    Google Drive) fall back to ``O_EXCL``, still create-only but not all-or-nothing.
    """
    with store_errors("write", path):
        if not is_local(fs):
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        path = confine(fs, path)
        directory = os.path.dirname(path)
        tmp = _durable_temp(path, data)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                                     errno.ENOSYS, errno.EXDEV):
                    raise
                return _create_exclusive(path, data)
        finally:
            with _suppress_oserror():
                os.unlink(tmp)
        fsync_dir(directory)
        return True


def _create_exclusive(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(path))
    return True


@contextmanager
def _suppress_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


def fsync_dir(directory: str) -> None:
    """Make a rename or a new file in ``directory`` survive a power loss (local disk)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    atomic_write(fs, path, _json_bytes(obj))


def read_json(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """The JSON document at ``path``; a non-regular or oversized file is a :class:`StoreError`."""
    blob = read_regular(fs, path, max_bytes + 1)
    if len(blob) > max_bytes:
        raise _error(f"cannot read {path}: it is larger than {max_bytes} bytes, so it is not one "
                     "of sweeprun's files; move it away and run the same command again")
    try:
        return json.loads(blob)
    except RecursionError:
        # Callers catch ValueError (a damaged file) and StoreError; a stray file of a
        # hundred thousand "[" would otherwise escape both as a traceback.
        raise _error(f"cannot read {path}: it is nested too deeply to be one of sweeprun's "
                     "files; move it away and run the same command again") from None


def read_regular(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int, *,
                 tail: bool = False) -> bytes:
    """At most ``max_bytes`` of the regular file ``path``: its start, or its end with ``tail``.

    Anything else in the store (a named pipe called ``metrics.jsonl``, a symlink to
    ``/dev/zero``, a folder called ``DONE``) is a :class:`StoreError`, found before it is
    opened, so that reading the store can neither block forever nor fill memory.
    A missing file is a :class:`StoreError` whose cause is ``FileNotFoundError``.
    """
    with store_errors("read", path):
        if not is_local(fs):
            info = fs.info(path)
            if info.get("type") != "file":
                raise _not_regular(path, "a folder" if info.get("type") == "directory"
                                   else "something else")
            size = int(info.get("size") or 0)
            start = max(0, size - max_bytes) if tail else 0
            return bytes(fs.cat_file(path, start=start, end=min(size, start + max_bytes)))
        path = confine(fs, path)
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise _not_regular(path, _kind(before.st_mode))
        # O_NONBLOCK: should a pipe take the file's place after the check, opening it must
        # not wait for a writer; the fstat below then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
                raise _not_regular(path, _kind(now.st_mode))
            if tail and now.st_size > max_bytes:
                os.lseek(fd, now.st_size - max_bytes, os.SEEK_SET)
            chunks, left = [], max_bytes
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "something else"


def _not_regular(path: str, kind: str) -> StoreError:
    return _error(f"cannot read {path}: it is {kind}, not a regular file; "
                  "move it away and run the same command again")


def is_done_entry(name: str, info: dict[str, Any]) -> bool:
    """The one definition of done: the run's ``DONE`` is there and is a regular file.

    ``name`` is the path relative to the run folder and ``info`` an fsspec listing entry.
    A folder, pipe or device called ``DONE`` is not a finished run: reading it as one
    would fail, or hang, later.
    """
    return name == "DONE" and info.get("type") == "file"


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
        """``metrics.jsonl``, appended in place: local disk only (see :meth:`metrics_part`)."""
        return posixpath.join(self.dir, "metrics.jsonl")

    @property
    def metrics_parts(self) -> str:
        return posixpath.join(self.dir, "metrics")

    def metrics_part(self, attempt: int) -> str:
        """``metrics/attempt-<n>.jsonl``: on object stores, the metrics as attempt ``n`` sees them.

        An object cannot be appended to, only rewritten, so a shared ``metrics.jsonl``
        would let a fenced-out attempt clobber the live one's lines. Each attempt
        writes only its own object (the entries it resumed from, then its own), and
        the newest attempt's object is the run's metrics.
        """
        return posixpath.join(self.metrics_parts, f"attempt-{attempt}.jsonl")

    def current_metrics(self) -> str | None:
        """The file holding the run's metrics as a reader should see them, or ``None``."""
        if is_local(self.fs):
            return self.metrics
        with store_errors("list", self.metrics_parts):
            try:
                found = self.fs.ls(self.metrics_parts, detail=True)
            except FileNotFoundError:
                return None
        parts = {posixpath.basename(str(e["name"]).rstrip("/")): str(e["name"])
                 for e in found if e.get("type") == "file"}
        newest = newest_metrics_part(parts)
        return parts[newest] if newest else None

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
        """:func:`is_done_entry` on one listing of the run folder, as ``done_ids`` decides."""
        with store_errors("list", self.dir):
            try:
                entries = self.fs.ls(confine(self.fs, self.dir), detail=True)
            except FileNotFoundError:
                return False
        return any(is_done_entry(posixpath.basename(str(e["name"]).rstrip("/")), e)
                   for e in entries)

    @property
    def done_entry(self) -> str:
        """``<sweep>/done/<run id>``: the run's entry in the sweep's done index."""
        runs = posixpath.dirname(self.dir.rstrip("/"))
        return posixpath.join(posixpath.dirname(runs), "done", posixpath.basename(self.dir.rstrip("/")))

    def write_done(self, summary: dict[str, Any]) -> bool:
        """Mark the run finished; ``False`` when it already was (not an error: it is done).

        Written last (everything it summarises is already durable) and create-only, so
        a stale worker can never replace the live attempt's ``DONE``. An entry in the
        done index follows (see :meth:`SweepPaths.done_ids`); a crash between the two
        leaves a run that is done but unindexed, which the per-run check before every
        start still finds.
        """
        summary = {"finished_at": time.time(), **summary}
        wrote = create_only(self.fs, self.done, _json_bytes(summary))
        try:
            self.index_done(summary["finished_at"])
        except StoreError:
            pass  # only a hint: the check before every start finds DONE and adds the entry
        return wrote

    def index_done(self, finished_at: float | None = None) -> None:
        """Add the run to the done index. Also how a run found done without an entry (a
        crash between the two writes) gets one.

        Only the entry's name counts, and only while the run's ``DONE`` is there: on
        local disk its content is not fsynced, only its folder (the name must outlive a
        power loss, or a run the ledger has as done would be looked up on every launch).
        """
        data = _json_bytes({"finished_at": finished_at or time.time()})
        if not is_local(self.fs):
            create_only(self.fs, self.done_entry, data)
            return
        with store_errors("write", self.done_entry):
            entry = confine(self.fs, self.done_entry)
            _index_entry(entry, data)
            fsync_dir(os.path.dirname(entry))

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

    @property
    def identity(self) -> str:
        """``ID``: the sweep's id, created once (see :meth:`sweeprun.sweep.Sweep.ledger_key`)."""
        return posixpath.join(self.dir, "ID")

    @property
    def coordination(self) -> str:
        """``COORDINATION``: how the sweep's workers are kept apart (:mod:`sweeprun.fleet`)."""
        return posixpath.join(self.dir, "COORDINATION")

    def check_no_links(self) -> None:
        """Refuse, before anything is written, a sweep folder that is a link or holds one at its
        top (``done/``, ``runs/``, ``resets/``, ...): each write there would go through it. Deeper
        links (a run's ``logs/``) are refused by :func:`confine` when the run is touched."""
        if not isinstance(self.fs, StoreFileSystem):
            return
        with store_errors("list", self.dir):
            folder = confine(self.fs, self.dir)
            try:
                with os.scandir(folder) as entries:
                    links = sorted(e.path for e in entries if e.is_symlink())
            except (FileNotFoundError, NotADirectoryError):
                return
        if links:
            raise _link_error(links[0])

    def run(self, run_id: str) -> RunPaths:
        if "/" in run_id or run_id in ("", ".", ".."):
            raise StoreError(f"run id {run_id!r} is not a safe path segment")
        return RunPaths(self.fs, posixpath.join(self.runs, run_id))

    @property
    def done_index(self) -> str:
        """``done/``: one entry per finished run, beside ``runs/``."""
        return posixpath.join(self.dir, "done")

    @property
    def done_index_complete(self) -> str:
        """``done/.complete``: says that every run done before it was written has an entry.

        Sweeps from before local disk had a done index have none; their first launch
        indexes them (:meth:`done_ids`). No run id starts with a dot.
        """
        return posixpath.join(self.done_index, ".complete")

    def done_ids(self, listing: dict[str, dict[str, float]] | None = None, *,
                 prune_stale: bool = False) -> set[str]:
        """Ids of finished runs (:func:`is_done_entry`).

        Given the result of :meth:`listing`, it costs no I/O at all, so a caller that
        lists anyway (status) uses the same definition for free. Otherwise the done
        index is read: a glob would look into every run folder (10,000 folder reads and
        50,000 stats for 10,000 runs on local disk; a LIST of every checkpoint and log on
        object stores). It costs two listings: one directory pass each on local disk,
        one LIST request per 1,000 runs each on object stores. The store stays the
        truth: an entry counts only while its run's folder exists, since deleting a
        run's folder is how a user asks for a re-run. ``prune_stale`` (for launchers,
        which write anyway) deletes such orphaned entries, before the re-run can
        recreate the folder; the folders are listed before the index so that a launcher
        pruning meanwhile cannot make a re-run look done. A run done but not indexed
        (a crash between ``DONE`` and its entry) is found by the check before every start.

        On local disk, a sweep whose index was never completed (written by an older
        sweeprun) is globbed as before; a launcher (``prune_stale``) then indexes it, once.
        """
        if listing is not None:
            return {run_id for run_id, files in listing.items() if "DONE" in files}
        if is_local(self.fs) and not self._exists(self.done_index_complete):
            return self._index_old_sweep(prune_stale)
        present = self.run_ids()
        indexed = {name for name in self._names(self.done_index, files_only=True)
                   if not name.startswith(".")}
        if is_local(self.fs):
            # A stat per indexed run (milliseconds for 10,000): a DONE deleted by hand is
            # a re-run here as it is in `status`, which sees the DONE files themselves.
            runs = confine(self.fs, self.runs)
            present = {run_id for run_id in present & indexed
                       if _regular_file(os.path.join(runs, run_id, "DONE"))}
        if prune_stale:
            # Listed again after the index: a run started and finished between the two
            # listings has a folder now, and its fresh entry must stay.
            stale = indexed - present
            if stale and not is_local(self.fs):
                stale -= self.run_ids()
            for run_id in stale:
                with store_errors("delete", self.done_index), _suppress_missing():
                    self.fs.rm_file(posixpath.join(self.done_index, run_id))
        return indexed & present


    def _index_old_sweep(self, write: bool) -> set[str]:
        """Done runs of a local sweep without a complete index, by one listing of ``runs/``
        and a look at each run's DONE; ``write``: give each an entry, then mark the index
        complete."""
        with store_errors("list", self.runs):
            runs = confine(self.fs, self.runs)
            done = {run_id for run_id in self.run_ids()
                    if _regular_file(os.path.join(runs, run_id, "DONE"))}
        if write:
            with store_errors("write", self.done_index):
                folder = confine(self.fs, self.done_index)
                for run_id in done:
                    _index_entry(os.path.join(folder, run_id), b"{}")
                os.makedirs(folder, exist_ok=True)
                fsync_dir(folder)
            create_only(self.fs, self.done_index_complete, b"")
        return done

    def _exists(self, path: str) -> bool:
        with store_errors("read", path):
            return bool(self.fs.exists(confine(self.fs, path)))

    def run_ids(self) -> set[str]:
        """Ids of the runs that have a folder in the store (one listing of ``runs/``)."""
        return self._names(self.runs)

    def _names(self, folder: str, files_only: bool = False) -> set[str]:
        with store_errors("list", folder):
            try:
                if is_local(self.fs):
                    # os.scandir, not fs.ls: ls stats every entry, scandir reads only names and types
                    with os.scandir(confine(self.fs, folder)) as entries:
                        return {e.name for e in entries if not e.is_symlink()
                                and (not files_only or e.is_file(follow_symlinks=False))}
                found = self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return set()
        return {posixpath.basename(str(e["name"]).rstrip("/")) for e in found
                if not files_only or e.get("type") == "file"}

    def listing(self, only: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
        """``run id -> {relative path: mtime}`` for every regular file of the sweep, from one listing.

        Only regular files are listed (see :func:`is_done_entry`): ``"DONE" in
        listing[run_id]`` means the run is done, and a named pipe called
        ``metrics.jsonl`` never reaches a reader. ``only``: just these runs' folders, one
        listing each (what ``status`` needs of a big sweep whose most runs are done).
        """
        out: dict[str, dict[str, float]] = {}
        prefix = self.runs.rstrip("/") + "/"
        with store_errors("list", self.runs):
            if is_local(self.fs):
                tops = [self.runs] if only is None else [prefix + run_id for run_id in only]
                for top in tops:
                    for path, mtime in _local_files(confine(self.fs, top)):
                        run_id, _, inner = path[len(prefix):].partition("/")
                        out.setdefault(run_id, {})[inner] = mtime
                return out
            if not self.fs.exists(self.runs):
                return out
            if only is None:
                found = self.fs.find(self.runs, detail=True)
            else:
                found = {}
                for run_id in only:
                    found.update(self.fs.find(posixpath.join(self.runs, run_id), detail=True))
        for path, info in found.items():
            if info.get("type") != "file":
                continue
            rel = path[len(prefix):] if path.startswith(prefix) else path
            run_id, _, inner = rel.partition("/")
            out.setdefault(run_id, {})[inner] = _mtime(info)
        return out


def _local_files(top: str) -> Iterator[tuple[str, float]]:
    """``(path, mtime)`` of every regular file under ``top`` on local disk, as fsspec's
    ``find`` lists them (a link is not a file: a linked ``DONE`` is not a finished run, as
    :meth:`RunPaths.is_done` agrees, and a linked ``metrics.jsonl`` is never read) but in
    one ``scandir`` pass per folder: fsspec stats every entry through its own ``info`` and
    a status of 10,000 runs spent two seconds there. Linked folders are not entered (a link
    loop in a run folder would never end); a missing ``top`` is an empty listing."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path, entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # removed since the folder was read
                continue


def _index_entry(path: str, data: bytes) -> None:
    """A done-index entry on local disk: created if missing, never replaced, not fsynced."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _regular_file(path: str) -> bool:
    """Is ``path`` a regular file, not a link to one (a linked ``DONE`` is not a finished run)?"""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


@contextmanager
def _suppress_missing() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        pass


_METRICS_PART = re.compile(r"^attempt-([1-9][0-9]{0,17})\.jsonl$")


def newest_metrics_part(names: Iterable[str]) -> str | None:
    """The name among ``metrics/`` entries that belongs to the highest attempt."""
    numbered = [(int(m.group(1)), name) for name in names if (m := _METRICS_PART.match(name))]
    return max(numbered)[1] if numbered else None


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

        ``/x``, ``file:///x``, ``x/../x``, ``~/x``, ``/x/`` and a path through a symlink to
        ``/x`` all give ``/x`` (Colab's ``My Drive`` is a symlink to ``MyDrive``): two
        spellings of one store must never get two ledgers, or every run executes twice
        at once. A URL gives protocol, host and path, never credentials or a query.
        """
        if is_local(self.fs):
            return os.path.realpath(self.root)
        protocol = self.protocol
        path = self.root.strip("/")
        try:
            parts = urlsplit(self.url) if "://" in self.url else None
        except ValueError:  # "ftp://[x": the backend took it; its host is not shown
            parts = None
        host = (parts.hostname or "") if parts else ""
        try:
            port = parts.port if parts else None
        except ValueError:  # not a number: no port, as the backend saw it
            port = None
        if port:
            host += f":{port}"
        # s3fs and memory:// keep the bucket (or first segment) in ``root``; ftp:// and
        # sftp:// keep the host in the filesystem's options instead, so it is added here.
        if host and not type(self.fs)._strip_protocol(f"{protocol}://sweeprun-probe/p").lstrip(
                "/").startswith("sweeprun-probe"):
            path = f"{host}/{path}" if path else host
        return redact(f"{protocol}://{path}".split("?", 1)[0].split("#", 1)[0])

    @property
    def protocol(self) -> str:
        return self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]

    def first_contact(self) -> fsspec.AbstractFileSystem:
        """The filesystem for the checks that open a store: on s3://, few retries and a short
        connect timeout (:data:`S3_FIRST_CONTACT`), with everything else as configured."""
        if self.protocol not in ("s3", "s3a"):
            return self.fs
        options = dict(self.fs.storage_options)
        options["config_kwargs"] = {**options.get("config_kwargs", {}), **S3_FIRST_CONTACT}
        return type(self.fs)(**options)

    def _check_bucket(self, fs: fsspec.AbstractFileSystem, next_step: str) -> None:
        """A missing bucket is a wrong URL (or a store not made yet), not a sweep not started."""
        if self.protocol not in _BUCKETED:
            return
        bucket = self.root.strip("/").split("/", 1)[0]
        # The root first: an unreachable endpoint raises there, where a bucket's own check
        # (s3fs's exists) would say only "no such bucket".
        if bucket and not fs.exists(self.root) and not fs.exists(bucket):
            raise _error(f"store {self.url}: bucket {bucket} does not exist, or cannot be reached "
                         f"with this endpoint and these credentials; {next_step}")

    def sweep(self, name: str) -> SweepPaths:
        return SweepPaths(self.fs, posixpath.join(self.root, name))

    def check_present(self) -> None:
        """For readers: a local store whose parent folder is missing is an unmounted drive,
        not a sweep that has not started; saying "all pending" there would mislead. So is
        an object store's missing bucket."""
        if not is_local(self.fs):
            with store_errors("use store", self.url):
                self._check_bucket(self.first_contact(), "check the URL, the endpoint "
                                   "(AWS_ENDPOINT_URL) and the credentials, or give the right --store")
            return
        with store_errors("use store", self.url):
            parent = posixpath.dirname(self.root.rstrip("/"))
            if not self.fs.exists(self.root) and parent and not self.fs.exists(parent):
                raise _error(f"store {self.url}: parent folder {parent} does not exist "
                             "(is the drive mounted?); mount it or give the right --store")

    def check_writable(self) -> None:
        """Fail early, before anything is written, when the store cannot hold a sweep.

        The root itself may be created, but not its parent: a missing parent
        usually means an unmounted drive, and creating it would silently put the
        sweep on the local disk of a machine that is about to disappear.
        """
        with store_errors("use store", self.url):
            if not is_local(self.fs):
                self._check_bucket(self.first_contact(), "create it, or check the URL, the "
                                   "endpoint (AWS_ENDPOINT_URL) and the credentials")
                return
            if not self.fs.exists(self.root):
                parent = posixpath.dirname(self.root.rstrip("/"))
                if is_local(self.fs) and parent and not self.fs.exists(parent):
                    raise _error(f"store {self.url}: parent folder {parent} does not exist "
                                 "(is the drive mounted?); create it or choose another --store")
                if is_local(self.fs):
                    if not os.path.isdir(parent or "/"):
                        raise _error(f"store {self.url}: {parent} is not a folder; "
                                     "choose another --store")
                    if not os.access(parent or "/", os.W_OK):
                        raise _error(f"store {self.url}: cannot create it in {parent}: "
                                     "permission denied; choose another --store")
                    return
            if is_local(self.fs):
                if not self.fs.isdir(self.root):
                    raise _error(f"store {self.url} is a file, not a folder; choose another --store")
                if not os.access(self.root, os.W_OK):
                    raise _error(f"store {self.url} is not writable; check its permissions "
                                 "or choose another --store")


def open_store(url: str) -> Store:
    """Resolve a path or fsspec URL (``./out``, ``memory://x``, ``s3://bucket/x``) to a :class:`Store`.

    Every way this can fail (unknown or read-only protocol, backend not installed,
    host unreachable, a path that is not UTF-8) is one redacted :class:`StoreError`.
    """
    if not url or not str(url).strip():
        raise StoreError("store is empty; give a path or an fsspec URL with --store or `store:`")
    url = str(url)
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        shown = url.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise _error(f"store {shown} is not valid UTF-8 (a file name in another encoding?); "
                     "rename the folder or choose another --store") from None
    protocol = url.split("://", 1)[0].lower() if "://" in url else ""
    if "::" in url:
        raise _error(f"store {url}: chained URLs (a::b) are not supported as a store; use a local "
                     "path or an object store URL such as s3://bucket/x")
    if protocol in _READ_ONLY_PROTOCOLS:
        raise _error(f"store {url}: {protocol}:// is read-only and cannot hold a sweep; use a local "
                     "path or an object store URL such as s3://bucket/x")
    _check_url(url, protocol)
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options(protocol))
    except ValueError as exc:
        if str(exc).startswith("Protocol not known"):
            raise _error(f"store {url}: Protocol not known: {protocol}://; use a local path or "
                         "an fsspec URL such as s3://bucket/x or gs://bucket/x") from exc
        raise _error(f"store {url}: {_first_line(exc)}") from exc
    except ImportError as exc:
        if protocol in ("s3", "s3a"):
            raise _error(f"store {url}: s3:// stores need s3fs: pip install 'sweeprun[s3]'") from exc
        raise _error(f"store {url}: {_first_line(exc)}; install it and run the same command "
                     "again") from exc
    except OSError as exc:
        reason = exc.strerror or _first_line(exc)
        raise _error(f"store {url}: cannot connect: {reason}; check that the store is reachable "
                     "and its URL is right") from exc
    except Exception as exc:  # a backend failing in its constructor (auth, network, ...)
        raise _error(f"store {url}: cannot open it: {_first_line(exc)}") from exc
    root = root.rstrip("/") or "/"
    if is_local(fs):
        fs = StoreFileSystem(store_root=root)
    return Store(fs=fs, root=root, url=url)


#: Object stores whose first segment is a bucket name, which never holds ``@`` or ``:``: one
#: that does is credentials (``s3://KEY:SECRET@bucket``, the secret perhaps holding ``/``).
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})
_SHOWN_TAIL = re.compile(r"[A-Za-z0-9._-]+(?:/[^?#=&@\s]*)?")


def _check_url(url: str, protocol: str) -> None:
    """Refuse what a store URL must not carry, without ever quoting it.

    Credentials: the URL is copied into logs, messages and every run's
    ``SWEEPRUN_RUN_DIR``. A query string or fragment: fsspec would take it as part of the
    path, so options there (``?secret_access_key=...``) would end up in every object's key.
    Only what surely follows the credentials and holds no option is shown.
    """
    if not protocol or protocol in ("file", "local"):
        return
    rest = url.split("://", 1)[1]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if protocol in _BUCKET_PROTOCOLS and ("@" in authority or ":" in authority):
        tail = url.rsplit("@", 1)[1] if "@" in url else ""
        shown = f"{protocol}://***@{tail}" if _SHOWN_TAIL.fullmatch(tail) else f"{protocol}://***"
        raise StoreError(f"store {shown}: credentials do not belong in the store URL (it is copied "
                         "into logs and the store); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(or AWS_PROFILE) in the environment and give s3://bucket/path")
    if "?" in rest or "#" in rest:
        head = f"{protocol}://..." if "@" in url else re.split(r"[?#]", url, maxsplit=1)[0] + "?..."
        raise _error(f"store {head}: a store URL takes no query string or fragment (?... or "
                     "#...): fsspec would make it part of every object's name, credentials "
                     "included; set options in the environment (AWS_ENDPOINT_URL, "
                     "AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) or in fsspec's configuration "
                     "(~/.config/fsspec/), and give the URL without them")


#: Object stores whose filesystems cache listings (fsspec's DirCache).
_LISTING_CACHES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
#: botocore's retries for s3://: "adaptive" backs off on throttling (503 SlowDown) and
#: transient errors and slows the client down; s3fs adds its own retries on top.
S3_RETRIES = {"mode": "adaptive", "max_attempts": 10}
#: The first contact with an s3:// store (:meth:`Store.check_writable`, :meth:`Store.check_present`):
#: a dead endpoint or a wrong URL is bad input, said in seconds, not after a minute of the
#: backoff above meant for a live store that stumbles.
S3_FIRST_CONTACT = {"connect_timeout": 3, "read_timeout": 20,
                    "retries": {"mode": "standard", "max_attempts": 2}}
#: Protocols whose root starts with a bucket (container) that must exist.
_BUCKETED = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def storage_options(protocol: str) -> dict[str, Any]:
    """What sweeprun asks of a backend beyond the user's fsspec configuration.

    No listing cache: a long-lived worker must see what other machines wrote (a newer
    attempt's checkpoint is exactly what a stale writer has to notice). Retries with
    backoff for S3. Endpoint and credentials are never here: they come from the
    standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as for any AWS tool.
    """
    options: dict[str, Any] = {}
    if protocol in _LISTING_CACHES:
        options["use_listings_cache"] = False
    if protocol in ("s3", "s3a"):
        configured = fsspec.config.conf.get(protocol, {}).get("config_kwargs", {})
        if "retries" not in configured:
            options["config_kwargs"] = {**configured, "retries": dict(S3_RETRIES)}
    return options


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
