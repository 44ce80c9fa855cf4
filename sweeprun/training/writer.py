"""The file I/O of a save: stream, fence, write data then manifest, prune.

On local disk the serialised state is streamed straight into a temp file in the
checkpoints folder while it is hashed (no second copy of a multi-GB state in memory),
then fsynced, renamed into place and the folder fsynced, so the rename itself survives
a power loss. Object stores cannot rename: there the bytes go up in one PUT, which is
atomic by itself. The manifest goes last, through the store's ``atomic_write``.

The crash points (``checkpoint.mid_write`` ...) are plain calls that cost one
environment lookup when fault injection is off; the write path is the same with or
without them (no split writes, no extra copies or fsyncs).

Fencing: the attempt is part of every name. A writer that finds a checkpoint of a
newer attempt has been taken over (a frozen machine woke up after its run moved on):
it raises :class:`LeaseLost` before writing anything, and it never prunes checkpoints
of a newer attempt than its own.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Any

from ..errors import LeaseLost
from ..faults import crash_point
from ..store import atomic_write, current_umask, fsync_dir, store_errors
from .checkpoints import TEMP_PREFIX, CheckpointDir, Manifest, Name, Owner, Retention, _finite

#: The checkpoint stem inside a temp file's name (ours: ``.tmp-<stem>-<random>.pt``; the
#: store's atomic_write for a manifest: ``.tmp-<random>-<stem>.json``).
_STEM = re.compile(r"ckpt-a[1-9][0-9]*-[0-9]+-step[0-9]+")


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


class _HashingSink:
    """A write-only file for ``torch.save`` that hashes and counts what passes through."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> int:
        self.sha256.update(chunk)
        written = self.f.write(chunk)
        first = self.size == 0
        self.size += len(chunk)
        if first:
            crash_point("checkpoint.mid_write")
        return written

    def flush(self) -> None:
        self.f.flush()


class CheckpointWriter:
    """The second half of a save. Synchronous; a background writer can take the same
    :class:`Snapshot` on a thread and run :meth:`write` there (``close()`` would wait)."""

    def __init__(self, directory: CheckpointDir, owner: Owner, attempt: int, retention: Retention) -> None:
        self.dir = directory
        self.owner = owner
        self.attempt = attempt
        self.retention = retention

    def fence(self) -> Folder:
        """The folder as it is, after checking that no newer attempt has saved here. Only a
        manifest that checks out counts: a junk file cannot stop a run forever."""
        listing = self.dir.listing()
        manifests = self.dir.manifests(listing)
        newer = [m for m in manifests if m.attempt > self.attempt]
        if newer:
            raise LeaseLost(
                f"checkpoint {self.dir.join(newer[-1].data)} was written by attempt "
                f"{newer[-1].attempt} and this process is attempt {self.attempt} of "
                f"{self.owner}: another worker took the run over; stopping without writing")
        return Folder(listing, manifests)

    def write(self, snapshot: Snapshot, folder: Folder | None = None) -> Manifest:
        import torch

        folder = self.fence() if folder is None else folder
        listing = folder.listing
        seq = max((n.seq for n in map(Name.parse, listing) if n is not None), default=0) + 1
        name = Name(self.attempt, seq, snapshot.step)
        path = self.dir.join(name.data)
        with store_errors("write", path):
            if self.dir.local:
                os.makedirs(self.dir.path, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.dir.path, prefix=f"{TEMP_PREFIX}{name.stem}-",
                                           suffix=".pt")
                try:
                    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: honour the umask
                    with os.fdopen(fd, "wb") as f:
                        sink = _HashingSink(f)
                        torch.save(snapshot.state, sink)
                        f.flush()
                        os.fsync(f.fileno())
                    crash_point("checkpoint.before_rename")
                    os.replace(tmp, path)
                except BaseException:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                    raise
                fsync_dir(self.dir.path)
            else:
                buffer = io.BytesIO()
                sink = _HashingSink(buffer)
                torch.save(snapshot.state, sink)
                self.dir.fs.pipe_file(path, buffer.getvalue())
        manifest = Manifest(attempt=self.attempt, seq=seq, step=snapshot.step, size=sink.size,
                            sha256=sink.sha256.hexdigest(), run_id=self.owner.run_id,
                            sweep=self.owner.sweep, data=name.data,
                            metrics={k: v for k, v in snapshot.metrics.items() if _finite(v)},
                            created=time.time())
        crash_point("checkpoint.before_manifest")
        atomic_write(self.dir.fs, self.dir.join(name.manifest), manifest.to_bytes())
        self.prune(Folder({**listing, name.data: True, name.manifest: True},
                          [*folder.manifests, manifest]))
        return manifest

    def prune(self, folder: Folder) -> None:
        """Apply retention to this attempt's and older checkpoints of this owner, and remove
        what crashed writes of those attempts left (data without manifest, temp files).
        Manifest first, so no manifest ever names a deleted file. A newer attempt's files
        are never touched: that attempt is alive and this process is the stale one."""
        listing, manifests = folder.listing, folder.manifests
        keep = self.retention.keep(manifests)
        doomed: list[str] = []
        for m in manifests:
            if m.name not in keep and m.attempt <= self.attempt and m.owner == self.owner:
                doomed += [m.name.manifest, m.data]
        for entry, regular in listing.items():
            if not regular:
                continue
            parsed = Name.parse(entry)
            if (parsed is not None and entry == parsed.data and parsed.attempt <= self.attempt
                    and parsed.manifest not in listing):
                doomed.append(entry)                    # data whose manifest was never written
            if entry.startswith(TEMP_PREFIX):                # a crashed write's temp file
                stem = _STEM.search(entry)
                temp = Name.parse(stem.group(0) + ".pt") if stem else None
                if temp is not None and temp.attempt <= self.attempt:
                    doomed.append(entry)
        for entry in doomed:
            self.dir.delete(entry)

    def close(self) -> None:
        """Nothing queued in the synchronous writer."""
