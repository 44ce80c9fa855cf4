"""Deterministic crash points for fault-injection tests.

Code that writes state calls ``crash_point("name")`` at the moments where a
machine could die. With ``SWEEPRUN_CRASH_AT=name`` (or ``name@N`` for the N-th
time that point is reached, or several, comma-separated) the process SIGKILLs
itself there, which is exactly what a lost machine looks like. Unset, the call
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "SWEEPRUN_CRASH_AT"

#: Every point the code defines; tests iterate over this to prove recovery at each.
POINTS = (
    "checkpoint.snapshot_taken",   # an asynchronous save's snapshot taken, its write not begun
    "checkpoint.mid_write",        # a checkpoint's temp file partly written (after the first chunk)
    "checkpoint.before_rename",    # temp file complete and fsynced, not yet renamed
    "checkpoint.before_manifest",  # data file in place, manifest not written
    "metrics.after_append",        # a metrics.jsonl line appended (e.g. a validation loss)
    "runner.before_done",          # child exited 0, DONE not yet written
    "runner.after_done",           # DONE written, the ledger not yet told
    "ledger.in_claim",             # inside the claim transaction, before commit
    "ledger.in_heartbeat",         # inside the heartbeat transaction, before commit
)

_hits: Counter[str] = Counter()


def check() -> None:
    """Refuse a malformed ``SWEEPRUN_CRASH_AT`` up front, in one line, instead of mid-run."""
    from .errors import SpecError

    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, sep, nth = item.strip().partition("@")
        if point not in POINTS:
            raise SpecError(f"{ENV}={spec!r}: unknown crash point {point!r}; known: {', '.join(POINTS)}")
        if sep and not (nth.isascii() and nth.isdigit() and 0 < int(nth) < 10**9):
            raise SpecError(f"{ENV}={spec!r}: {item.strip()!r} needs a positive count after '@'")


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    _hits[name] += 1
    for item in spec.split(","):
        point, _, nth = item.strip().partition("@")
        if point == name and (not nth or (nth.isdigit() and int(nth) == _hits[name])):
            os.kill(os.getpid(), signal.SIGKILL)
