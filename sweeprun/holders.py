"""Who holds a run right now, as any machine can tell: the lease protocol's own rule, the one
answer for ``status``, ``reset`` and ``gc`` (issue 19).

A lease in the store is held until it is released, its holder is a provably gone process
of this host, or its beat has stood still for ``lease_s`` by the observer's *own* clock
(:meth:`~sweeprun.leases.StoreLeases.holder`). No store timestamp is ever compared with
this machine's clock: a machine whose clock runs 45 s fast must not see a live run as
abandoned, and ``reset`` must never move the folder of a run trained elsewhere.

A taker watches a beat across its looks; a one-shot command cannot, so what this machine
has seen of each beat is kept across commands in ``$SWEEPRUN_HOME/watch/`` (the boot clock
is the machine's, and a reboot forgets it). ``status`` shows a lease not yet proven stale
as held, and proves it stale at a later call; ``reset`` and ``gc``, which move and delete
files, watch the beats themselves for up to one lease (:func:`watch_holders`) and refuse
while any is not proven stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import fsspec

from .lease_records import Holding, _Listing
from .leases import StoreLeases
from .procs import boot_clock
from .store import layout

#: How long a one-shot command's observation of a beat is kept: older ones are dropped.
WATCH_MEMORY_S = 7 * 86400.0


@dataclass(frozen=True)
class LeaseView:
    """A run's lease as ``status`` sees it in the listing it makes anyway (no extra request
    but one small read of the holder's record)."""

    generation: int
    released: bool
    contested: bool
    #: The store's timestamp of the holder's last beat (or of its record, before the first
    #: beat). Only for showing an age: no holder is judged by it.
    beat_mtime: float


def lease_view(files: Mapping[str, float], now: float | None = None,
               settle_s: float = 0.0) -> LeaseView | None:
    """The lease in a run's listing (``relative path -> mtime``, as
    :meth:`~sweeprun.store.SweepPaths.listing` gives); ``None`` when the run was never leased.

    Contested as :meth:`~sweeprun.leases._Listing.contested` says, a claim counting as past
    its settle rounds once the store's timestamp of it is ``2 * settle_s`` older than
    ``now`` (a display only: the flag moves nothing).
    """
    folder = layout.LEASE + "/"
    names = {path[len(folder):]: mtime for path, mtime in files.items() if path.startswith(folder)}
    listing = _Listing.parse(names)
    top = listing.top
    if top is None:
        return None
    beat = names.get(layout.lease_name(top, "beat"), names.get(layout.lease_name(top, "json"), 0.0))
    now = time.time() if now is None else now

    def settled(gen: int, nonce: str) -> bool:
        return now - names.get(layout.lease_name(gen, "claim", nonce), now) > 2 * settle_s

    return LeaseView(top, top in listing.released, listing.contested(settled), beat)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class HolderWatch:
    """This machine's watch over one sweep's leases, remembered across commands."""

    def __init__(self, fs: fsspec.AbstractFileSystem, sweep_url: str, *, lease_s: float,
                 settle_s: float = 0.0, home: Path | None = None,
                 clock: Callable[[], float] = boot_clock) -> None:
        self.leases = StoreLeases(fs, lease_s=lease_s, settle_s=settle_s, clock=clock)
        self.clock = clock
        key = hashlib.sha256(sweep_url.encode(errors="surrogateescape")).hexdigest()[:16]
        self.path = None if home is None else home / "watch" / f"{key}.json"
        self._load()

    def holder(self, run_dir: str, generation: int | None = None, released: bool = False) -> Holding:
        return self.leases.holder(run_dir, generation, released)

    def _load(self) -> None:
        self._loaded: dict[str, list[object]] = {}
        if self.path is None:
            return
        try:
            doc = json.loads(self.path.read_bytes())
            if doc.get("boot") == _boot_id() and isinstance(doc.get("seen"), dict):
                now = self.clock()
                self.leases.remember({run: e for run, e in doc["seen"].items()
                                      if isinstance(e, list) and len(e) == 3
                                      and isinstance(e[2], (int, float)) and 0 <= now - e[2] < WATCH_MEMORY_S})
                self._loaded = self.leases.remembered()
        except (OSError, ValueError, AttributeError):
            pass  # no memory yet, or a damaged one: the watch starts now

    def save(self) -> None:
        """Keep what was seen for the next command (atomically; a failure only forgets).
        Nothing is written when nothing new was seen (a sweep whose leases are all released)."""
        seen = self.leases.remembered()
        if self.path is None or seen == self._loaded:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".watch-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"boot": _boot_id(), "seen": seen}, f)
            os.replace(tmp, self.path)
            self._loaded = seen
        except OSError:
            pass


def watch_holders(watch: HolderWatch, leased: Mapping[str, tuple[str, int]], limit_s: float, *,
                  poll_s: float = 0.5, sleep: Callable[[float], object] = time.sleep,
                  note: Callable[[str], None] | None = None) -> dict[str, str]:
    """The runs of ``leased`` (``run id -> (folder, generation)``, the unreleased leases of a
    listing) whose store lease is held: what ``reset``
    and ``gc`` refuse to touch. A lease the watch cannot yet call free is watched, by this
    machine's clock, for up to ``limit_s``: a beat that moves is a live holder (answered at
    once); one that stands still for the holder's ``lease_s`` frees its run. Still undecided
    after ``limit_s`` (a holder whose own lease is longer), it counts as held: moving or
    deleting files must never rest on a guess. What was seen is kept for the next command.
    """
    held: dict[str, Holding] = {}
    waiting: dict[str, Holding] = {}
    try:
        for run_id, (run_dir, generation) in leased.items():
            look = watch.holder(run_dir, generation)
            if look.holder is not None:
                (held if look.moved else waiting)[run_id] = look
        if held or not waiting:
            return {run_id: str(look.holder) for run_id, look in {**waiting, **held}.items()}
        started = watch.clock()
        if note is not None:
            longest = max(look.left_s for look in waiting.values())
            note(f"watching the store leases of {len(waiting)} run(s) for up to {min(longest, limit_s):.0f} s "
                 "(this machine's clock) to tell a live holder from a lost one")
        while waiting and watch.clock() - started < limit_s:
            sleep(min(poll_s, max(0.0, limit_s - (watch.clock() - started))))
            for run_id in list(waiting):
                look = watch.holder(leased[run_id][0])
                if look.holder is None:
                    del waiting[run_id]
                elif look.moved:
                    return {run_id: str(look.holder)}
                else:
                    waiting[run_id] = look
        return {run_id: str(look.holder) for run_id, look in waiting.items()}
    finally:
        watch.save()

