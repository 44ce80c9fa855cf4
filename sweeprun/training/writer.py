"""The file I/O of a save: stream, fence, write data then manifest, prune.

The serialised state streams straight into the store's streaming write
(:meth:`~sweeprun.store.base.StoreBackend.stream_write`) while a helper thread hashes
the same chunks (:mod:`.digest`: no second copy of a multi-GB state in memory, and the
hash overlaps the write). The store makes it appear whole or not at all: on local disk a
temp file, fsynced and linked into place, on object stores a multipart upload. The
manifest goes last, create-only (:func:`~sweeprun.store.create_only`): no writer can
replace one.

The crash points (``checkpoint.mid_write`` ...) are plain calls that cost one
environment lookup when fault injection is off; the write path is the same with or
without them (no split writes, no extra copies or fsyncs).

Asynchronous saves (:class:`BackgroundSave`): the training thread only takes the
:class:`Snapshot`; one thread per save then runs the fence, makes the metrics durable
and runs :meth:`CheckpointWriter.write`. The fence runs there, right before the write,
so a late background save of a fenced-out process is refused like a synchronous one.

Fencing: the attempt is part of every name. A writer that finds a checkpoint of a
newer attempt has been taken over (a frozen machine woke up after its run moved on):
it raises :class:`LeaseLost` before writing anything, and it never prunes checkpoints
of a newer attempt than its own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import posixpath
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import IO, Any

from ..errors import LeaseLost, SweeprunError
from ..faults import crash_point
from ..store import create_only, store_errors
from ..store.layout import ATTEMPTS, attempt_of, highest_attempt
from .checkpoints import CheckpointDir, Manifest, Name, Owner, Retention, _finite, say, warn
from .digest import StreamDigest, tensor_memory


@dataclass(frozen=True)
class Snapshot:
    """The first half of a save, taken on the training thread: state already copied to CPU,
    so training may go on while a writer serialises it."""

    step: int
    state: dict[str, Any]
    metrics: dict[str, float]


@dataclass(frozen=True)
class Folder:
    """One listing of the checkpoints folder and the manifests in it that check out."""

    listing: dict[str, bool]
    manifests: list[Manifest]


#: How much a local save writes between two writeback hints (:func:`_start_writeback`).
WRITEBACK_BYTES = 16 * 2**20
#: The same for a shard of a sharded save (:mod:`.dcp_io`): measured best at 4 MiB on a
#: 2-core machine, where 16 MiB left most of a 25 MB shard to the final fsync.
SHARD_WRITEBACK_BYTES = 4 * 2**20
_LINUX = sys.platform.startswith("linux")


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes to disk now, without waiting for it.

    Left to itself, the kernel holds a whole checkpoint in the page cache and the final
    fsync writes all of it while the save waits; hinted as it is written, the disk
    works while the rest is serialised and hashed, and the fsync finds little left
    (PostgreSQL does the same for its checkpoints). On Linux, POSIX_FADV_DONTNEED starts
    that writeback and drops the pages already written out, so a checkpoint does not
    push the training data out of the page cache either. Only a hint: errors are ignored,
    the fsync is what makes the file durable.
    """
    if _LINUX:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class Writeback:
    """The writeback hints of one local file as it is written (:func:`_start_writeback`): once
    ``every`` bytes were written since the last hint, the file is flushed to the kernel and
    those bytes are hinted. Without a descriptor (an upload buffer), nothing is hinted."""

    def __init__(self, f: Any, fd: int | None, every: int) -> None:
        self.f, self.fd, self.every = f, fd, every
        self._hinted = 0

    def wrote(self, size: int) -> None:
        """``size``: the bytes written to the file so far."""
        if self.fd is not None and size - self._hinted >= self.every:
            self.f.flush()
            _start_writeback(self.fd, self._hinted, size - self._hinted)
            self._hinted = size


