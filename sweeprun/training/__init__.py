"""The training-side API, by responsibility: :mod:`.start` (:func:`init`), :mod:`.run`
(the :class:`Run` a script drives), :mod:`.load` (:func:`load_checkpoint`), :mod:`.state`
(capture/restore), :mod:`.checkpoints` (names, manifests, retention, verified reads),
:mod:`.writer` (file I/O of a save), :mod:`.sampler`, :mod:`.metrics`.

Nothing here imports torch at import time, and the public names load on first use:
the launcher reads metrics through :func:`.metrics.parse_entries` and must stay light.
"""

from __future__ import annotations

from typing import Any

_NAMES = {"init": "start", "Run": "run", "load_checkpoint": "load", "ResumableSampler": "sampler"}

__all__ = ["Run", "ResumableSampler", "init", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'sweeprun.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
