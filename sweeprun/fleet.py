"""Operating many workers: a deadline for one worker, and a stop request for all of them.

A Kaggle session ends after 12 hours, a SLURM job at its time limit, a spot VM at
its reservation's end: a worker that knows its deadline stops claiming in time and
has its runs checkpoint and exit before it, instead of being killed mid-step.

``sweeprun stop`` must reach workers on machines that share nothing but the store
(the ledger may be a local SQLite file on each), so the request is a ``STOP`` file
in the sweep's folder. Each request has a fresh id, and a worker obeys only a
request it did not see when it started: no clock is compared across machines, and a
worker started after a stop (the user relaunching) is not stopped by it.

One sweep is coordinated one way (SPEC): the store records how in ``COORDINATION``
(:class:`CoordinationRecord`), and a worker whose ledger would coordinate differently
(a machine without ``SWEEPRUN_LEDGER`` beside a PostgreSQL fleet, another database) is
refused before it writes anything, rather than run every run a second time.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import settings
from .errors import LedgerError, SpecError, StoreError
from .redact import record_bytes
from .store import SweepPaths, atomic_write, create_only, read_json, read_regular, write_json
from .training.checkpoints import warn_once

if TYPE_CHECKING:
    from .ledger import Ledger


#: ``[0-9]``, never ``\d``: ``float()`` reads ``'١٢'`` as 12, and a time limit is ASCII.
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([dhms])", re.IGNORECASE)
_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
MAX_TIME_LIMIT_S = 366 * 86400.0


def parse_duration(text: str, option: str = "--time-limit") -> float:
    """``11h``, ``90m``, ``1h30m``, ``2d``, ``45s`` or a plain number of seconds."""
    raw = text.strip()
    seconds: float | None = None
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", raw):
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
        self.path = paths.stop

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
            # `touch STOP`, a file sweeprun did not write, or a request a Drive has synced only
            # in part: no news, with one warning. It neither stops a worker nor blocks a
            # launch; `sweeprun stop` writes a request that does.
            warn_once(f"{self.fs.unstrip_protocol(self.path)} is not a stop request written "
                      "by `sweeprun stop` (empty or damaged); ignored: use `sweeprun stop` to stop "
                      "the sweep's workers")
            return None
        return request

    def request(self) -> str:
        """Ask every worker running now to stop; returns the request's id."""
        ident = uuid.uuid4().hex
        write_json(self.fs, self.path, {"id": ident, "by": f"{socket.gethostname()}:{os.getpid()}",
                                        "requested_at": time.time()})
        return ident


def stop_poll_s() -> float:
    return settings.STOP_POLL_S.value()


#: How a sweep is coordinated without a shared database: each machine's own ledger, and a
#: lease in the store for every run (:mod:`sweeprun.leases`).
STORE_LEASES = "store-leases"
#: The flag that moves a sweep to the launching worker's way on purpose.
MOVE_FLAG = "--move-ledger"
_SHOWN = {"postgresql": "PostgreSQL"}


@dataclass(frozen=True)
class Coordination:
    """How one sweep's workers are kept apart; the one place that says whether a worker
    takes store leases (:attr:`store_leases`) and whether two workers agree (:meth:`agrees`).

    ``store-leases``: each machine's own SQLite ledger, plus a lease in the store for every
    run: works with nothing but a folder or a bucket (Colab and Drive, spot VMs). Otherwise
    a shared ledger's backend (``postgresql``), which keeps machines apart itself, with
    ``ident``, a random id its database holds: every URL that reaches that database agrees
    (another hostname, a pooler's port), another database does not. ``where`` only names it
    in messages (host:port/database): no credential is ever recorded.
    """

    kind: str
    ident: str = ""
    where: str = ""

    @classmethod
    def of(cls, ledger: Ledger) -> Coordination:
        return cls(STORE_LEASES) if ledger.store_leases else cls(*ledger.shared())

    @property
    def store_leases(self) -> bool:
        return self.kind == STORE_LEASES

    def agrees(self, other: Coordination) -> bool:
        return (self.kind, self.ident) == (other.kind, other.ident)

    def describe(self) -> str:
        if self.store_leases:
            return "leases in the store (a SQLite ledger on each machine)"
        return f"the {_SHOWN.get(self.kind, self.kind)} ledger {self.where} (id {self.ident[:8]})"

    def to_bytes(self) -> bytes:
        doc = {"kind": self.kind} if self.store_leases else {"kind": self.kind, "id": self.ident,
                                                             "where": self.where}
        return record_bytes(doc)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Coordination:
        doc = json.loads(blob)
        if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str) or not doc["kind"]:
            raise ValueError("no kind")
        return cls(doc["kind"], str(doc.get("id") or ""), str(doc.get("where") or ""))


