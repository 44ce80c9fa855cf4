"""Reading a run's checkpoints from outside it: evaluation, tests, a later analysis."""

from __future__ import annotations

import os
from typing import Any, Literal

from ..errors import CheckpointError
from ..store import RunPaths, open_store
from .checkpoints import CheckpointDir, Manifest, Retention, recorded_retention
from .sharded import load_own, read_tensors
from .state import from_safe


def _load_any(directory: CheckpointDir, manifest: Manifest) -> dict[str, Any]:
    """One checkpoint's whole state; a multi-rank one's gathered here: its models and
    optimizers unsharded, the rest as rank 0 had it."""
    if not manifest.sharded:
        return directory.load(manifest)
    directory.verify(manifest)
    state = load_own(directory, manifest, 0, manifest.world_size or 1)
    state["objects"] = {**state["objects"], **read_tensors(directory, manifest)}
    return state


def load_checkpoint(run_dir: str | os.PathLike[str], which: Literal["latest", "best"] = "latest",
                    best: str | None = None, mode: Literal["min", "max"] | None = None) -> dict[str, Any]:
    """The full saved state of a run (``{"step", "epoch", "extras", "objects", "rng"}``),
    from its newest verified checkpoint or, with ``which="best"``, the best by ``best``
    (by default the metric and mode the script gave ``sweeprun.init(best=..., mode=...)``,
    as its checkpoints recorded them: what it kept is what it meant by best).
    For evaluation and tests: ``load_checkpoint(d)["objects"]["model"]``. A multi-rank run's
    sharded checkpoint is gathered into this process: full tensors, rank 0's own state."""
    store = open_store(os.fspath(run_dir))
    directory = CheckpointDir(store.fs, RunPaths(store.fs, store.root).checkpoints)
    directory.check()
    if which == "best":
        manifests = directory.manifests()
        recorded = recorded_retention(manifests)
        if best is None:
            if recorded is None or recorded.best is None:
                raise CheckpointError(f"the checkpoints in {directory.path} record no best metric "
                                      "(the script gave sweeprun.init no best=...); pass best=METRIC")
            best = recorded.best
        if mode is None and recorded is not None and recorded.best == best:
            mode = recorded.mode  # the script's own metric: its own direction
        chosen = Retention(best=best, mode=mode or "min").best_of(manifests)
        if chosen is None:
            raise CheckpointError(f"no checkpoint in {directory.path} has metric {best!r}")
        try:
            return from_safe(_load_any(directory, chosen))
        except ValueError as exc:
            raise CheckpointError(f"best checkpoint {directory.join(chosen.data)} does not verify: {exc}") from None
    loaded = directory.load_latest(load=lambda m: _load_any(directory, m))
    if loaded is None:
        raise CheckpointError(f"no checkpoint in {directory.path}; has the run saved yet?")
    return from_safe(loaded.state)
