"""Local disk: temp file, fsync, rename, fsync of the folder; ``link()`` for create-only;
and no write, delete or trusted read through a symbolic link inside the store."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .base import TEMP_PREFIX, Sink, StoreBackend
from .errors import _error, _link_error, store_errors


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Is ``fs`` this machine's disk? Only the store package asks: elsewhere the answer is a
    method of the store's backend (:func:`sweeprun.store.backends.backend_for`)."""
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


def _durable_temp(path: str, data: bytes) -> str:
    """``data`` in a new, fsynced temp file beside ``path`` (its folder is created); its name.

    Both ways of putting a whole file in place (rename, link) start here.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path))
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


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "something else"


def _not_regular(path: str, kind: str) -> Exception:
    return _error(f"cannot read {path}: it is {kind}, not a regular file; "
                  "move it away and run the same command again")


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


def _is_link(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


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


def mount_fstype(path: str | Path) -> str | None:
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


class LocalBackend(StoreBackend):
    """This machine's disk (and NFS): rename and ``link()`` are atomic, fsync makes them durable."""

    kind = "local"
    appendable = True
    renames_folders = True

    def atomic_write(self, path: str, data: bytes) -> None:
        # Temp file in the same folder, fsync, rename, fsync of the folder, so the rename
        # itself survives a power loss.
        with store_errors("write", path):
            path = confine(self.fs, path)
            directory = os.path.dirname(path)
            tmp = _durable_temp(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                with _suppress_oserror():
                    os.unlink(tmp)
                raise
            fsync_dir(directory)

    def create_only(self, path: str, data: bytes) -> bool:
        # The data goes to a fsynced temp file that is hard-linked to ``path``: ``link()``
        # fails if the name exists, atomically, even on NFS (the classic NFS-safe lock), and
        # a crash leaves only a temp file, never a torn ``path``. Filesystems without hard
        # links (some FUSE mounts, e.g. Google Drive) fall back to ``O_EXCL``: still
        # create-only, but not all-or-nothing.
        with store_errors("write", path):
            path = confine(self.fs, path)
            directory = os.path.dirname(path)
            tmp = _durable_temp(path, data)
            try:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in _NO_LINKS:
                        raise
                    return _create_exclusive(path, data)
            finally:
                with _suppress_oserror():
                    os.unlink(tmp)
            fsync_dir(directory)
            return True

    @contextmanager
    def stream_write(self, path: str, *, create_only: bool = False, temp_prefix: str = TEMP_PREFIX,
                     temp_suffix: str = "", before_commit: Callable[[], None] | None = None,
                     ) -> Iterator[Sink]:
        # Streamed into a temp file beside ``path``, fsynced, then renamed (or, create-only,
        # linked) into place and the folder fsynced.
        won = True
        with store_errors("write", path):
            path = confine(self.fs, path)
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix, suffix=temp_suffix)
            try:
                os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: honour the umask
                with os.fdopen(fd, "wb") as f:
                    def sync() -> None:
                        f.flush()
                        os.fsync(f.fileno())
                    sink = Sink(f, fd=f.fileno(), _sync=sync)
                    yield sink
                    if not sink.synced:
                        sink.sync()
                if before_commit is not None:
                    before_commit()
                if create_only:
                    won = _link_into_place(tmp, path)
                else:
                    os.replace(tmp, path)
            except BaseException:
                with _suppress_oserror():
                    os.unlink(tmp)
                raise
            if create_only:
                with _suppress_oserror():
                    os.unlink(tmp)
            if won:
                fsync_dir(directory)
        if not won:
            raise FileExistsError(errno.EEXIST, "another writer's file is there", path)

    def makedirs(self, path: str) -> None:
        with store_errors("create", path):
            os.makedirs(confine(self.fs, path), exist_ok=True)

    def read_regular(self, path: str, max_bytes: int, *, tail: bool = False) -> bytes:
        with store_errors("read", path):
            path = confine(self.fs, path)
            before = os.stat(path)
            if not stat.S_ISREG(before.st_mode):
                raise _not_regular(path, _kind(before.st_mode))
            # O_NONBLOCK: should a pipe take the file's place after the check, opening it must
            # not wait for a writer; the fstat below then refuses it.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            try:
                now = os.fstat(fd)
                if not stat.S_ISREG(now.st_mode):
                    raise _not_regular(path, _kind(now.st_mode))
                if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino) and _is_link(path):
                    # Another file since the check: the whole new one of an atomic write is
                    # fine to read, but not one reached through a link put in its place.
                    raise _link_error(path)
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

    def size(self, path: str) -> int:
        with store_errors("read", path):
            return os.stat(self.fs._strip_protocol(path)).st_size

    def read_range(self, path: str, start: int, end: int) -> bytes:
        # Opened without blocking and checked again, so a pipe put in its place is refused.
        with store_errors("read", path):
            fd = os.open(self.fs._strip_protocol(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise _error(f"cannot read {path}: it is no longer a regular file; "
                                 "move it away and run the same command again")
                return os.pread(fd, end - start, start)
            finally:
                os.close(fd)

    def exists(self, path: str) -> bool:
        with store_errors("read", path):
            return os.path.lexists(confine(self.fs, path))

    def entries(self, folder: str) -> dict[str, bool]:
        # os.scandir, not fs.ls: ls stats every entry, scandir reads only names and types
        with store_errors("list", folder):
            try:
                with os.scandir(confine(self.fs, folder)) as found:
                    return {e.name: e.is_file(follow_symlinks=False) for e in found}
            except (FileNotFoundError, NotADirectoryError):
                return {}

    def files(self, top: str) -> dict[str, float]:
        with store_errors("list", top):
            return dict(_local_files(confine(self.fs, top)))

    def move(self, src: str, dst: str) -> None:
        with store_errors("move", src):
            local_src, local_dst = confine(self.fs, src, leaf=False), confine(self.fs, dst)
            os.makedirs(os.path.dirname(local_dst), exist_ok=True)
            os.replace(local_src, local_dst)
            fsync_dir(os.path.dirname(local_dst))
            if os.path.dirname(local_src) != os.path.dirname(local_dst):
                fsync_dir(os.path.dirname(local_src))

    def delete(self, paths: Iterable[str], *, recursive: bool = False) -> None:
        paths = list(paths)
        if paths:  # StoreFileSystem.rm confines every path; local rm takes names literally
            self.fs.rm(paths, recursive=recursive)

    def delete_file(self, path: str, *, set_aside: str | None = None) -> None:
        with store_errors("delete", path):
            local = confine(self.fs, path, leaf=False)
            try:
                if not stat.S_ISREG(os.lstat(local).st_mode):
                    return  # a link or anything odd someone put there is left alone
                if set_aside is None:
                    os.unlink(local)
                    return
                aside = confine(self.fs, set_aside)
                try:
                    os.replace(local, aside)
                except FileNotFoundError:
                    return
                except OSError:
                    os.unlink(local)
                    return
            except FileNotFoundError:
                return
        unlink = threading.Thread(target=_unlink_quietly, args=(aside,), name="sweeprun-delete", daemon=True)
        unlink.start()
        with _UNLINKING_LOCK:       # those already done go: a long run settles only at its end
            _UNLINKING[:] = [*(t for t in _UNLINKING if t.is_alive()), unlink]

    def settle(self) -> None:
        with _UNLINKING_LOCK:
            pending, _UNLINKING[:] = list(_UNLINKING), []
        for unlink in pending:
            unlink.join()

    def native_path(self, path: str) -> str | None:
        return str(self.fs._strip_protocol(path))


#: What ``link()`` fails with where a filesystem has no hard links.
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV)


def _link_into_place(tmp: str, path: str) -> bool:
    """Put the whole file ``tmp`` at ``path`` unless a file is there; whether it was put.

    Without hard links there is no exclusive rename in Python's reach: a check, then a
    rename (two writers of one name within that moment: the later one wins)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    if os.path.lexists(path):
        return False
    os.replace(tmp, path)
    return True


#: Unlinks on helper threads not yet waited for (:meth:`LocalBackend.settle`). Daemons: a
#: process that exits without settling leaves the set-aside file, which the next prune removes.
_UNLINKING: list[threading.Thread] = []
_UNLINKING_LOCK = threading.Lock()


def _unlink_quietly(path: str) -> None:
    with _suppress_oserror():
        os.unlink(path)
