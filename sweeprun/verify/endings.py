"""The final state of a run directory, in pieces named as a user knows them.

A script that uses sweeprun's API ends in a sweeprun checkpoint whose objects are named by
``run.track``. The two integrations end otherwise, and their states are only useful to
compare once taken apart: the Lightning callback tracks Lightning's whole checkpoint as
one object (``lightning``), and a Hugging Face Trainer run keeps its state in sealed
``trainer/checkpoint-<step>/`` folders, a file per piece. Each becomes an :class:`Ending`
with pieces called ``model``, ``optimizer``, ``LR scheduler``, ``data position``, ``RNG``...,
so a verdict says "optimizer: exp_avg differs", not a path inside a pickled dict.

What legitimately differs between an uninterrupted run and a resumed one is left out
here, each with its reason: the run directory itself (the two runs live in two), clock
readings, and what records the attempt. Everything else is compared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..integrations.hf_rng import RNG_FILE
from ..store import layout
from ..training.sealed import SEAL
from .compare import TIMING, kind_of

#: Where a run directory appears inside a saved state: the two runs live in two directories.
RUN_DIR = "{run_dir}"


@dataclass
class Ending:
    """What one run ended with. ``pieces`` maps a piece's name to its state tree."""

    what: str                                     # "sweeprun checkpoint", "Trainer folder checkpoint-40"
    step: int | None
    pieces: dict[str, Any]
    #: kind of state ("optimizer", "LR scheduler", "data position"...) -> the piece holding it
    kinds: dict[str, str] = field(default_factory=dict)
    #: kind -> why this script's checkpoints cannot restore it, and the fix (from the state itself)
    missing: dict[str, str] = field(default_factory=dict)
    #: bookkeeping pieces shown apart from the state (step, epoch): their detail, not a summary
    scalars: tuple[str, ...] = ("step", "epoch")
    #: what to check when the data position is tracked and still an epoch ran long or short
    loop_hint: str = "is the epoch loop started from run.epoch?"

    def shown(self) -> list[str]:
        """The pieces named in a verdict, bookkeeping aside."""
        return [p for p, v in self.pieces.items()
                if p not in (*self.scalars, "run.extras") and not _empty(v)]


def _empty(state: Any) -> bool:
    """Nothing saved (no callbacks with a state, no sampler): nothing to call equal."""
    return isinstance(state, (Mapping, list, tuple)) and not state


def load_ending(run_dir: Path) -> Ending | None:
    """The run's final state; ``None`` when it keeps none that sweeprun can read (then only
    its metrics are compared). CheckpointError when it has checkpoints and none verifies."""
    from .. import training

    trainer = run_dir / layout.TRAINER
    if trainer.is_dir():
        return _hf_ending(trainer, run_dir)
    try:
        state = training.load_checkpoint(run_dir)
    except CheckpointError:
        if not (run_dir / layout.CHECKPOINTS).is_dir():
            return None  # a script that keeps no sweeprun checkpoint: its metrics are all there is
        raise
    return ending_of(state, run_dir)


def ending_of(state: Mapping[str, Any], run_dir: Path) -> Ending:
    """A sweeprun checkpoint of ``run_dir`` as an :class:`Ending`: the Lightning callback's
    taken apart, any other as the script tracked it."""
    state = _relative(state, run_dir)
    lightning = state.get("objects", {}).get("lightning")
    if isinstance(lightning, Mapping) and isinstance(lightning.get("trainer"), Mapping):
        return _lightning_ending(state)
    return native_ending(state)


def native_ending(state: Mapping[str, Any]) -> Ending:
    """A checkpoint of :mod:`sweeprun.training`: its objects as the script named them."""
    objects = dict(state.get("objects") or {})
    pieces: dict[str, Any] = {"step": state.get("step"), "epoch": state.get("epoch"),
                              "run.extras": state.get("extras"), **objects}
    if state.get("rng") is not None:
        pieces["global RNGs"] = state["rng"]
    kinds = {k: name for name, v in objects.items() if (k := kind_of(v)) is not None}
    missing = {}
    if state.get("rng") is None:
        missing["RNG"] = ("dropout and augmentation draw from the global RNGs, which "
                          "init(rng=False) leaves out of checkpoints")
    if "data position" not in kinds:
        missing["data position"] = ("no data position is tracked: run.track(data=sampler) "
                                    "(a ResumableSampler or a StatefulDataLoader)")
    step = state.get("step")
    return Ending("sweeprun checkpoint", step if isinstance(step, int) else None, pieces, kinds, missing)


# -- Lightning ---------------------------------------------------------------------------------

#: Lightning's checkpoint keys and the piece each one is (the rest go to "Lightning's other state").
_LIGHTNING = {"state_dict": "model", "optimizer_states": "optimizer", "lr_schedulers": "LR scheduler",
              "callbacks": "callbacks"}
