"""sweeprun: idempotent hyperparameter sweeps for PyTorch that survive interruptions.

The launcher side (spec, store, ledger, runner) never imports torch; every public name
is loaded on first use, so ``import sweeprun`` stays light: ``sweeprun --help`` imports
this package first, and must not pay for fsspec, SQLite helpers or the spec parser.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError, LeaseLost, LedgerError, SpecError, StoreError, SweeprunError

__version__ = "0.1.0"

#: Public names -> the module that defines them, imported on first use.
_LAZY = {
    "RunSpec": "identity", "canonical_params": "identity", "run_id": "identity",
    "PREEMPTED_EXIT": "runenv",
    "SweepSpec": "spec", "load_spec": "spec", "parse_spec": "spec",
    "RunPaths": "store", "SweepPaths": "store", "atomic_write": "store", "open_store": "store",
    "Sweep": "sweep",
    # training side: these pull in torch
    "init": "training.start", "Run": "training.run", "load_checkpoint": "training.load",
    "ResumableSampler": "training.sampler", "Spikes": "training.spikes",
}

__all__ = [
    "CheckpointError", "LeaseLost", "LedgerError", "SpecError", "StoreError", "SweeprunError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sweeprun' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
