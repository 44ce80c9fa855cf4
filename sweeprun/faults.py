"""Deterministic crash points for fault-injection tests.

Code that writes state calls ``crash_point("name")`` at the moments where a
machine could die. With ``SWEEPRUN_CRASH_AT=name`` (or ``name@N`` for the N-th
time that point is reached, or several, comma-separated) the process SIGKILLs
itself there, which is exactly what a lost machine looks like.

``SWEEPRUN_FREEZE_AT`` (same syntax) makes it SIGSTOP itself there instead: a
machine that froze (a paused VM, a suspended laptop) and wakes up when sent
SIGCONT, by which time its run may have moved on. Unset, a point costs two
dictionary lookups.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

from . import settings

ENV = settings.CRASH_AT.name
FREEZE_ENV = settings.FREEZE_AT.name

#: Every point the code defines; tests iterate over this to prove recovery at each.
POINTS = (
    "checkpoint.snapshot_taken",   # an asynchronous save's snapshot taken, its write not begun
    "checkpoint.mid_write",        # a checkpoint's temp file partly written (after the first chunk)
    "checkpoint.before_rename",    # temp file complete and fsynced, not yet renamed
    "checkpoint.before_manifest",  # data file in place, manifest not written
    "checkpoint.before_rank_state",  # a multi-rank save: this rank's shards written, its own state not yet
    "checkpoint.rank_written",     # a multi-rank save: this rank's part durable, not yet reported to rank 0
    "checkpoint.before_retention",  # a multi-rank save committed, the checkpoints it replaces not yet removed
    "metrics.after_append",        # a metrics.jsonl line appended (e.g. a validation loss)
    "training.before_finished",    # the final checkpoint durable, attempts/<n>.finished not written
    "rollback.before_record",      # a loss-spike rollback: this rank's data position written, no record yet
    "rollback.after_record",       # its record written, the checkpoints it set aside not yet deleted
    "runner.before_done",          # child exited 0, DONE not yet written
    "runner.after_done",           # DONE written, the ledger not yet told
    "ledger.in_claim",             # inside the claim transaction, before commit
    "ledger.in_heartbeat",         # inside the heartbeat transaction, before commit
    "ledger.in_forget",            # inside the transaction that applies reset markers, before commit
    "reset.before_older_markers_go",  # a reset's new marker written, older ones of the run still there
    "reset.before_set_aside",      # a reset: the run's done entry gone, its folder not yet moved, no marker yet
)

_hits: Counter[str] = Counter()


def check() -> None:
    """Refuse a malformed ``SWEEPRUN_CRASH_AT``/``SWEEPRUN_FREEZE_AT`` up front, in one
    line, instead of mid-run."""
    from .errors import SpecError

    for env, setting in ((ENV, settings.CRASH_AT), (FREEZE_ENV, settings.FREEZE_AT)):
        spec = setting.get()
        if not spec:
            continue
        for item in spec.split(","):
            point, sep, nth = item.strip().partition("@")
            if point not in POINTS:
                raise SpecError(f"{env}={spec!r}: unknown crash point {point!r}; known: {', '.join(POINTS)}")
            if sep and not (nth.isascii() and nth.isdigit() and 0 < int(nth) < 10**9):
                raise SpecError(f"{env}={spec!r}: {item.strip()!r} needs a positive count after '@'")


def _named(spec: str, name: str) -> bool:
    """Whether ``spec`` names this point at this hit."""
    for item in spec.split(","):
        point, _, nth = item.strip().partition("@")
        if point == name and (not nth or (nth.isdigit() and int(nth) == _hits[name])):
            return True
    return False


def crash_point(name: str) -> None:
    crash, freeze = settings.CRASH_AT.get(), settings.FREEZE_AT.get()
    if not crash and not freeze:
        return
    _hits[name] += 1
    if crash and _named(crash, name):
        os.kill(os.getpid(), signal.SIGKILL)
    if freeze and _named(freeze, name):
        # To this thread: it starts the stop itself before running another line. Sent to the
        # process, another thread would start it, and this one could go on writing meanwhile.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)   # every thread stops
