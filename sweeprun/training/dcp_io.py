"""DCP's storage under sweeprun: where a sharded checkpoint's files go, hashed as they are
written, and the commit carried by DCP's own messages.

``dcp.save`` already exchanges two rounds of messages between the ranks: rank 0 gathers
every rank's plan and sends each its part, then gathers every rank's write results,
finishes (``.metadata``) and sends the outcome to all. :class:`Commit`, the storage
writer sweeprun hands it, puts the commit into those two rounds instead of adding its own:

- planning: rank 0 fences and names the checkpoint; the name travels with each plan;
- writing: each rank writes its shards through DCP's own writer (local disk or fsspec,
  :func:`storage`), hashed on the way (:class:`HashingFileSystem`: no shard is read back),
  then its own state (``rank-<rank>.pt``, atomic), and sends its files' sizes and hashes
  with its write results;
- finishing, on rank 0 only when every rank's part is durable: DCP's ``.metadata``, then
  sweeprun's manifest, create-only, last. The manifest returns to every rank with DCP's
  metadata; a failure anywhere reaches every rank as DCP's ``CheckpointException``
  (:func:`failure` turns it into the one error all of them raise).

Imported only where torch already is (:mod:`.sharded` imports it inside its functions).
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..errors import CheckpointError, LeaseLost, SweeprunError
from ..faults import crash_point
from ..store import atomic_write, fsync_dir
from ..store.layout import DCP_METADATA, rank_state_name, shard_file_rank
from .checkpoints import CheckpointDir, Manifest, Name
from .digest import SHARD_HASH, StreamDigest, new_hash, tensor_memory
from .writer import SHARD_WRITEBACK_BYTES, Writeback

#: The key of the write result that carries a rank's file records to rank 0 (never saved).
REPORT = "__sweeprun_rank_files__"
#: The attribute of DCP's returned metadata that carries rank 0's manifest to every rank.
MANIFEST = "sweeprun_manifest"


def storage(directory: CheckpointDir, folder: str, write: bool) -> Any:
    """DCP's writer (reader) for ``folder``: its filesystem one on local disk, its fsspec one,
    over the store's own filesystem object (credentials, endpoint), on object stores."""
    native = directory.store.native_path(folder)
    if native is not None:
        from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

        return FileSystemWriter(native, sync_files=True) if write else FileSystemReader(native)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    url = directory.fs.unstrip_protocol(folder)
    found = FsspecWriter(url, sync_files=False) if write else FsspecReader(url)
    found.fs.fs = directory.fs              # the store's filesystem, not a second one from the URL
    found.path = folder
    return found


def record(data: bytes) -> dict[str, Any]:
    """A manifest's record of one file: its size and :data:`~.digest.SHARD_HASH`."""
    digest = new_hash(SHARD_HASH)
    digest.update(data)
    return {"size": len(data), SHARD_HASH: digest.hexdigest()}


class _HashedStream:
    """A file DCP writes into: each chunk goes to a :class:`~.digest.StreamDigest` (hashed
    on its helper thread while this one writes and fsyncs), then to the file. Given the
    file's descriptor (local disk), the kernel is asked to start the writeback every
    :data:`~.writer.SHARD_WRITEBACK_BYTES` (:class:`~.writer.Writeback`), so the disk works
    while the rest of the shard is serialised and DCP's fsync finds little left: without
    it, a sharded save took a fifth longer than a plain ``dcp.save`` on a 2-core machine;
    with it, less time (benchmarks/RESULTS.md)."""

    def __init__(self, raw: Any, digest: StreamDigest, fd: int | None) -> None:
        self.raw = raw
        self.digest = digest
        self._writeback = Writeback(raw, fd, SHARD_WRITEBACK_BYTES)

    def write(self, chunk: Any) -> Any:
        self.digest.update(chunk)                 # queued first, so the hash overlaps the write
        written = self.raw.write(chunk)
        self._writeback.wrote(self.digest.size)
        return written

    def __getattr__(self, name: str) -> Any:     # tell, fileno (DCP's fsync), flush, close
        return getattr(self.raw, name)


