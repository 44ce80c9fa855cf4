"""sweeprun: idempotent hyperparameter sweeps for PyTorch that survive interruptions.

The launcher side (spec, store, ledger, runner) never imports torch; the
training-side API is loaded on first use, so ``import sweeprun`` stays light.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError, LeaseLost, LedgerError, SpecError, StoreError, SweeprunError
from .identity import RunSpec, canonical_params, run_id
from .runenv import PREEMPTED_EXIT
from .spec import SweepSpec, load_spec, parse_spec
from .store import RunPaths, SweepPaths, atomic_write, open_store
from .sweep import Sweep

__version__ = "0.1.0"

#: Training-side names, imported lazily (they pull in torch).
_TRAINING = {"init": "training.run", "Run": "training.run", "load_checkpoint": "training.run",
             "ResumableSampler": "training.sampler"}

__all__ = [
    "PREEMPTED_EXIT", "CheckpointError", "LeaseLost", "LedgerError", "RunPaths", "RunSpec",
    "SpecError", "StoreError", "Sweep", "SweepPaths", "SweepSpec", "SweeprunError", "atomic_write",
    "canonical_params", "load_spec", "open_store", "parse_spec", "run_id", *_TRAINING,
]


def __getattr__(name: str) -> Any:
    module = _TRAINING.get(name)
    if module is None:
        raise AttributeError(f"module 'sweeprun' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
