"""Operating many workers: a deadline for one worker, and a stop request for all of them.

A Kaggle session ends after 12 hours, a SLURM job at its time limit, a spot VM at
its reservation's end: a worker that knows its deadline stops claiming in time and
has its runs checkpoint and exit before it, instead of being killed mid-step.

``sweeprun stop`` must reach workers on machines that share nothing but the store
(the ledger may be a local SQLite file on each), so the request is a ``STOP`` file
in the sweep's folder. Each request has a fresh id, and a worker obeys only a
request it did not see when it started: no clock is compared across machines, and a
worker started after a stop (the user relaunching) is not stopped by it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import socket
import time
import uuid
from dataclasses import dataclass

from .errors import SpecError, StoreError
from .redact import redact
from .store import SweepPaths, read_json, write_json
from .training.checkpoints import warn_once

#: How often a worker looks for a stop request (one small read of the store each time).
STOP_POLL_ENV = "SWEEPRUN_STOP_POLL_S"
DEFAULT_STOP_POLL_S = 5.0

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])", re.IGNORECASE)
_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
MAX_TIME_LIMIT_S = 366 * 86400.0


def parse_duration(text: str, option: str = "--time-limit") -> float:
    """``11h``, ``90m``, ``1h30m``, ``2d``, ``45s`` or a plain number of seconds."""
    raw = text.strip()
    seconds: float | None = None
    if re.fullmatch(r"\d+(?:\.\d+)?", raw):
        seconds = float(raw)
    elif raw and re.fullmatch(rf"(?:{_DURATION.pattern}\s*)+", raw, re.IGNORECASE):
        seconds = sum(float(n) * _SECONDS[u.lower()] for n, u in _DURATION.findall(raw))
    if seconds is None or not 0 < seconds <= MAX_TIME_LIMIT_S:
        raise SpecError(f"{option} {text!r}: give a duration such as 11h, 90m, 1h30m or 3600 "
                        "(seconds), more than 0 and at most 366 days")
    return seconds


@dataclass(frozen=True)
class Deadline:
    """When this worker must be gone, by its own monotonic clock.

    Children are asked to save at ``stop_at`` (``grace_s`` before the end, the time the
    sweep gives them to checkpoint and exit 75); claims end earlier still, at
    ``claims_end``, so a run is not started only to be stopped before doing any work.
    """

    end: float
    grace_s: float
    limit_s: float

    @classmethod
    def after(cls, seconds: float, grace_s: float) -> Deadline:
        return cls(end=time.monotonic() + seconds, grace_s=grace_s, limit_s=seconds)

    @property
    def stop_at(self) -> float:
        return self.end - self.grace_s

    @property
    def claims_end(self) -> float:
        # A run started later would get less than its own grace period of work, or a
        # minute, before it is asked to save: not worth the start-up (a tenth of a short
        # limit at most, so a short limit still runs something).
        return self.stop_at - min(max(60.0, self.grace_s), self.limit_s / 10)


class StopRequests:
    """``<store>/<sweep>/STOP``: the latest stop request, as ``{"id": ..., "by": ...}``."""

    def __init__(self, paths: SweepPaths) -> None:
        self.fs = paths.fs
        self.path = posixpath.join(paths.dir, "STOP")

    def current(self) -> str | None:
        """The id of the latest request, or ``None``; a :class:`StoreError` when the store
        cannot tell. A worker polling it takes an error as no news: a store that fails for a
        moment must not drain a fleet, only a request that reads back whole does."""
        try:
            found = read_json(self.fs, self.path)
        except StoreError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            if exc.__cause__ is not None:  # the store failed; a damaged STOP has no cause
                raise
            found = str(exc)
        except (ValueError, RecursionError):
            found = None
        request = found.get("id") if isinstance(found, dict) else None
        if not isinstance(request, str):
            # `touch STOP`, or a file sweeprun did not write: one warning, and it counts as a
            # request (workers already running stop; a launch started after it does not).
            warn_once(f"{redact(self.fs.unstrip_protocol(self.path))} is not a stop request written "
                      "by `sweeprun stop`; workers that were running before it stop, later ones do not")
            return "foreign:" + hashlib.sha256(repr(found).encode()).hexdigest()[:16]
        return request

    def request(self) -> str:
        """Ask every worker running now to stop; returns the request's id."""
        ident = uuid.uuid4().hex
        write_json(self.fs, self.path, {"id": ident, "by": f"{socket.gethostname()}:{os.getpid()}",
                                        "requested_at": time.time()})
        return ident


def stop_poll_s() -> float:
    raw = os.environ.get(STOP_POLL_ENV, "").strip()
    if not raw:
        return DEFAULT_STOP_POLL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 3600:
        raise SpecError(f"{STOP_POLL_ENV}={raw!r} must be a number of seconds between 0.05 and 3600; "
                        "unset it or fix its value")
    return value