_PROGRESS = ("epoch", "global_step", "loops")


def _lightning_ending(state: Mapping[str, Any]) -> Ending:
    """The Lightning callback's checkpoint: Lightning's own dict taken apart, the samplers'
    positions (which Lightning does not save) as the data position."""
    objects = dict(state.get("objects") or {})
    saved = objects.pop("lightning")
    ckpt = dict(saved["trainer"])
    pieces: dict[str, Any] = {"step": state.get("step"), "epoch": state.get("epoch"),
                              "run.extras": state.get("extras")}
    for key, piece in _LIGHTNING.items():
        if key in ckpt:
            pieces[piece] = ckpt.pop(key)
    # Timer's time_elapsed and the like: a callback's clock readings, never equal between runs.
    # Inside each callback's state only: the keys naming the callbacks carry their settings
    # (ModelCheckpoint's include 'train_time_interval'), and its best-k tracking must count.
    if isinstance(pieces.get("callbacks"), Mapping):
        pieces["callbacks"] = {k: _without_clock(v) for k, v in pieces["callbacks"].items()}
    samplers = saved.get("samplers") or []
    if samplers:
        pieces["data position"] = samplers
    # The loop counters are compared: measured equal after every resume (Lightning aligns its
    # restarted counters before they are saved again), and a batch trained twice or skipped
    # shows there first. Only the epoch and step are named as such.
    pieces["training progress"] = {k: ckpt.pop(k) for k in _PROGRESS if k in ckpt}
    # The Lightning version that wrote it: the same library in both runs, not training state.
    ckpt.pop("pytorch-lightning_version", None)
    if ckpt:
        pieces["Lightning's other state"] = ckpt  # precision plugin, hyperparameters, user extras
    pieces.update(objects)  # anything else the script tracked itself
    if state.get("rng") is not None:
        pieces["global RNGs"] = state["rng"]
    kinds = {"model": "model", "optimizer": "optimizer", "LR scheduler": "LR scheduler",
             "data position": "data position"}
    kinds = {k: p for k, p in kinds.items() if pieces.get(p)}
    missing = {}
    if state.get("rng") is None:
        missing["RNG"] = ("Lightning saves no RNG state and the callback was made with "
                          "SweeprunCallback(rng=False), so dropout and augmentation draw afresh")
    loops = pieces["training progress"].get("loops") or {}
    if ((loops.get("fit_loop") or {}).get("state_dict") or {}).get("combined_loader"):
        kinds.setdefault("data position", "training progress")  # a stateful loader: Lightning's own
    elif not samplers:
        missing["data position"] = ("the training DataLoader has no sampler with a state, so "
                                    "Lightning starts the epoch's order again: give it "
                                    "sampler=sweeprun.ResumableSampler(dataset, seed=...)")
    step = state.get("step")
    return Ending("Lightning checkpoint", step if isinstance(step, int) else None, pieces, kinds,
                  missing, loop_hint="")


# -- Hugging Face Trainer ----------------------------------------------------------------------

#: Files of a Trainer folder not compared, and why.
_SKIPPED = {
    # pickled TrainingArguments: the run's own output_dir and logging_dir are in it, by design
    # different in the two runs; the arguments are the script's, not state a resume restores
    "training_args.bin",
    # written by sweeprun: the attempt that sealed the folder, when, and file hashes of the above
    SEAL,
}
_OPTIMIZER, _SCHEDULER, _SCALER, _STATE = "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json"
_SWEEPRUN_RNG = RNG_FILE


