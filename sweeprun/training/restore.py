"""Choosing what a restore reads: a one-file checkpoint, or a sharded one at the same or
another world size (:mod:`.sharded`), and what a world-size change means for the run.

Models and optimizers reshard exactly through DCP. A rank's RNG states and its sampler's
position cannot follow a change of world size exactly (there is no rank 3 to take them
from, or one rank must stand for two): each rank takes rank 0's, the sampler maps its
position onto the new sharding, and the resume is recorded as approximate in
``attempts/<n>.started`` (``"resumed"``, for ``status``/``show``/the ledger), or refused
with ``SWEEPRUN_ON_WORLD_SIZE_CHANGE=refuse``.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import CheckpointError
from ..store import RunPaths, atomic_write
from ..store.layout import STARTED_RESUMED
from .checkpoints import CheckpointDir, Loaded, Manifest
from .ranks import Ranks
from .sharded import APPROXIMATE, is_sharded_object, load_own, load_tensors
from .state import Stateful, from_safe


def load_one(directory: CheckpointDir, manifest: Manifest, ranks: Ranks | None) -> dict[str, Any]:
    """This process's state from one checkpoint (ValueError: it does not verify, try an older one)."""
    if manifest.sharded:
        directory.verify(manifest)
        return load_own(directory, manifest, ranks.rank if ranks else 0, ranks.world_size if ranks else 1)
    if ranks is not None:
        raise CheckpointError(
            f"checkpoint {directory.join(manifest.data)} was written by a process without a process "
            f"group and this run has {ranks.world_size} rank(s); such a checkpoint cannot be "
            "resharded: resume it the way it was written, or delete the checkpoints folder to start over")
    return directory.load(manifest)


def same_on_every_rank(loaded: Loaded | None, ranks: Ranks | None) -> None:
    """Every rank resumes from the same checkpoint, or none does (a rank on an older step
    than the others would train on silently)."""
    if ranks is None:
        return
    chosen = ranks.gather(loaded.manifest.stem if loaded else None)
    if len(set(chosen)) > 1:
        raise CheckpointError(f"the ranks found different newest checkpoints ({', '.join(map(str, chosen))}); "
                              "the checkpoints folder changed during the restore: run again")


def load_objects(directory: CheckpointDir, loaded: Loaded, objects: dict[str, Stateful],
                 ranks: Ranks | None) -> None:
    """Load every tracked object: from this rank's state, and the models and optimizers of a
    sharded checkpoint through DCP."""
    state, manifest = loaded.state, loaded.manifest
    tensors = {n: o for n, o in objects.items() if manifest.sharded and is_sharded_object(o)}
    missing = sorted(set(objects) - set(state["objects"]) - set(tensors))
    if missing:
        raise CheckpointError(
            f"checkpoint {directory.join(manifest.data)} has no state for "
            f"{', '.join(missing)} (it has {', '.join(sorted(state['objects'])) or 'none'}); "
            "the script registers more than it did when the checkpoint was written: "
            "track the same objects, or delete the checkpoints folder to start over")
    for name, obj in objects.items():
        if name not in tensors:
            obj.load_state_dict(from_safe(state["objects"][name]))
    if tensors:
        load_tensors(directory, manifest, tensors, ranks)


def reshard_note(manifest: Manifest, ranks: Ranks | None, policy: str, paths: RunPaths | None,
                 attempt: int) -> str:
    """``""`` at the same world size; at another, the policy's answer: refuse (a
    :class:`CheckpointError`, exit 2), or a note for the resume line, recorded for the
    launcher in ``attempts/<n>.started`` (``paths``: under the launcher, by rank 0)."""
    saved = manifest.world_size or 1
    now = ranks.world_size if ranks else 1
    if saved == now:
        return ""
    if policy == "refuse":
        raise CheckpointError(
            f"checkpoint {manifest.data} was written by {saved} rank(s) and this run has {now}; "
            "SWEEPRUN_ON_WORLD_SIZE_CHANGE=refuse (on_world_size_change: refuse in the sweep file) "
            f"forbids resharding: run it with {saved} rank(s), or allow reshard")
    if paths is not None and (ranks is None or ranks.leader):
        record = {"attempt": attempt, "step": 0, "world_size": now,
                  STARTED_RESUMED: {"checkpoint": manifest.data, "step": manifest.step,
                              "world_size": saved, "approximate": APPROXIMATE}}
        atomic_write(paths.fs, paths.api_started(attempt), (json.dumps(record) + "\n").encode())
    note = (f"; resharded from {saved} rank(s) to {now}: model and optimizer exact, "
            f"{' and '.join(APPROXIMATE)} approximate")
    return note