class HashingFileSystem:
    """DCP's filesystem (local or fsspec) with every file it writes hashed as it is written.
    :attr:`records` gets ``name -> size, hash`` once a file is closed (uploaded, on object
    stores); a rename (how DCP puts ``.metadata`` in place) carries the record along.
    Everything else is DCP's own filesystem's. ``local``: DCP writes real files there (the
    store's native path), whose writeback is started as they are written."""

    def __init__(self, inner: Any, memory: set[tuple[int, int]], local: bool = False) -> None:
        self.inner = inner
        self.memory = memory
        self.local = local
        self.records: dict[str, dict[str, Any]] = {}

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with self.inner.create_stream(path, mode) as raw:
                yield raw
            return
        with StreamDigest(self.memory, SHARD_HASH) as digest:
            with self.inner.create_stream(path, mode) as raw:
                yield _HashedStream(raw, digest, raw.fileno() if self.local else None)
            found = {"size": digest.size, SHARD_HASH: digest.hexdigest()}
        self.records[posixpath.basename(os.fspath(path))] = found

    def rename(self, path: Any, new_path: Any) -> None:
        self.inner.rename(path, new_path)
        found = self.records.pop(posixpath.basename(os.fspath(path)), None)
        if found is not None:
            self.records[posixpath.basename(os.fspath(new_path))] = found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def local_memory(state: Any) -> set[tuple[int, int]]:
    """:func:`~.digest.tensor_memory` of a state whose DTensors count by their local shards
    (what DCP writes of them): the chunks the hasher may read after ``write`` returned."""
    from torch.distributed.tensor import DTensor

    def local(obj: Any) -> Any:
        if isinstance(obj, DTensor):
            return obj.to_local()
        if isinstance(obj, dict):
            return [local(v) for v in obj.values()]
        if isinstance(obj, (list, tuple)):
            return [local(v) for v in obj]
        return obj

    return tensor_memory(local(state))


@dataclass
class _Target:
    """What rank 0 sends every rank with its part of the plan: what DCP's own writer planned
    for it (its file prefix: DCP's type, passed back to DCP untouched) and the folder."""

    inner: Any
    shards: str


class RankFailed(CheckpointError):
    """A rank's part of a save was not written (every rank learns it; none commits)."""