def _hf_ending(output_dir: Path, run_dir: Path) -> Ending | None:
    """The newest sealed Trainer folder: the one a resume would start from, and at the end
    of a run the one sealed at its last step."""
    from ..training.sealed import checkpoint_folders, newest_sealed

    scan = newest_sealed(str(output_dir))
    if scan.chosen is None:
        if not checkpoint_folders(str(output_dir)):
            return None
        reasons = "; ".join(reason for _, reason in scan.rejected)
        raise CheckpointError(f"no Trainer checkpoint folder in {output_dir} verifies: {reasons}")
    folder = Path(scan.chosen.path)
    names = sorted(scan.chosen.seal["files"])
    pieces: dict[str, Any] = {"step": scan.chosen.step,
                              "model": _hf_weights(folder, names)}
    for name, piece in ((_OPTIMIZER, "optimizer"), (_SCHEDULER, "LR scheduler"), (_SCALER, "grad scaler")):
        if name in names:
            pieces[piece] = _torch_load(folder / name)
    rng = {name: _torch_load(folder / name, numpy=True) for name in names
           if name.startswith("rng_state") and name.endswith(".pth")}
    sweeprun_rng = None
    for name in filter(layout.is_hf_rng_file, names):   # one, or one per rank
        from ..training.state import from_safe

        rng[name] = from_safe(_torch_load(folder / name))
        sweeprun_rng = rng[name] if sweeprun_rng is None else sweeprun_rng
    if rng:
        pieces["RNG"] = rng
    trainer_state = None
    if _STATE in names:
        trainer_state = json.loads((folder / _STATE).read_text())
        progress = _without_clock(trainer_state)
        # what was logged, apart from where training stands: a difference there alone is a
        # logging difference, not a training one
        history = progress.pop("log_history", None)
        pieces["trainer state"] = progress
        if history:
            pieces["log history"] = history
    loaded = {n for n in names if n in (_OPTIMIZER, _SCHEDULER, _SCALER, _STATE)
              or _is_weights(n) or n.startswith("rng_state") or layout.is_hf_rng_file(n)}
    others = {n: scan.chosen.seal["files"][n].get("sha256") for n in names
              if n not in loaded and n not in _SKIPPED}
    if others:
        pieces["other files"] = others  # config.json, tokenizer files...: compared by hash
    pieces = _relative(pieces, run_dir)
    kinds = {"model": "model", "optimizer": "optimizer", "LR scheduler": "LR scheduler",
             "data position": "trainer state"}
    kinds = {k: p for k, p in kinds.items() if p in pieces}
    missing = {}
    late = ("the Trainer puts the RNGs back only after the first resumed batch was fetched, so "
            "an augmentation drawing from random or numpy differs at once")
    if sweeprun_rng is None:
        missing["RNG"] = (f"{late}, and the folder has no {_SWEEPRUN_RNG} (saved by sweeprun's "
                          "callback) to restore them earlier: add run to callbacks= and call "
                          "run.train(trainer)")
    elif sweeprun_rng.get("before_fetch") is None and _mid_epoch(trainer_state):
        missing["RNG"] = (f"{late}; {_SWEEPRUN_RNG} holds no record of the RNGs before that "
                          "fetch, as when trainer.train(resume_from_checkpoint=...) is called "
                          "instead of run.train(trainer)")
    return Ending(f"Trainer folder {folder.name}", scan.chosen.step, pieces, kinds, missing,
                  scalars=("step",), loop_hint="")


def _is_weights(name: str) -> bool:
    return "/" not in name and (name.endswith(".safetensors")
                                or (name.startswith(("pytorch_model", "adapter_model")) and name.endswith(".bin")))


def _hf_weights(folder: Path, names: list[str]) -> dict[str, Any]:
    """Every tensor of the saved model, from however many shard files it was split into."""
    weights: dict[str, Any] = {}
    for name in names:
        if not _is_weights(name):
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            weights.update(load_file(str(folder / name)))
        else:
            weights.update(_torch_load(folder / name))
    return weights


def _torch_load(path: Path, numpy: bool = False) -> Any:
    """``torch.load(weights_only=True)``; the Trainer's RNG file holds NumPy's state, so for
    it the few NumPy types it is made of are allowed (as the Trainer itself does to read it)."""
    import torch

    allowed: list[Any] = []
    if numpy:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling error names a type deep in a long message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read with torch.load(weights_only=True): {first}") from None


def _mid_epoch(trainer_state: Mapping[str, Any] | None) -> bool:
    """Whether the folder was saved inside an epoch (the Trainer had fetched the next batch)."""
    epoch = (trainer_state or {}).get("epoch")
    return isinstance(epoch, float) and not epoch.is_integer()


# -- what is left out --------------------------------------------------------------------------

def _without_clock(tree: Any) -> Any:
    """``tree`` without the mappings' keys named like a clock (:data:`TIMING`): wall time
    spent, samples per second; two runs never measure the same."""
    if isinstance(tree, Mapping):
        return {k: _without_clock(v) for k, v in tree.items() if not (isinstance(k, str) and TIMING.search(k))}
    if isinstance(tree, list):
        return [_without_clock(v) for v in tree]
    return tree


def _relative(tree: Any, run_dir: Path) -> Any:
    """``tree`` with its run directory written as ``{run_dir}`` in every string: a
    checkpoint callback's ``best_model_path``, the Trainer's ``best_model_checkpoint``
    name a file of their own run, which is where the other run has its own."""
    prefixes = sorted({str(run_dir), os.path.realpath(run_dir)}, key=len, reverse=True)

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            for prefix in prefixes:
                x = x.replace(prefix, RUN_DIR)
            return x
        if isinstance(x, Mapping):  # keys too: ModelCheckpoint's best_k_models is keyed by path
            return {walk(k): walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return tuple(walk(v) for v in x)
        return x

    return walk(tree)
