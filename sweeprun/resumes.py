"""What the training side recorded of an attempt's start (``attempts/<n>.started``): the world
size it ran at and, after a resume at another world size, that the resume was approximate.

The record is written by rank 0 under the launcher (:mod:`sweeprun.training.start`, rewritten
by :mod:`sweeprun.training.restore` on a resume at another world size) and read here for
``status`` and ``show``, which never import torch, and by the launcher when the attempt ends:
the ledger keeps the run's resume with its row (:meth:`~sweeprun.ledger.base.Ledger.finish`). It lies in a store anyone may write to:
a field of another type is passed over on its own, and a record that does not read at all
is reported as damaged (``show`` says so in one line), never raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec

from .errors import StoreError
from .numbers import bounded_int
from .store import layout, read_json

#: A start record is a few hundred bytes; anything past this is not one of sweeprun's.
STARTED_MAX_BYTES = 16 * 1024
#: The most processes a record's world size may name (anything larger is not a world size).
WORLD_SIZE_MAX = 1 << 20


@dataclass(frozen=True)
class Resume:
    """A resume from a checkpoint saved at another world size: the model and optimizer were
    resharded exactly, what ``approximate`` names (RNG, data position) could not follow."""

    attempt: int
    checkpoint: str | None
    step: int | None
    saved_world_size: int
    world_size: int | None      # the resuming attempt's (None: its record does not say)
    approximate: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "checkpoint": self.checkpoint, "step": self.step,
                "saved_world_size": self.saved_world_size, "world_size": self.world_size,
                "approximate": list(self.approximate)}

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Resume | None:
        """What :meth:`as_json` wrote, as a ledger keeps it (a text column); anything else (no
        value, a damaged one, one edited by hand) is ``None``, never an error: the mark is only
        shown, and the store's start records still tell each attempt's resume."""
        try:
            found = json.loads(text) if text else None
        except (TypeError, ValueError, RecursionError):
            return None
        if not isinstance(found, dict) or (attempt := bounded_int(found.get("attempt"), 1)) is None:
            return None
        world_size = bounded_int(found.get("world_size"), 1, WORLD_SIZE_MAX)
        return _resume(attempt, found, "saved_world_size", world_size)

    def text(self) -> str:
        """``resumed from step 8 saved at 2 processes, now 1: approximate (rng, data position)``."""
        step = f" from step {self.step}" if self.step is not None else ""
        now = f", now {self.world_size}" if self.world_size is not None else ""
        what = f" ({', '.join(self.approximate)})" if self.approximate else ""
        return f"resumed{step} saved at {self.saved_world_size} processes{now}: approximate{what}"


@dataclass(frozen=True)
class Started:
    """One attempt's start record, as far as it reads."""

    attempt: int
    world_size: int | None = None
    resume: Resume | None = None
    #: Why the record did not read (damaged, not JSON, not an object); ``None`` when it did.
    problem: str | None = None


def newest(*found: Resume | None) -> Resume | None:
    """The resume of the highest attempt among ``found`` (``None`` when none): the ledger's
    record of an ended attempt, or the store's of a later one still running or run elsewhere."""
    return max((r for r in found if r is not None), key=lambda r: r.attempt, default=None)


def _resume(attempt: int, fields: dict[str, Any], saved_key: str, world_size: int | None) -> Resume | None:
    """A :class:`Resume` from ``fields``, where ``saved_key`` names the saving world size; a
    field of the wrong type counts as absent, and without a saving world size there is none."""
    saved = bounded_int(fields.get(saved_key), 1, WORLD_SIZE_MAX)
    if saved is None:
        return None
    listed = fields.get("approximate")
    approximate = tuple(a for a in listed if isinstance(a, str) and a) if isinstance(listed, list) else ()
    checkpoint = fields.get("checkpoint")
    return Resume(attempt, checkpoint if isinstance(checkpoint, str) and checkpoint else None,
                  bounded_int(fields.get("step")), saved, world_size, approximate)


def parse_started(attempt: int, record: Any) -> Started:
    """A decoded ``attempts/<n>.started``; fields of the wrong type count as absent."""
    if not isinstance(record, dict):
        return Started(attempt, problem="not a JSON object")
    world_size = bounded_int(record.get("world_size"), 1, WORLD_SIZE_MAX)
    resumed = record.get(layout.STARTED_RESUMED)
    resume = _resume(attempt, resumed, "world_size", world_size) if isinstance(resumed, dict) else None
    return Started(attempt, world_size, resume)


def read_started(fs: fsspec.AbstractFileSystem, path: str, attempt: int) -> Started:
    """Read and parse one start record; a missing, unreadable or damaged one is a
    :class:`Started` with its ``problem``."""
    try:
        return parse_started(attempt, read_json(fs, path, STARTED_MAX_BYTES))
    except StoreError as exc:
        return Started(attempt, problem=str(exc).splitlines()[0] if str(exc) else "unreadable")
    except ValueError:  # a damaged file, or not text
        return Started(attempt, problem="not JSON")


def started_numbers(files: dict[str, float] | set[str]) -> list[int]:
    """The attempts that have a ``.started`` record in a run's listing (paths in its folder), in order."""
    out = []
    for rel in files:
        folder, _, name = rel.partition("/")
        parsed = layout.parse_attempt_record(name) if folder == layout.ATTEMPTS else None
        if parsed and parsed[1] == "started":
            out.append(parsed[0])
    return sorted(out)


def has_sharded_checkpoint(files: dict[str, float] | set[str]) -> bool:
    """Does a run's listing hold a multi-rank checkpoint (``checkpoints/<stem>.dcp/...``)?
    A run that has one may resume at another world size even when its sweep file now says 1."""
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == layout.CHECKPOINTS:
            name = layout.CheckpointName.parse(parts[1])
            if name is not None and parts[1] == name.shards:
                return True
    return False
