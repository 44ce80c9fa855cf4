"""The store interface: every way sweeprun reads, writes, lists, moves and deletes files
of a store, as one abstract class with one implementation per kind of store.

The kinds differ in what they can promise, and each promise is kept here rather than in
the modules that use the store: local disk renames and fsyncs, and refuses links; an
object store has neither links nor renames but offers single-request writes and
conditional PUTs; a late folder (a FUSE-mounted Google Drive) is local disk whose view of
other machines' writes lags. Which one a filesystem gets is decided in one place,
:func:`sweeprun.store.backends.backend_for`.

Paths are what fsspec calls them (``/abs/path`` on local disk, ``bucket/key`` on S3),
never URLs. Every method may raise :class:`~sweeprun.errors.StoreError` (redacted, with
the next step for the user); a missing file is one whose ``__cause__`` is
``FileNotFoundError`` where a method says so.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar

import fsspec

from .errors import _error
from .layout import TEMP_PREFIX as TEMP_PREFIX

#: How much of a JSON state file (params, DONE, attempt records) is ever read: far above any
#: real one, far below what a stray multi-gigabyte file would cost in memory.
JSON_MAX_BYTES = 16 * 2**20

#: TEMP_PREFIX (``.tmp-``, from the layout): the prefix of every temp file the store writes
#: beside its target. No run id, checkpoint or record name starts with a dot, so a crashed
#: write's leftover is known.

#: Part size of a streaming write to an object store: what it holds in memory (S3 allows
#: 10,000 parts: 500 GiB at this size).
UPLOAD_PART_BYTES = 50 * 2**20


def json_bytes(obj: Any) -> bytes:
    """The one encoding of sweeprun's JSON state files: sorted keys, so equal content is equal bytes."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


@dataclass
class Sink:
    """The file a streaming write (:meth:`StoreBackend.stream_write`) goes into.

    ``fd``: its descriptor where it is a local file (for writeback hints), else ``None``.
    ``part_bytes``: where the store buffers a part in memory, the size to hand it writes
    in (a tensor's whole storage written at once would be copied whole into the buffer).
    """

    file: IO[bytes]
    fd: int | None = None
    part_bytes: int | None = None
    _sync: Callable[[], None] | None = field(default=None, repr=False)
    synced: bool = False

    def sync(self) -> None:
        """Make what was written so far durable now (fsync on local disk; a no-op where the
        commit itself makes it durable), so that the caller can overlap other work with it."""
        if self._sync is not None:
            self._sync()
        self.synced = True