class _HashingSink:
    """A write-only file for ``torch.save`` that hands every chunk to a :class:`StreamDigest`
    (hashed on its helper thread while this one writes) and counts it. Given the file's
    descriptor (local disk), it starts the writeback as it goes."""

    def __init__(self, f: IO[bytes], digest: StreamDigest, slice_bytes: int | None = None,
                 fd: int | None = None) -> None:
        self.f = f
        self.digest = digest
        self.slice_bytes = slice_bytes
        self._writeback = Writeback(f, fd, WRITEBACK_BYTES)

    @property
    def size(self) -> int:
        return self.digest.size

    def write(self, chunk: bytes) -> int:
        first = self.digest.size == 0
        self.digest.update(chunk)                # queued first, so the hash overlaps the write
        if self.slice_bytes and len(chunk) > self.slice_bytes:
            # torch.save hands over a tensor's storage in one write; an upload buffer given
            # it whole would hold a copy of it all. In slices, it sends a part per slice.
            view = memoryview(chunk).cast("B")
            for start in range(0, len(view), self.slice_bytes):
                self.f.write(view[start:start + self.slice_bytes])
            written = len(view)
        else:
            written = self.f.write(chunk)
        self._writeback.wrote(self.size)
        if first:
            crash_point("checkpoint.mid_write")
        return written

    def flush(self) -> None:
        self.f.flush()


