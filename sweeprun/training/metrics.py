"""metrics.jsonl: one JSON object per logged step, consistent with the checkpoint it resumes from.

Entries logged after the last checkpoint are replayed when the run resumes, so the
checkpoint records how many bytes of the file existed when it was saved and
:meth:`MetricsLog.open` cuts the file back to exactly that: no duplicate or ghost
points on the curve, including an evaluation logged at the checkpoint's own step
after it was saved, and no torn last line left by a kill mid-append. (A file shorter
than recorded, or a checkpoint without the record, falls back to keeping the whole
entries up to the restored step.) On local disk entries are appended and flushed one
by one, so ``sweeprun status`` sees progress live.

Object stores cannot append, only rewrite, and a rewrite by a fenced-out attempt (a
frozen machine that woke up) would clobber the live attempt's lines. So there each
attempt writes only its own object, ``metrics/attempt-<n>.jsonl``
(:meth:`~sweeprun.store.RunPaths.metrics_part`), rewritten at each save: the entries
of the checkpoint it resumed from, cut by the same rules, then its own. The newest
attempt's object is the run's metrics (:func:`read_run_metrics`); an older one is
never read again once a newer attempt has written.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from typing import IO, Any

import fsspec

from ..errors import StoreError
from ..faults import crash_point
from ..numbers import finite
from ..store import RunPaths, atomic_write, backend_for, confine, read_regular, store_errors
from ..store.layout import METRICS
from .checkpoints import warn_once

#: The most of one run's metrics file a reader loads whole (``plot``, ``show``); a longer
#: file is not one a script wrote through this module.
METRICS_MAX_BYTES = 1 << 30


def plain(value: Any) -> Any:
    """A JSON-ready value: tensors and numpy scalars become Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


class MetricsLog:
    def __init__(self, paths: RunPaths, attempt: int) -> None:
        self.fs = paths.fs
        self.paths = paths
        self.appendable = backend_for(paths.fs).appendable
        #: What this process writes: metrics.jsonl where files can be appended to (local disk),
        #: its attempt's own object otherwise.
        self.path = paths.metrics if self.appendable else paths.metrics_part(attempt)
        self._lines: list[str] = []          # the whole file, kept for object stores
        self._file: IO[str] | None = None
        self._dirty = False
        self.size = 0
        """Bytes of the file as this process knows it: what a checkpoint records."""
        self.opened = False
        self._abandoned = False

    def open(self, resume_step: int, resume_bytes: int | None, resume_attempt: int | None = None) -> None:
        """Cut the file back to ``resume_bytes`` (recorded by the restored checkpoint; 0 for a
        fresh start); without a usable record, keep the whole entries with ``step <= resume_step``.

        On an object store the entries come from the object of ``resume_attempt`` (the
        attempt that wrote the restored checkpoint, whose byte count it recorded), or
        the newest attempt's, and go to this attempt's own object at once: from then on
        readers see this attempt's view.
        """
        source = self.path
        if not self.appendable:
            newest = self.paths.current_metrics()
            source = (self.paths.metrics_part(resume_attempt) if resume_attempt is not None
                      else newest or self.path)
        with store_errors("read", source):
            try:
                raw = self.fs.cat_file(source)
            except FileNotFoundError:
                raw = b""
        if resume_bytes is not None and len(raw) >= resume_bytes and raw[:resume_bytes].endswith(
                b"\n" if resume_bytes else b""):
            kept_raw = raw[:resume_bytes]
            self._lines = [line + "\n" for line in kept_raw.decode(errors="replace").split("\n")[:-1]]
        else:
            if not self.appendable and resume_attempt is not None and newest and newest != source:
                with store_errors("read", newest):  # the resumed attempt's object is gone
                    raw = self.fs.cat_file(newest)
            whole = raw.decode(errors="replace").split("\n")[:-1]  # after the last newline: torn
            self._lines = [line + "\n" for line in whole if _step_of(line) is not None
                           and _step_of(line) <= resume_step]  # type: ignore[operator]
            kept_raw = "".join(self._lines).encode()
        if kept_raw != raw or source != self.path:
            atomic_write(self.fs, self.path, kept_raw)
        self.size = len(kept_raw)
        if self.appendable:
            with store_errors("open", self.path):
                local = confine(self.fs, self.path)  # never appended through a link
                os.makedirs(os.path.dirname(local), exist_ok=True)
                self._file = open(local, "a", encoding="utf-8")  # noqa: SIM115 - held open for appends
        self.opened = True

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps({k: plain(v) for k, v in entry.items()}) + "\n"
        if self._abandoned:
            return
        if self._file is not None:
            with store_errors("append to", self.path):
                self._file.write(line)
                self._file.flush()
        else:
            self._lines.append(line)
            self._dirty = True
        self.size += len(line.encode())
        crash_point("metrics.after_append")

    def flush(self) -> None:
        """Make every entry so far durable (called before each checkpoint write, which records
        :attr:`size`: the file must not end up shorter than a checkpoint says it was)."""
        if self._abandoned:
            return
        if self._file is None and self._dirty:
            atomic_write(self.fs, self.path, "".join(self._lines).encode())
            self._dirty = False
        elif self._file is not None:
            with store_errors("write", self.path):
                self._file.flush()
                os.fsync(self._file.fileno())

    def flusher(self) -> Callable[[], None]:
        """:meth:`flush` of the entries logged so far, to run later on another thread (an
        asynchronous save) while the script goes on logging: on local disk an fsync (each
        append already reached the OS), elsewhere the bytes as of now, taken here. The
        caller runs it before any other flush can start (a save waits for the last one)."""
        if self._abandoned or (self._file is None and not self._dirty):
            return lambda: None
        fs, path = self.fs, self.path
        if self._file is not None:
            fd = self._file.fileno()

            def fsync() -> None:
                with store_errors("write", path):
                    os.fsync(fd)

            return fsync
        data = "".join(self._lines).encode()
        return lambda: atomic_write(fs, path, data)

    def abandon(self) -> None:
        """Stop writing without flushing: this process lost the run to another worker."""
        self._lines, self._dirty, self._abandoned = [], False, True
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