class StoreBackend(ABC):
    """One kind of store, over its fsspec filesystem ``fs``.

    Promises every implementation keeps (the shipped contract,
    :mod:`sweeprun.store.contract`, checks each of them):

    - a reader sees a file whole or not at all, never a partial write;
    - a create-only write has exactly one winner, the others get ``False``;
    - a bounded read never returns more than asked and refuses anything but a regular file
      (a folder, a pipe, a link) before opening it, so reading cannot block or fill memory;
    - listings and deletes never follow a symbolic link: a link is not a file, a folder
      behind one is not entered, deleting one removes at most the link;
    - a path is a literal name, never a pattern (``out[1]`` does not match ``out1``).

    Thread-safe, as the filesystem is: no method keeps state between calls.
    """

    #: ``"local"``, ``"object"`` or ``"late"``: for messages and tests; behaviour hangs off
    #: the methods, never off comparing this.
    kind: ClassVar[str]

    #: Can a file be appended to in place (a log, ``metrics.jsonl``)? Where not (an object
    #: is only ever rewritten whole), each writer keeps its own file, so that a fenced-out
    #: writer cannot clobber the live one's lines.
    appendable: bool = False
    #: Does a folder move in one atomic rename? Where not, a move is a copy and a delete,
    #: and callers order them so that a kill half-way leaves nothing that looks finished.
    renames_folders: bool = False

    #: How long a claim must settle before it is trusted (see :mod:`sweeprun.leases`): zero
    #: where a create-only write is seen by every machine at once.
    settle_s: float = 0.0
    #: Why :attr:`settle_s` is not zero, for the user; ``None`` where it is.
    settle_why: str | None = None

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    # -- writes ---------------------------------------------------------------------------

    @abstractmethod
    def atomic_write(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data``: readers see the old file or the whole new one,
        and once this returns the new one survives a crash. Parent folders are created."""

    @abstractmethod
    def create_only(self, path: str, data: bytes) -> bool:
        """Write ``data`` at ``path`` only if nothing is there yet; ``False`` when something
        was (losing a race is not an error). Readers see no file or the whole file.

        What keeps a stale writer (a worker whose run was taken over while its machine was
        frozen) from replacing a file the live attempt relies on: ``DONE``, checkpoint
        manifests, attempt records, lease generations."""

    @abstractmethod
    def stream_write(self, path: str, *, create_only: bool = False, temp_prefix: str = TEMP_PREFIX,
                     temp_suffix: str = "", before_commit: Callable[[], None] | None = None,
                     ) -> AbstractContextManager[Sink]:
        """Write a file too big to hold in memory: the block writes into the yielded
        :class:`Sink`; when it ends without an error, ``before_commit`` runs and the file
        appears whole at ``path``; on an error nothing appears (a process killed meanwhile
        may leave a temp file named ``temp_prefix...temp_suffix`` beside it, or an
        incomplete upload). With ``create_only``, ``FileExistsError`` (not a
        :class:`StoreError`) says another writer's file was there first."""

    def write_json(self, path: str, obj: Any) -> None:
        self.atomic_write(path, json_bytes(obj))

    @abstractmethod
    def makedirs(self, path: str) -> None:
        """Create the folder ``path`` and its parents, if missing (a no-op where folders are
        only prefixes of names)."""

    # -- reads ----------------------------------------------------------------------------

    @abstractmethod
    def read_regular(self, path: str, max_bytes: int, *, tail: bool = False) -> bytes:
        """At most ``max_bytes`` of the regular file ``path``: its start, or its end with
        ``tail``. Anything else (a named pipe, a link to ``/dev/zero``, a folder called
        ``DONE``) is a :class:`StoreError`; so is a missing file, with ``FileNotFoundError``
        as its cause."""

    def read_json(self, path: str, max_bytes: int = JSON_MAX_BYTES) -> Any:
        """The JSON document at ``path``; a non-regular or oversized file is a :class:`StoreError`
        (``ValueError`` for one that does not parse)."""
        blob = self.read_regular(path, max_bytes + 1)
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

    def read_if_present(self, path: str, max_bytes: int) -> bytes | None:
        """At most ``max_bytes`` of a small file, ``None`` if it is missing: for files that
        come and go (lease records), where a missing one is an answer, not an error."""
        from .errors import StoreError

        try:
            return self.read_regular(path, max_bytes)
        except StoreError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise

    @abstractmethod
    def size(self, path: str) -> int:
        """The size in bytes of the file ``path`` (``FileNotFoundError`` if missing)."""

    @abstractmethod
    def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file :meth:`read_regular` found regular; one that is
        no longer regular is refused."""

    # -- listings -------------------------------------------------------------------------

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Is there a file or folder at ``path`` (a link on local disk counts: it occupies the name)?"""

    @abstractmethod
    def entries(self, folder: str) -> dict[str, bool]:
        """``name -> is a regular file`` for each entry of ``folder`` (a link is not a regular
        file; a sub-folder is ``False``); a missing folder is an empty listing."""

    @abstractmethod
    def files(self, top: str) -> dict[str, float]:
        """``path -> mtime`` (seconds since the epoch) of every regular file under ``top``,
        at any depth; folders behind links are not entered; a missing ``top`` is empty."""

    # -- moves and deletes ----------------------------------------------------------------

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Move the file ``src`` to ``dst`` (replacing a file there); ``FileNotFoundError``
        as the cause when ``src`` is missing."""

    @abstractmethod
    def delete(self, paths: Iterable[str], *, recursive: bool = False) -> None:
        """Delete exactly ``paths`` (folders too, with ``recursive``): never what a pattern in
        their names matches, never through a link (a link itself is refused).

        Errors are the filesystem's own (``FileNotFoundError`` for a missing path): callers
        that delete what may be gone already catch that, inside their :func:`store_errors`."""

    @abstractmethod
    def delete_file(self, path: str, *, set_aside: str | None = None) -> None:
        """Remove the regular file ``path``; a missing file, a link or anything else is left
        alone. With ``set_aside``, where unlinking a big file costs time (local disk), it is
        first renamed there and unlinked on a helper thread (a crash leaves it there)."""

    def settle(self) -> None:  # noqa: B027  (a no-op where no delete is left to a thread)
        """Wait for the unlinks :meth:`delete_file` left to helper threads: before a process
        says it is done, so that a finished run's folder holds no set-aside file."""

    # -- local paths ----------------------------------------------------------------------

    def native_path(self, path: str) -> str | None:
        """``path`` as this machine's OS names it, for code that must hand a real file to a
        library (torch, sqlite, a Trainer, an appended log); ``None`` in an object store,
        whose files are reached through the store only. No link check: see :func:`confine`."""
        return None