class Commit(StorageWriter):
    """The storage writer of one sharded save (see the module's docstring).

    ``name(step)`` runs on rank 0 while DCP plans (the fence, the next sequence number);
    ``commit(name, files, metrics)`` on rank 0 once every rank's part and ``.metadata`` are
    durable (the fence again, the manifest create-only)."""

    def __init__(self, directory: CheckpointDir, rank: int, step: int, own: dict[str, Any],
                 memory: set[tuple[int, int]], metrics: dict[str, float], flush: Callable[[], None],
                 name: Callable[[int], Name],
                 commit: Callable[[Name, dict[str, dict[str, Any]], dict[str, float]], Manifest]) -> None:
        super().__init__()
        self.dir, self.rank, self.step, self.own, self.memory = directory, rank, step, own, memory
        self.metrics, self.flush, self.name_of, self.commit = metrics, flush, name, commit
        self.setup: tuple[bool, dict[str, Any]] = (False, {})
        self.inner: Any = None
        self.name: Name | None = None
        self.hashing: HashingFileSystem | None = None

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.setup = (is_coordinator, kwargs)

    def storage_meta(self) -> Any:
        return None                               # DCP's writer gives it in finish()

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan                               # the folder is not known yet: rank 0 names it

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        name = self.name_of(self.step)
        planned = storage(self.dir, self.dir.join(name.shards), write=True).prepare_global_plan(plans)
        return [dataclasses.replace(p, storage_data=_Target(q.storage_data, name.shards))
                for p, q in zip(plans, planned, strict=True)]

    def write_data(self, plan: Any, planner: Any) -> Future[list[WriteResult]]:
        self.name = Name.parse(plan.storage_data.shards)
        assert self.name is not None
        plan = dataclasses.replace(plan, storage_data=plan.storage_data.inner)
        self.flush()                              # the fence passed (rank 0 has the metrics)
        folder = self.dir.join(self.name.shards)
        self.inner = storage(self.dir, folder, write=True)
        self.hashing = self.inner.fs = HashingFileSystem(self.inner.fs, self.memory,
                                                         local=self.dir.store.native_path(folder) is not None)
        self.inner.set_up_storage_writer(self.setup[0], **self.setup[1])
        results = self.inner.write_data(self.inner.prepare_local_plan(plan), planner).wait()
        crash_point("checkpoint.before_rank_state")
        files = dict(self.hashing.records)
        try:
            unknown = sorted(n for n in files if shard_file_rank(n) != self.rank)
            if unknown:
                raise CheckpointError(f"DCP wrote {', '.join(unknown)} in {folder}, which a manifest cannot list")
            raw = io.BytesIO()
            torch.save(self.own, raw)
            # its atomic write fsyncs the folder after the rename: DCP's shard names too
            atomic_write(self.dir.fs, posixpath.join(folder, rank_state_name(self.rank)), raw.getvalue())
            files[rank_state_name(self.rank)] = record(raw.getvalue())
        except (OSError, SweeprunError) as exc:   # every rank learns it: none commits
            raise RankFailed(f"rank {self.rank}: {exc}") from None
        crash_point("checkpoint.rank_written")
        report = WriteResult(index=MetadataIndex(REPORT), size_in_bytes=0, storage_data=files)
        future: Future[list[WriteResult]] = Future()
        future.set_result([*results, report])
        return future

    def finish(self, metadata: Any, results: list[list[WriteResult]]) -> None:
        """Rank 0, once every rank's part is durable: DCP's metadata, then the commit."""
        assert self.name is not None and self.hashing is not None
        files: dict[str, dict[str, Any]] = {}
        for report in (r for rank in results for r in rank if r.index.fqn == REPORT):
            files.update(report.storage_data)
        folder = self.dir.join(self.name.shards)
        try:
            self.inner.finish(metadata, [[r for r in rank if r.index.fqn != REPORT] for rank in results])
            if DCP_METADATA not in self.hashing.records:
                raise CheckpointError(f"DCP wrote no {DCP_METADATA} in {folder}")
            native = self.dir.store.native_path(folder)
            if native is not None:
                fsync_dir(native)                 # the rename of .metadata is durable too
            files[DCP_METADATA] = self.hashing.records[DCP_METADATA]
            manifest = self.commit(self.name, files, self.metrics)
        except OSError as exc:
            raise CheckpointError(f"the commit of {folder} failed: {exc}") from None
        setattr(metadata, MANIFEST, manifest)


def failure(exc: Any, step: int) -> BaseException:
    """The one error every rank raises for a failed save (DCP's ``CheckpointException``, the
    same on every rank): a lost lease first (all stop), then the ranks that could not write
    their part, then anything else (rank 0's commit)."""
    errors = [error for _, (error, _) in sorted(exc.failures.items())]
    lost = next((e for e in errors if isinstance(e, LeaseLost)), None)
    if lost is not None:
        return lost
    ranks = [str(e) for e in errors if isinstance(e, RankFailed)]
    if ranks:
        return CheckpointError(f"the checkpoint of step {step} was not written by every rank: "
                               f"{'; '.join(ranks)}; it is not used (the previous checkpoint still is)")
    first = errors[0] if errors else exc
    if isinstance(first, SweeprunError):
        return first
    return CheckpointError(f"the checkpoint of step {step} failed: {type(first).__name__}: "
                           f"{' '.join(str(first).split())}; it is not used (the previous checkpoint still is)")
