"""What a run's loss-spike rollbacks left in its folder, for everyone who reads them.

A run started with ``sweeprun.init(spikes=...)`` that meets a NaN, an Inf or a spike in a
watched metric rolls back (:mod:`sweeprun.training.rollback`): it writes ``rollbacks/<k>.json``
(this module's :class:`RollbackRecord`), exits 75 and is started again at once; the new
attempt restores the record's checkpoint, never one written after the spike began, and
goes on past the spike's batches. After ``max_rollbacks`` the next spike ends the run
``diverged`` (the record says so, and ``attempts/<n>.diverged`` tells the launcher).

The records are the truth, kept in the store with the checkpoints they name, so every
machine and every ledger agree; the ledger keeps a summary per run for ``status``
(:class:`RollbackSummary`), and ``show`` reads the records themselves. Read here without
torch: ``status``, ``show`` and the launcher import this module. The folder lies in a store
anyone may write to: a record that does not read is passed over, never raised.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from .errors import StoreError
from .numbers import bounded_int
from .store import RunPaths, layout, read_json
from .store.errors import store_errors

#: A record is a few hundred bytes, plus the names of the checkpoints it set aside.
RECORD_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class RollbackRecord:
    """One rollback: the spike, the checkpoint restored and the batches passed over.

    The run goes on from ``resume_step``: the model, optimizer, scheduler and RNG are the
    checkpoint's (``restored_step``), the data position is where it was when the spike was
    confirmed (``step``) plus the policy's ``skip`` batches, so the batches of steps
    ``restored_step + 1`` to ``resume_step`` are never trained on again."""

    number: int
    attempt: int                 # the attempt that met the spike
    metric: str
    reason: str                  # "not finite" or "spike"
    value: float | None          # the metric's value when confirmed (None: NaN or Inf)
    start: int                   # the spike's first step
    step: int                    # the step it was confirmed at
    checkpoint: str | None       # the manifest stem restored; None: the run starts over
    restored_step: int
    resume_step: int
    abandoned: tuple[str, ...]   # checkpoints written since: never restored
    diverged: bool = False       # the cap was reached: nothing restored, the run ends
    #: Batches passed over: from the checkpoint to the spike's confirmation plus ``skip``.
    #: Where the script's steps follow its data, ``resume_step - restored_step``; where a
    #: framework counts its own steps (Lightning), the step stays the checkpoint's.
    skipped: int = 0
    #: Where a framework that counts its own steps (the Trainer) had its data ahead of its
    #: step when the spike came (earlier rollbacks' batches passed over), in steps.
    data_offset: int = 0
    metrics_bytes: int | None = None
    world_size: int = 1
    at: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"number": self.number, "attempt": self.attempt, "metric": self.metric,
                "reason": self.reason, "value": self.value, "start": self.start, "step": self.step,
                "checkpoint": self.checkpoint, "restored_step": self.restored_step,
                "resume_step": self.resume_step, "skipped": self.skipped, "data_offset": self.data_offset,
                "abandoned": list(self.abandoned),
                "diverged": self.diverged, "metrics_bytes": self.metrics_bytes,
                "world_size": self.world_size, "at": self.at}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.as_json(), allow_nan=False) + "\n").encode()

    @classmethod
    def parse(cls, number: int, found: Any) -> RollbackRecord | None:
        """A decoded record; ``None`` when it is not one (a field of the wrong type)."""
        if not isinstance(found, dict):
            return None
        ints = {k: bounded_int(found.get(k)) for k in ("attempt", "start", "step", "restored_step",
                                                       "resume_step")}
        if any(v is None for v in ints.values()) or not ints["attempt"]:
            return None
        metric, reason, checkpoint = found.get("metric"), found.get("reason"), found.get("checkpoint")
        abandoned = found.get("abandoned")
        if not (isinstance(metric, str) and isinstance(reason, str) and isinstance(abandoned, list)
                and (checkpoint is None or isinstance(checkpoint, str))):
            return None
        value = found.get("value")
        value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        at = found.get("at")
        return cls(number=number, attempt=ints["attempt"] or 1, metric=metric, reason=reason,
                   value=value if value is None or math.isfinite(value) else None,
                   start=ints["start"] or 0, step=ints["step"] or 0, checkpoint=checkpoint,
                   restored_step=ints["restored_step"] or 0, resume_step=ints["resume_step"] or 0,
                   skipped=bounded_int(found.get("skipped"))
                   or max(0, (ints["resume_step"] or 0) - (ints["restored_step"] or 0)),
                   data_offset=bounded_int(found.get("data_offset")) or 0,
                   abandoned=tuple(a for a in abandoned if isinstance(a, str)),
                   diverged=found.get("diverged") is True,
                   metrics_bytes=bounded_int(found.get("metrics_bytes")),
                   world_size=bounded_int(found.get("world_size"), 1) or 1,
                   at=float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None)

    def text(self) -> str:
        """``step 27: loss not finite (since step 25); rolled back to step 20 (ckpt-...), 7 batches skipped``."""
        what = (f"{self.metric} {self.reason}" if self.value is None
                else f"{self.metric} {self.value:.6g} ({self.reason})")
        since = f" since step {self.start}" if self.start != self.step else ""
        head = f"step {self.step}: {what}{since}"
        if self.diverged:
            return f"{head}; diverged: rollbacks used up, the run ended"
        where = f"{self.checkpoint}, step {self.restored_step}" if self.checkpoint else "the start"
        return f"{head}; rolled back to {where}, {self.skipped} batch(es) skipped"


def read_rollbacks(fs: fsspec.AbstractFileSystem, folder: str) -> list[RollbackRecord]:
    """The run's rollback records in ``folder`` (its ``rollbacks/``), in order; one that does
    not read is left out (``show`` still lists the files). A store that cannot be listed is a
    :class:`~sweeprun.errors.StoreError`: a restore must not miss a rollback."""
    with store_errors("list", folder):
        try:
            names = [posixpath.basename(str(e["name"]).rstrip("/"))
                     for e in fs.ls(folder, detail=True) if e.get("type") == "file"]
        except FileNotFoundError:
            return []
    out = []
    for name in names:
        number = layout.parse_rollback(name)
        if number is None:
            continue
        try:
            found = read_json(fs, posixpath.join(folder, name), RECORD_MAX_BYTES)
        except (StoreError, ValueError):
            continue
        record = RollbackRecord.parse(number, found)
        if record is not None:
            out.append(record)
    return sorted(out, key=lambda r: r.number)


@dataclass(frozen=True)
class RollbackSummary:
    """What the ledger keeps of a run's rollbacks (a text column): how many, the last one."""

    count: int
    diverged: bool
    step: int | None            # the last one's: where the spike was confirmed
    restored_step: int | None
    checkpoint: str | None
    skipped: int

    @classmethod
    def of(cls, records: list[RollbackRecord]) -> RollbackSummary | None:
        if not records:
            return None
        last = records[-1]
        return cls(count=sum(not r.diverged for r in records), diverged=last.diverged, step=last.step,
                   restored_step=last.restored_step, checkpoint=last.checkpoint,
                   skipped=sum(r.skipped for r in records if not r.diverged))

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count, "diverged": self.diverged, "step": self.step,
                "restored_step": self.restored_step, "checkpoint": self.checkpoint, "skipped": self.skipped}

    @classmethod
    def from_json(cls, text: str | bytes | None) -> RollbackSummary | None:
        """What :meth:`as_json` wrote; anything else is ``None`` (the mark is only shown)."""
        try:
            found = json.loads(text) if text else None
        except (TypeError, ValueError, RecursionError):
            return None
        if not isinstance(found, dict) or (count := bounded_int(found.get("count"))) is None:
            return None
        checkpoint = found.get("checkpoint")
        return cls(count=count, diverged=found.get("diverged") is True, step=bounded_int(found.get("step")),
                   restored_step=bounded_int(found.get("restored_step")),
                   checkpoint=checkpoint if isinstance(checkpoint, str) else None,
                   skipped=bounded_int(found.get("skipped")) or 0)

    def mark(self) -> str:
        """``↺2`` for ``status``: rolled back twice (``diverged`` says itself in the state)."""
        return f"↺{self.count}" if self.count else ""


def oom_attempts(paths: RunPaths) -> list[int]:
    """The attempts of a run that ran out of accelerator memory (``attempts/<n>.oom``): how
    many retries its ``on_oom`` policy has used (:data:`~sweeprun.runenv.OOM_EXIT`)."""
    with store_errors("list", paths.attempts):
        try:
            names = [posixpath.basename(str(e["name"]).rstrip("/")) for e in paths.fs.ls(paths.attempts, detail=True)]
        except FileNotFoundError:
            return []
    found = [layout.parse_attempt_record(n) for n in names]
    return sorted(r[0] for r in found if r is not None and r[1] == "oom")


def set_aside(records: list[RollbackRecord]) -> set[str]:
    """The checkpoints the records set aside: never restored, whichever record named them."""
    return {name for r in records for name in r.abandoned}


def attempt_rollback(records: list[RollbackRecord], attempt: int) -> RollbackRecord | None:
    """The rollback attempt ``attempt`` ended with, if it ended with one."""
    return next((r for r in reversed(records) if r.attempt == attempt), None)
