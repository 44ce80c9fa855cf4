"""Sharded checkpoints of a multi-rank run: every rank writes its part, one commit says it counts.

A checkpoint of ``N`` ranks is a folder and a manifest beside it::

    checkpoints/ckpt-a2-00000007-step0000000120.dcp/.metadata          DCP's (rank 0)
                                                   /__<rank>_0.distcp   each rank's tensor shards
                                                   /rank-<rank>.pt      each rank's own state
    checkpoints/ckpt-a2-00000007-step0000000120.json                    the manifest, last

The models and optimizers go through ``torch.distributed.checkpoint`` (DCP) with its
state-dict helpers (``get_state_dict``/``set_state_dict``): they handle DDP's replicas
and FSDP2's DTensors, and reshard on a load at another world size. Everything else a rank
has (its RNG states, its sampler's position, ``run.extras``, schedulers) is that rank's
own and goes to ``rank-<rank>.pt``, written through the store like any checkpoint file.

The commit (:meth:`ShardedWriter.write`, inside one ``dcp.save``: :mod:`.dcp_io`): rank 0
fences and names the checkpoint while DCP plans; every rank writes its shards (hashed as
they are written, fsynced) and its own state and sends the files' sizes and sha256 with
its write results; only when every rank's part is durable does rank 0 write DCP's
``.metadata``, fence again and create the manifest (world size, each file's size and
sha256), create-only, last. Retention runs after that, on a thread of its own. A folder
without a manifest, or whose files do not match it, is never restored (:func:`verify`): a
resume falls back to the previous checkpoint, and retention removes it. Every rank learns
the outcome, so all of them return the manifest or raise the same error: never one rank
resuming from an older step than the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import CheckpointError
from ..faults import crash_point
from ..store import create_only
from ..store.layout import rank_state_name
from .checkpoints import CheckpointDir, Manifest, Name, _finite
from .ranks import Ranks
from .writer import CheckpointWriter, Folder

#: What a resume at another world size cannot restore exactly (recorded in attempts/<n>.started).
APPROXIMATE = ["rng", "data position"]


def is_sharded_object(obj: Any) -> bool:
    """Models and optimizers go through DCP; everything else is a rank's own state."""
    import torch

    return isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))


def _model_of(name: str, optimizer: Any, models: Mapping[str, Any]) -> Any:
    """The tracked model whose parameters the optimizer trains (DCP keys its state by them)."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    owners = [m for m in models.values() if ids & {id(p) for p in m.parameters()}]
    if len(owners) != 1:
        raise CheckpointError(
            f"optimizer {name!r} trains the parameters of {len(owners)} tracked models; a multi-rank "
            "checkpoint saves an optimizer with its model: track exactly the model it trains "
            "(run.track(model=model, optimizer=optimizer))")
    return owners[0]


def dcp_state(objects: Mapping[str, Any]) -> dict[str, Any]:
    """The models' and optimizers' state as DCP saves and loads it (DTensors stay sharded)."""
    import torch
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    models = {n: o for n, o in objects.items() if isinstance(o, torch.nn.Module)}
    state: dict[str, Any] = {n: get_model_state_dict(m) for n, m in models.items()}
    for name, obj in objects.items():
        if isinstance(obj, torch.optim.Optimizer):
            state[name] = get_optimizer_state_dict(_model_of(name, obj, models), obj)
    return state


def staged(tensors: dict[str, Any]) -> dict[str, Any]:
    """A host copy of :func:`dcp_state` that training may not change: what a background save
    writes while the next steps run (DTensors stay DTensors, with CPU shards)."""
    import torch
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

    pin = torch.cuda.is_available() and torch.cuda.is_initialized()
    copy = _copy_state_dict(tensors, _create_cpu_state_dict(tensors, pin_memory=pin), non_blocking=pin)
    if pin:
        torch.cuda.synchronize()
    return copy


def load_dcp_state(objects: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    models = {n: o for n, o in objects.items() if isinstance(o, torch.nn.Module)}
    for name, model in models.items():
        set_model_state_dict(model, state[name])
    for name, obj in objects.items():
        if isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(_model_of(name, obj, models), obj, state[name])


def files_digest(files: Mapping[str, Any]) -> str:
    """What a sharded manifest's ``sha256`` is: the hash of its file list, so it still says
    "these bytes" in one field to whoever reads only that."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