class CheckpointWriter:
    """The second half of a save, on whichever thread runs it (:class:`BackgroundSave`)."""

    def __init__(self, directory: CheckpointDir, owner: Owner, attempt: int, retention: Retention,
                 attempts: str | None = None) -> None:
        self.dir = directory
        self.owner = owner
        self.attempt = attempt
        self.retention = retention
        self.attempts = attempts
        """The run's ``attempts/`` folder when the attempt number is the launcher's; ``None``
        standalone (no launcher numbers its attempts there)."""
        self._retention: threading.Thread | None = None
        self.protect: Callable[[list[Manifest]], list[Manifest]] = lambda manifests: []
        """The checkpoints retention keeps besides the last ``keep_last`` and the best: those a
        loss-spike rollback may go back to (:meth:`~.spikes.Guard.protect`)."""

    def prune_later(self, folder: Folder) -> None:
        """:meth:`prune` on a thread of its own, after a commit: the save does not wait for
        old checkpoints to be deleted. Only after the commit, so the checkpoint that counts
        is never the one removed; a process killed before it ran leaves the old files, and
        the next save's prune removes them (it goes by the listing, not by this call). A
        failure is a warning: the checkpoint is committed, the next prune tries again."""
        self.settle()

        def run() -> None:
            try:
                crash_point("checkpoint.before_retention")
                self.prune(folder)
            except (OSError, SweeprunError) as exc:
                warn(f"removing old checkpoints of {self.owner} failed ({' '.join(str(exc).split())}); "
                     "the next save tries again")

        self._retention = threading.Thread(target=run, name="sweeprun-retention", daemon=False)
        self._retention.start()

    def settle(self, *, unlinks: bool = False) -> None:
        """Wait for the retention of the last commit: before the folder is listed again (a
        manifest deleted between a listing and its read would be reported as unusable) and
        before the process says it is done. ``unlinks`` (at close): the unlinks it left to
        the store's helper threads too, so a finished run's folder holds no set-aside file;
        not on the way to a listing, which a training step may wait for."""
        thread, self._retention = self._retention, None
        if thread is not None:
            thread.join()
        if unlinks:
            self.dir.store.settle()

    def fence(self) -> Folder:
        """The folder as it is, after checking that no newer attempt has started or saved.

        A newer attempt shows first in ``attempts/``: the launcher records each attempt
        there (create-only) before it starts the process, so a late save is refused even
        before the new attempt's first checkpoint. In the checkpoints folder only a
        manifest that checks out counts: a junk file cannot stop a run forever."""
        self.settle()
        self._check_attempts()
        listing = self.dir.listing()
        manifests = self.dir.manifests(listing)
        newer = [m for m in manifests if m.attempt > self.attempt]
        if newer:
            raise LeaseLost(
                f"checkpoint {self.dir.join(newer[-1].data)} was written by attempt "
                f"{newer[-1].attempt} and this process is attempt {self.attempt} of "
                f"{self.owner}: another worker took the run over; stopping without writing")
        return Folder(listing, manifests)

    def _check_attempts(self) -> None:
        """One listing of ``attempts/`` (a LIST on object stores): refuse if a record of a
        higher attempt than this process's is there."""
        if self.attempts is None:
            return
        with store_errors("list", self.attempts):
            try:
                found = self.dir.fs.ls(self.attempts, detail=False)
            except FileNotFoundError:
                return
        names = [posixpath.basename(p.rstrip("/")) for p in found]
        newest = highest_attempt(f"{ATTEMPTS}/{name}" for name in names)
        record = next((name for name in names if attempt_of(f"{ATTEMPTS}/{name}") == newest), "")
        if newest > self.attempt:
            raise LeaseLost(
                f"attempt {newest} has started ({posixpath.join(self.attempts, record)}) and this process "
                f"is attempt {self.attempt} of {self.owner}: another worker took the run over; "
                "stopping without writing")

    def write(self, snapshot: Snapshot, folder: Folder | None = None) -> Manifest:
        """Data, then the fence again, then the manifest: a process frozen while it wrote
        the data (for minutes, on a paused machine) finds out before its checkpoint
        becomes one a restore would take. It then removes its data file and raises
        :class:`LeaseLost`. What is left is the moment between that second check and the
        manifest's creation: no store offers a write conditional on another file."""

        folder = self.fence() if folder is None else folder
        listing = folder.listing
        seq = max((n.seq for n in map(Name.parse, listing) if n is not None), default=0) + 1
        name = Name(self.attempt, seq, snapshot.step)
        path = self.dir.join(name.data)
        size, sha256 = self._stream(snapshot, path, name)
        manifest = Manifest(attempt=self.attempt, seq=seq, step=snapshot.step, size=size,
                            sha256=sha256, run_id=self.owner.run_id,
                            sweep=self.owner.sweep, data=name.data,
                            metrics={k: v for k, v in snapshot.metrics.items() if _finite(v)},
                            created=time.time(), retention=self.retention.record())
        crash_point("checkpoint.before_manifest")
        try:
            folder = self.fence()
        except LeaseLost:
            self.dir.delete(name.data)           # ours alone: no manifest will ever name it
            raise
        listing = folder.listing
        manifest_path, raw = self.dir.join(name.manifest), manifest.to_bytes()
        if not create_only(self.dir.fs, manifest_path, raw):
            with store_errors("read", manifest_path):
                theirs = self.dir.read(name.manifest)
            if theirs != raw:  # not our own write, retried after its reply was lost
                raise self._clash(manifest_path)
        self.prune(Folder({**listing, name.data: True, name.manifest: True},
                          [*folder.manifests, manifest]))
        return manifest

    def _stream(self, snapshot: Snapshot, path: str, name: Name) -> tuple[int, str]:
        """Serialise straight into a create-only streaming write of the store, hashing as it goes.

        Memory holds one upload part at most, never the whole state. Create-only because
        two writers of one name means the other one owns it: unless its bytes are ours (a
        retry after a lost reply), that is a clash. On local disk the writeback is hinted
        as the file grows, and the hash of the last chunks overlaps the fsync.
        """
        import torch

        store = self.dir.store
        size, sha256 = 0, ""
        try:
            with store.stream_write(path, create_only=True, temp_prefix=name.temp_prefix,
                                    temp_suffix=".pt",
                                    before_commit=lambda: crash_point("checkpoint.before_rename")) as sink:
                with StreamDigest(tensor_memory(snapshot.state)) as digest:
                    torch.save(snapshot.state, _HashingSink(sink.file, digest, slice_bytes=sink.part_bytes,
                                                            fd=sink.fd))
                    sink.sync()
                    size, sha256 = digest.size, digest.hexdigest()
        except FileExistsError:
            if self.dir.digest(path) != (size, sha256):
                raise self._clash(path) from None
        return size, sha256

    def _clash(self, path: str) -> LeaseLost:
        return LeaseLost(f"{path} was written by another process of attempt {self.attempt} of "
                         f"{self.owner}: two processes run this attempt; stopping without writing")

    def prune(self, folder: Folder) -> None:
        """Apply retention to this attempt's and older checkpoints of this owner, and remove
        what crashed writes of those attempts left (data without manifest, temp files).
        Manifest first, so no manifest ever names a deleted file. A newer attempt's files
        are never touched: that attempt is alive and this process is the stale one."""
        listing, manifests = folder.listing, folder.manifests
        keep = self.retention.keep(manifests) | {m.name for m in self.protect(manifests)}
        doomed: list[str] = []
        for m in manifests:
            if m.name not in keep and m.attempt <= self.attempt and m.owner == self.owner:
                doomed += [m.name.manifest, m.data]
        for entry, regular in listing.items():
            parsed = Name.parse(entry)
            if (parsed is not None and entry == parsed.shards and not regular
                    and parsed.attempt <= self.attempt and parsed.manifest not in listing):
                doomed.append(entry)                    # a sharded save cut short (no commit)
            if not regular:
                continue
            if (parsed is not None and entry == parsed.data and parsed.attempt <= self.attempt
                    and parsed.manifest not in listing):
                doomed.append(entry)                    # data whose manifest was never written
            temp = Name.in_temp(entry)                  # a crashed write's temp file
            if temp is not None and temp.attempt <= self.attempt:
                doomed.append(entry)
        for entry in doomed:
            self._discard(entry)

    def discard(self, stems: Collection[str]) -> None:
        """Delete the checkpoints named (manifest first): those a loss-spike rollback set
        aside, which no restore may use (:mod:`.rollback`). Gone already is fine."""
        self.settle()
        for m in self.dir.manifests():
            if m.stem in stems and m.owner == self.owner:
                self._discard(m.name.manifest)
                self._discard(m.data)

    def _discard(self, entry: str) -> None:
        """Delete a file, without making the save wait for a big one on local disk.

        Unlinking a multi-GB checkpoint costs the filesystem a fraction of a second: the
        old data file is renamed to a temp name of this attempt (one atomic rename) and
        unlinked on a helper thread. A process killed before that leaves a temp file,
        which the next save's prune removes like any crashed write's.
        """
        parsed = Name.parse(entry)
        aside = (self.dir.join(parsed.pruned)
                 if parsed is not None and entry == parsed.data else None)
        self.dir.delete(entry, set_aside=aside)