class CoordinationRecord:
    """``<store>/<sweep>/COORDINATION``: how the sweep is coordinated.

    Created by the sweep's first launch, create-only, so two first launchers at once agree
    on one record (an old sweep without one is adopted by its first launch the same way);
    read by every later launch and, every few seconds, by running workers; replaced only by
    a deliberate move (:data:`MOVE_FLAG`). ``status`` and ``show`` never look at it: they
    only read, whatever the ledger.
    """

    def __init__(self, paths: SweepPaths) -> None:
        self.fs = paths.fs
        self.path = paths.coordination

    def read(self) -> Coordination | None:
        """The record, ``None`` when there is none; a :class:`StoreError` when it cannot be
        read or is not one of ours (its ``__cause__`` a ``ValueError`` then)."""
        try:
            blob = read_regular(self.fs, self.path, 4096)
        except StoreError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise
        try:
            return Coordination.from_bytes(blob)
        except ValueError as exc:
            raise StoreError(f"{self.fs.unstrip_protocol(self.path)} is not a coordination "
                             f"record written by sweeprun; launch once with {MOVE_FLAG} to replace it "
                             "with this worker's") from exc

    def join(self, mine: Coordination, sweep: str, *, move: bool = False,
             holders: Callable[[], Mapping[str, str]] = dict, settle_s: float = 0.0,
             sleep: Callable[[float], object] = time.sleep) -> str | None:
        """Let a worker coordinated as ``mine`` launch, or refuse it (:class:`LedgerError`).

        The first launch records ``mine``. On a folder that shows writes late (``settle_s``,
        Drive), a record just created is read again after ``settle_s``: another machine's
        create of the same name may have replaced it there. With ``move``, the record is
        replaced by ``mine``, unless ``holders()`` (runs held under store leases) shows a
        run still held: those workers cannot see this one's claims. Returns a note for the
        user when the sweep was moved.
        """
        shown = f"sweep {sweep} in {self.fs.unstrip_protocol(posixpath.dirname(self.path))}"
        try:
            found = self.read()
        except StoreError as exc:
            if not (move and isinstance(exc.__cause__, ValueError)):
                raise
            atomic_write(self.fs, self.path, mine.to_bytes())  # a stray file: nothing to move from
            return f"{shown} is now coordinated by {mine.describe()} (its record was unreadable)"
        if found is None:
            created = create_only(self.fs, self.path, mine.to_bytes())
            if created and not settle_s:
                return None
            if created:
                sleep(settle_s)
            found = self.read() or mine
        if found.agrees(mine):
            return None
        if not move:
            same = ("run it with its own SQLite ledger (no postgresql:// in --ledger, "
                    "SWEEPRUN_LEDGER or `ledger:`)" if found.store_leases else
                    "give it the same ledger (--ledger or SWEEPRUN_LEDGER)")
            raise LedgerError(f"{shown} is coordinated by {found.describe()}, and this worker "
                              f"would coordinate by {mine.describe()}: the two cannot see "
                              f"each other's runs and would run them twice. {same[0].upper()}{same[1:]}, "
                              "or, to move the sweep to this ledger, stop its workers (`sweeprun stop`) "
                              f"and launch again with {MOVE_FLAG}")
        if found.store_leases:
            held = holders()
            if held:
                run_id, holder = sorted(held.items())[0]
                raise LedgerError(f"cannot move {shown} to {mine.describe()}: run {run_id} is still "
                                  f"held by {holder} under {found.describe()} ({len(held)} run(s) "
                                  "held); stop its workers (`sweeprun stop`), wait until they "
                                  "exit, and run this again")
        atomic_write(self.fs, self.path, mine.to_bytes())
        return (f"{shown} is now coordinated by {mine.describe()}, moved from {found.describe()}; "
                "workers still running the old way stop within seconds of seeing the move")