class NoMetrics:
    """What a rank other than 0 of a multi-rank run has in place of :class:`MetricsLog`: the
    run has one metrics file, one line per step, and rank 0 writes it (the values the script
    asks to reduce reach it through :meth:`~.ranks.Ranks.agree`)."""

    size = 0

    def __init__(self) -> None:
        self.opened = False

    def open(self, resume_step: int, resume_bytes: int | None, resume_attempt: int | None = None) -> None:
        self.opened = True

    def append(self, entry: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def flusher(self) -> Callable[[], None]:
        return lambda: None

    def abandon(self) -> None:
        pass

    def close(self) -> None:
        pass


def _step_of(line: str) -> int | float | None:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: [[[[... nested past the stack
        return None
    return _entry_step(entry)


def _entry_step(entry: Any) -> int | float | None:
    """The step of a decoded metrics line; ``None`` if it is not an entry with a finite one
    (an integer past the float range, ``10**400``, is not: comparing it would overflow)."""
    step = entry.get("step") if isinstance(entry, dict) else None
    return step if finite(step) is not None else None


def parse_entries(raw: bytes, where: str | None = None) -> list[dict[str, Any]]:
    """The whole entries of a metrics file's bytes (a torn last line is left out).

    A line that is not a JSON object with a finite ``step`` is passed over; in an entry,
    a number too large for a float (an integer such as ``10**400``: JSON has no limit,
    ``float()`` and every reader's ``math`` fail) is left out of it, with one warning
    naming ``where`` (the file), so that no reader meets it.
    """
    out = []
    dropped = 0
    for line in raw.decode(errors="replace").split("\n")[:-1]:
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if _entry_step(entry) is None:
            continue
        huge = [k for k, v in entry.items()
                if isinstance(v, int) and not isinstance(v, bool) and finite(v) is None]
        for key in huge:
            del entry[key]
        dropped += len(huge)
        out.append(entry)
    if dropped:
        warn_once(f"{where or 'a metrics file'}: left out {dropped} value(s) too large for a "
                  "float (not numbers a script logs)")
    return out


#: How far back from its end a metrics file is searched for its last whole entry, when the
#: end is one long line that is not one (garbage appended by hand, a binary written over it).
TAIL_SCAN_MAX = 1 << 30
_CHUNK_MAX = 4 << 20


def tail_entries(fs: fsspec.AbstractFileSystem, path: str, size: int,
                 scan_max: int = TAIL_SCAN_MAX) -> tuple[list[dict[str, Any]], bool]:
    """The whole entries in the last ``size`` bytes of a metrics file, and whether that was
    all of it. Never the whole file, never a FIFO (:func:`read_regular`): where those bytes
    hold no whole entry (the file ends in a 100 MB line of garbage), the lines before are
    looked for, reading backwards in bounded chunks, up to ``scan_max`` bytes."""
    blob = read_regular(fs, path, size, tail=True)
    if len(blob) < size:
        return parse_entries(blob, path), True
    end = _file_size(fs, path)
    scanned = 0
    while True:
        start = max(0, end - size)
        if scanned:
            blob = _read_range(fs, path, start, end)
        scanned += len(blob)
        first = blob.find(b"\n") if start > 0 else -1  # cut mid-file: the first line is partial
        entries = parse_entries(blob[first + 1:], path)
        if entries or start == 0:
            return entries, start == 0
        if first >= 0 and start + first + 1 < end:  # whole lines after it, none an entry:
            end = start + first + 1                  # look at the line it ends
            continue
        # Inside one line longer than ``size``: the newline before it, in growing chunks.
        pos, chunk = start, size
        end = -1
        while pos > 0 and scanned < scan_max:
            chunk = min(chunk * 4, _CHUNK_MAX)
            lo = max(0, pos - chunk)
            piece = _read_range(fs, path, lo, pos)
            scanned += len(piece)
            if (nl := piece.rfind(b"\n")) >= 0:
                end = lo + nl + 1
                break
            pos = lo
        if end < 0:
            return [], pos == 0


def _file_size(fs: fsspec.AbstractFileSystem, path: str) -> int:
    return backend_for(fs).size(path)


def _read_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file :func:`read_regular` already found regular; on local
    disk opened without blocking and checked again, so a pipe put in its place is refused."""
    return backend_for(fs).read_range(path, start, end)


def read_metrics(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """The whole entries of a metrics file (a torn last line is left out).

    Given a run's ``metrics.jsonl`` on an object store, where each attempt keeps its
    own object, the run's metrics as :func:`read_run_metrics` reads them.
    """
    if not backend_for(fs).appendable and posixpath.basename(path) == METRICS:
        return read_run_metrics(RunPaths(fs, posixpath.dirname(path)))
    with store_errors("read", path):
        return parse_entries(fs.cat_file(path), path)


def read_run_metrics(paths: RunPaths) -> list[dict[str, Any]]:
    """The run's metrics: ``metrics.jsonl``, or on object stores the newest attempt's object."""
    path = paths.current_metrics()
    if path is None:
        return []
    try:
        return parse_entries(read_regular(paths.fs, path, METRICS_MAX_BYTES), path)
    except StoreError as exc:
        if isinstance(exc.__cause__, FileNotFoundError) and not backend_for(paths.fs).appendable:
            return []
        raise