class ShardedWriter:
    """The save of one rank of a multi-rank run; every rank calls :meth:`write` together."""

    def __init__(self, writer: CheckpointWriter, ranks: Ranks, background: bool = False) -> None:
        self.writer = writer
        self.dir = writer.dir
        self.ranks = ranks
        self.group = ranks.save_group if background else ranks.group
        """A background save's collectives use a group of their own (:class:`~.ranks.Ranks`)."""

    def write(self, step: int, own: dict[str, Any], tensors: dict[str, Any],
              metrics: dict[str, float], flush: Callable[[], None]) -> Manifest:
        """Write this rank's part of the checkpoint of ``step`` and, on rank 0, commit it once
        every rank's part is durable: all inside one ``dcp.save`` (:class:`~.dcp_io.Commit`).
        ``own`` is this rank's state (``rank-<rank>.pt``), ``tensors`` the models' and
        optimizers' (:func:`dcp_state`); ``flush`` makes the metrics durable once the fence
        passed (rank 0 has them). Every rank returns the same manifest or raises the same error."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from .dcp_io import MANIFEST, Commit, failure, local_memory

        commit = Commit(self.dir, self.ranks.rank, step, own, local_memory(tensors), metrics, flush,
                        name=self._name, commit=self._commit)
        try:
            metadata = dcp.save(tensors, storage_writer=commit, process_group=self.group)
        except CheckpointException as exc:
            raise failure(exc, step) from None
        manifest = getattr(metadata, MANIFEST, None)
        if not isinstance(manifest, Manifest):
            raise CheckpointError(f"the checkpoint of step {step} was saved by DCP without sweeprun's "
                                  "commit; it is not used (the previous checkpoint still is)")
        return manifest

    def _name(self, step: int) -> Name:
        """Rank 0, while DCP plans the save: the fence, then the next sequence number. A
        fenced-out rank 0 means every rank stops (the error reaches them through DCP)."""
        listing = self.writer.fence().listing
        seq = max((n.seq for n in map(Name.parse, listing) if n is not None), default=0) + 1
        return Name(self.writer.attempt, seq, step)

    def _commit(self, name: Name, files: dict[str, dict[str, Any]], metrics: dict[str, float]) -> Manifest:
        """Rank 0, once every rank reported: the fence again, then the manifest, create-only;
        retention (which may now drop what this checkpoint replaces) runs after, off the
        save's path (:meth:`~.writer.CheckpointWriter.prune_later`)."""
        crash_point("checkpoint.before_manifest")
        folder = self.writer.fence()         # a rank frozen mid-save: it finds out before the commit
        manifest = Manifest(attempt=name.attempt, seq=name.seq, step=name.step,
                            size=sum(f["size"] for f in files.values()), sha256=files_digest(files),
                            run_id=self.writer.owner.run_id, sweep=self.writer.owner.sweep,
                            data=name.shards, metrics={k: v for k, v in metrics.items() if _finite(v)},
                            created=time.time(), retention=self.writer.retention.record(),
                            world_size=self.ranks.world_size, files=files)
        path = self.dir.join(name.manifest)
        if not create_only(self.dir.fs, path, manifest.to_bytes()):
            raise self.writer._clash(path)
        self.writer.prune_later(Folder({**folder.listing, name.shards: False, name.manifest: True},
                                       [*folder.manifests, manifest]))
        return manifest


def load_own(directory: CheckpointDir, manifest: Manifest, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's own state from a verified sharded checkpoint: its own file at the same
    world size, rank 0's at another (the resume is then approximate)."""
    import pickle

    import torch

    source = rank if manifest.world_size == world_size else 0
    if rank_state_name(source) not in (manifest.files or {}):
        raise ValueError(f"its manifest lists no {rank_state_name(source)}")
    rel = f"{manifest.data}/{rank_state_name(source)}"
    try:
        state = torch.load(io.BytesIO(directory.read(rel)), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory.join(rel)} is refused: it does not load with "
                              f"torch.load(weights_only=True) ({exc}); delete it and run again") from None
    return state


def load_tensors(directory: CheckpointDir, manifest: Manifest, objects: Mapping[str, Any],
                 ranks: Ranks | None) -> None:
    """Load the models and optimizers through DCP, resharding to this run's world size."""
    import torch.distributed.checkpoint as dcp

    from .dcp_io import storage

    state = dcp_state(objects)
    missing = sorted(set(state) - set(_saved_keys(directory, manifest)))
    if missing:
        raise CheckpointError(f"checkpoint {directory.join(manifest.data)} has no state for "
                              f"{', '.join(missing)}; track the same objects as when it was written, "
                              "or delete the checkpoints folder to start over")
    dcp.load(state, storage_reader=storage(directory, directory.join(manifest.data), write=False),
             process_group=ranks.group if ranks else None, no_dist=ranks is None)
    load_dcp_state(objects, state)


def read_tensors(directory: CheckpointDir, manifest: Manifest) -> dict[str, Any]:
    """The models' and optimizers' full state from a sharded checkpoint, in this one process
    (no process group): for reading a run from outside it (:func:`~.load.load_checkpoint`)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from .dcp_io import storage

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=storage(directory, directory.join(manifest.data), write=False),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def _saved_keys(directory: CheckpointDir, manifest: Manifest) -> set[str]:
    """The top-level names (tracked objects) a DCP checkpoint holds, from its metadata."""
    from .dcp_io import storage

    reader = storage(directory, directory.join(manifest.data), write=False)
    metadata = reader.read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