#: Background saves not yet collected, so that the exit paths that skip thread joins
#: (``os._exit`` in the error hook) can still let a write finish.
_IN_FLIGHT: weakref.WeakSet[BackgroundSave] = weakref.WeakSet()


class BackgroundSave:
    """At most one save in flight, on a thread of its own.

    A second :meth:`start` waits for the first rather than coalescing with it: a
    coalesced save would either drop a snapshot the script asked for or hold two in
    memory, and with a sensible cadence the wait never happens; when it does (saves
    requested faster than the store takes them), it shows up in the measured stall,
    which widens an automatic interval.

    The thread is not a daemon: an interpreter that exits while a save is in flight
    waits for it, so the last checkpoint is whole. Its error is kept and raised on the
    training thread by the next :meth:`poll`/:meth:`wait`, never lost: one still
    uncollected at exit is printed.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: Manifest | None = None
        self.write_s = 0.0
        """How long the last background write took (for the time budget)."""

    @property
    def busy(self) -> bool:
        return self._thread is not None

    @property
    def failed(self) -> bool:
        """The save in flight has ended with an error not yet raised."""
        return self._thread is not None and not self._thread.is_alive() and self._error is not None

    def start(self, job: Callable[[], Manifest], clock: Callable[[], float] = time.monotonic) -> None:
        """Run ``job`` on a new thread, after the previous one has finished."""
        self.wait()

        def run() -> None:
            start = clock()
            try:
                self._result = job()
            except BaseException as exc:  # noqa: BLE001 - handed over to the training thread
                self._error = exc
            finally:
                self.write_s = clock() - start

        self._result = None
        self._thread = threading.Thread(target=run, name="sweeprun-checkpoint", daemon=False)
        _IN_FLIGHT.add(self)
        self._thread.start()  # the thread holds the only reference to the snapshot

    def poll(self) -> None:
        """Raise the error of a finished save; return at once while one is still running."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> Manifest | None:
        """Block until no save is in flight; its manifest, or its error raised here."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
            _IN_FLIGHT.discard(self)
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._result

    def drain(self) -> BaseException | None:
        """:meth:`wait`, returning the error instead of raising it (exit paths)."""
        try:
            self.wait()
        except BaseException as exc:  # noqa: BLE001
            return exc
        return None


def join_in_flight() -> None:
    """Let every background save finish and report the errors no one collected: for exits
    that skip the interpreter's own wait for threads (``os._exit``)."""
    for saver in list(_IN_FLIGHT):
        error = saver.drain()
        if error is not None:
            say(f"error: the last background checkpoint write failed: {' '.join(str(error).split())}")


atexit.register(join_in_flight)  # runs after the interpreter joined the thread: reports only


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
