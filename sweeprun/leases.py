"""Leases kept in the store itself, so machines that share only a folder or a bucket never
run one run twice (issue 10; the design in docs/many-machines.md, "Leases in the store").

A run's lease is a series of small objects under ``runs/<run id>/lease/``, one per holder,
each created exclusively and never rewritten by anyone else::

    00000001.json      {"host", "worker", "generation", "nonce"}   created by the first taker
    00000001.beat      "17"        the holder's heartbeat: a counter, rewritten by it alone
    00000002.json      ...         a takeover: the holder is the author of the highest one
    00000002.released              the holder gave the run up: the next taker need not wait

The generation is the attempt number and fencing token every machine agrees on: each
machine's ledger counts attempts on its own, but there is only one ``00000002.json``.

Nothing here compares a remote clock with a local one. A taker takes over only when the
holder's beat *content* has not changed for ``lease_s`` on the taker's own monotonic clock,
remembered across calls in the :class:`StoreLeases` object; machines' wall clocks may
disagree by hours and nothing changes.

Folders that are only eventually consistent across machines (Google Drive mounted in two
Colab VMs) let two machines' exclusive creates both succeed. There ``settle_s`` turns
every take into claim-then-confirm (see :meth:`StoreLeases._settle`); it is safe as long as
the store shows a write to every machine within ``settle_s``. :func:`settle_default` turns
it on for the folders known to behave so; ``lease_settle_s:`` in the sweep file sets it.

The launcher (:mod:`sweeprun.runner`) takes a run's lease after its ledger claim and
before the child starts, renews it with every heartbeat and releases it when the attempt
ends; ``status``, ``reset`` and ``gc`` judge them by the same rule (:mod:`sweeprun.holders`).
"""

from __future__ import annotations

import os
import posixpath
import random
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import fsspec

from .errors import LeaseLost, SpecError, StoreError
from .lease_records import (
    GENERATION_MAX,
    HOLDER_LEASE_FACTOR,
    Holding,
    Lease,
    LeasePaths,
    LeaseRecord,
    LeaseState,
    _Listing,
    _Seen,
)
from .procs import HOST, ProcessRef, boot_clock
from .store import (
    SETTLE_DEFAULT_S,  # noqa: F401  (imported from here by callers and tests)
    atomic_write,
    backend_for,
    confine,
    create_only,
    native_path,
    remove,
    settle_default,  # noqa: F401  (imported from here by the launcher, sweep and tests)
    store_errors,
)
from .store.layout import LeaseName
from .training.checkpoints import warn_once

__all__ = ["GENERATION_MAX", "HOLDER_LEASE_FACTOR", "SETTLE_DEFAULT_S", "Holding", "Lease", "LeasePaths",
           "LeaseRecord", "LeaseState", "StoreLeases", "backoff_s", "settle_default"]

#: A take not over a stale holder: no beat to re-read before creating the generation.
_UNWATCHED = object()

#: Lease files are tens of bytes; anything larger is not one of ours and is read no further.
_READ_MAX = 4096



def backoff_s(attempt: int, *, base_s: float = 1.0, cap_s: float = 60.0,
              rng: random.Random | None = None) -> float:
    """How long an idle taker waits before its ``attempt``-th look (full jitter).

    N idle machines polling one store must not turn into a storm: the wait doubles up to
    ``cap_s``, and the jitter spreads machines that started together.
    """
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt))
    return (rng or random).uniform(0.0, ceiling)


class StoreLeases:
    """Take, renew and release run leases on one fsspec filesystem, as one worker.

    One object per worker: it remembers, by its own clock, how long each held lease's beat
    has stood still, so call :meth:`take` on the same object again and again (every
    ``lease_s / 3`` or so). Losing a race is ``None`` from :meth:`take`; losing a held lease
    is :class:`LeaseLost` from :meth:`renew`. Threads may share one object as long as one
    run is taken by one thread at a time (a launcher's ledger claim sees to that): what it
    remembers is per run.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, *, lease_s: float = 60.0,
                 settle_s: float = 0.0, host: str = HOST, worker: ProcessRef | str | None = None,
                 clock: Callable[[], float] = boot_clock,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        if not lease_s > 0:
            raise SpecError(f"lease_s must be a positive number of seconds, not {lease_s!r}")
        if not settle_s >= 0:
            raise SpecError(f"settle_s must be zero or a positive number of seconds, not {settle_s!r}")
        self.fs = fs
        self.lease_s = float(lease_s)
        self.settle_s = float(settle_s)
        self.host = host
        # The holder's pid and start time go into every record, so that a launcher of this
        # host can tell the holder is gone (killed) without waiting out lease_s.
        ref = ProcessRef.me() if worker is None else worker
        self.worker = ref.label if isinstance(ref, ProcessRef) else ref
        self.started = ref.start if isinstance(ref, ProcessRef) else None
        self.clock = clock
        self.sleep = sleep
        self._seen: dict[str, _Seen] = {}
        self._records: dict[tuple[str, int], LeaseRecord] = {}
        #: Settle claims by (run, generation, nonce): when this worker first saw each, by its
        #: own clock. A claim whose claimer died mid-settle is ignored once it is that old.
        self._claims_seen: dict[tuple[str, int, str], float] = {}

    # -- taking -------------------------------------------------------------------------------

    def take(self, run_dir: str, floor: Callable[[], int] | None = None) -> Lease | None:
        """The run's lease if this worker got it now; ``None`` when another holds it or won.

        A run never leased costs one exclusive create and no LIST. Otherwise one LIST finds
        the current generation and one read its beat; the next generation is created only
        when the current one was released or its beat stood still for ``lease_s`` by this
        object's clock, since its first call that saw it.

        ``floor()``: the highest attempt the run's files name (a sweep that ran before with
        no store leases, on a shared database). A run never leased then starts at the next
        generation, so that the generation is the attempt number. It is asked before a LIST
        that finds the lease folder empty: every taker that sees it empty counted attempts
        from the same files (a leased holder writes its attempt only after its record), so
        racing takers create one name.
        """
        paths = LeasePaths(run_dir)
        self._set_aside_non_folder(paths)
        if self.settle_s:
            return self._take_settled(paths, floor)
        if floor is None and run_dir not in self._seen:
            won = self._create(paths, 1)
            if won:
                return won
        listing = self._list(paths)
        if listing.top is None and floor is not None:
            highest = floor()
            listing = self._list(paths)
            if listing.top is None:
                return self._create(paths, highest + 1)
        top = listing.top
        if top is None:  # a folder with no record (a claimer's leftovers, lag): try again
            return self._create(paths, 1)
        if top in listing.released or self._holder_gone(paths, top) or self._stale(paths, top):
            return self._create(paths, top + 1)
        return None

    def _set_aside_non_folder(self, paths: LeasePaths) -> None:
        """A plain file (or pipe) where the lease folder belongs, on local disk, would make
        every take fail and the run be passed over for good: it holds no lease, so it is
        renamed aside (``lease.not-a-folder-<pid>``) with one warning. Links are left to the
        folder's own checks."""
        path = native_path(self.fs, paths.folder)
        if path is None:
            return  # an object store has no folders: a "lease" object does not block lease/...
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            return
        target = f"{path}.not-a-folder-{os.getpid()}-{secrets.token_hex(2)}"
        with store_errors("move", path):
            try:
                os.rename(path, target)
            except FileNotFoundError:
                return  # another worker moved it
        warn_once(f"{path} was a file, not the run's lease folder; moved it to {target}")

    def _holder_gone(self, paths: LeasePaths, generation: int) -> bool:
        """A holder on this machine whose process is provably gone (a killed launcher): its
        runs are free at once here, as the ledger frees them; elsewhere only time tells."""
        record = self._record(paths, generation)
        return record is not None and record.host == self.host and record.gone()

    def _record(self, paths: LeasePaths, generation: int) -> LeaseRecord | None:
        """A generation's record, read once (a record is never rewritten); ``None`` when it
        is missing or unreadable. A torn record (a machine lost between an exclusive create
        and its write, where creates are not all-or-nothing) is a holder of unknown
        identity: taken over by the usual rule once its beat stands still, never at once."""
        key = (paths.run_dir, generation)
        record = self._records.get(key)
        if record is None:
            blob = self._read(paths.record(generation))
            if blob is None:
                return None
            try:
                record = LeaseRecord.from_bytes(blob, paths.record(generation))
            except StoreError:
                return None
            self._records[key] = record
        return record

    def _stale(self, paths: LeasePaths, generation: int) -> bool:
        """Has ``generation``'s beat stood still for ``lease_s`` on this worker's clock?"""
        return self._watch(paths, generation).left_s <= 0

    def _watch(self, paths: LeasePaths, generation: int) -> Holding:
        """Look at ``generation``'s beat once more: how much longer it must stand still, by
        this object's clock, before the run is free, and whether it moved since the last look
        (a beat that moves, or a newer generation, is a live holder)."""
        beat = self._read(paths.beat(generation))
        now = self.clock()
        seen = self._seen.get(paths.run_dir)
        if seen is not None and seen.generation == generation and seen.beat == beat:
            # The holder's own lease if longer than ours; where the store shows writes late
            # (settle mode), a beat may be that late too.
            record = self._record(paths, generation)
            lease_s = record.lease_for(self.lease_s) if record else self.lease_s
            return Holding(None, left_s=lease_s + self.settle_s - (now - seen.since))
        self._seen[paths.run_dir] = _Seen(generation, beat, now)
        moved = seen is not None and 0 < seen.generation <= generation
        return Holding(None, moved=moved, left_s=self.lease_s + self.settle_s)

    def holder(self, run_dir: str, generation: int | None = None, released: bool = False) -> Holding:
        """Who holds the run, by this protocol's own rule as this object has watched it: the
        one rule for takers, ``status``, ``reset`` and ``gc``. Free (``holder`` ``None``) when
        never leased, released, held by a gone process of this host, or when its beat stood
        still for ``lease_s`` on this object's clock since a look that saw it; never by a
        store timestamp. ``generation``/``released`` from a listing the caller made (else
        one LIST here)."""
        paths = LeasePaths(run_dir)
        if generation is None:
            listing = self._list(paths)
            generation, released = listing.top, listing.top in listing.released
        if generation is None or released or self._holder_gone(paths, generation):
            return Holding(None)
        look = self._watch(paths, generation)
        if look.left_s <= 0:
            return look
        record = self._record(paths, generation)
        return replace(look, holder=record.worker if record is not None else "another machine")

    def due_s(self, run_dir: str) -> float | None:
        """How long until the watched beat of ``run_dir``, if it stands still, has stood still
        for a lease by this object's clock: when a taker's next look can take the run over
        (``None``: nothing watched, e.g. just after a race lost)."""
        seen = self._seen.get(run_dir)
        if seen is None or not seen.generation:
            return None
        record = self._records.get((run_dir, seen.generation))
        lease_s = record.lease_for(self.lease_s) if record else self.lease_s
        return max(0.0, lease_s + self.settle_s - (self.clock() - seen.since))

    def remembered(self) -> dict[str, list[Any]]:
        """What this object has watched, as JSON: :meth:`remember` gives it to a later process of
        this machine (the clock is the machine's boot clock), so that one-shot commands watch
        a beat across calls as a taker does across looks."""
        return {run: [s.generation, None if s.beat is None else s.beat.hex(), s.since]
                for run, s in self._seen.items() if s.generation}

    def remember(self, doc: Mapping[str, Any]) -> None:
        for run, entry in doc.items():
            try:
                gen, beat, since = entry
                self._seen.setdefault(run, _Seen(int(gen), None if beat is None else bytes.fromhex(beat),
                                                 float(since)))
            except (TypeError, ValueError):
                continue  # a damaged memory is only a watch started again

    def _create(self, paths: LeasePaths, generation: int, nonce: str | None = None) -> Lease | None:
        if generation > GENERATION_MAX:  # no lease name carries it: a file named by hand
            raise StoreError(f"{paths.folder}: the next lease generation, {generation}, has more than "
                             "12 digits; a file in the run's lease/, attempts/, logs/ or checkpoints/ "
                             "names an attempt sweeprun never reaches: move it away and run again")
        record = LeaseRecord(self.host, self.worker, generation, nonce or secrets.token_hex(8), self.started,
                             self.lease_s)
        if not create_only(self.fs, paths.record(generation), record.to_bytes()):
            # Someone else has it: remember that the folder exists, so the next look LISTs
            # (generation 0: nothing observed yet, the watch starts then).
            self._seen[paths.run_dir] = _Seen(0, None, self.clock())
            return None
        self._seen.pop(paths.run_dir, None)
        return Lease(paths.run_dir, record)

    def _take_settled(self, paths: LeasePaths, floor: Callable[[], int] | None = None) -> Lease | None:
        highest = floor() if floor is not None else 0  # before the LIST: see take()
        listing = self._list(paths)
        top = listing.top
        watched: object = _UNWATCHED  # the beat judged stale (maybe None: never written)
        if top is None:
            target = highest + 1
        elif top in listing.released or self._holder_gone(paths, top):
            target = top + 1
        elif self._stale(paths, top):
            target, watched = top + 1, self._seen[paths.run_dir].beat
        else:
            return None
        if self._live_claims(paths, listing, target):
            return None  # someone is claiming it now: back off, look again later
        return self._settle(paths, target, watched)


    def _live_claims(self, paths: LeasePaths, listing: _Listing, generation: int) -> list[str]:
        """The claims for ``generation`` that may still be settling: a claim whose claimer
        died mid-settle (a Colab VM gone in its first minute) would otherwise block the run
        for good. One still there after ``2 * settle_s + lease_s`` on this worker's clock,
        with the generation still untaken, is ignored; so is one by a process of this host
        that is gone."""
        now = self.clock()
        ttl = 2 * self.settle_s + self.lease_s
        live = []
        for nonce in listing.claims.get(generation, []):
            first = self._claims_seen.setdefault((paths.run_dir, generation, nonce), now)
            if now - first >= ttl or self._claimer_gone(paths, generation, nonce):
                continue
            live.append(nonce)
        return live

    def _claimer_gone(self, paths: LeasePaths, generation: int, nonce: str) -> bool:
        blob = self._read(paths.claim(generation, nonce))
        if not blob:
            return False
        try:
            claimer = LeaseRecord.from_bytes(blob, paths.claim(generation, nonce))
        except StoreError:
            return False
        return claimer.host == self.host and claimer.gone()

    def _settle(self, paths: LeasePaths, generation: int, watched: object = _UNWATCHED) -> Lease | None:
        """Claim, then confirm: exclusive creates cannot be trusted across machines here.

        Every claimer writes its own ``<gen>.<nonce>.claim`` and waits ``settle_s``, longer
        than the store takes to show a write to everyone (``D``). It loses when it sees the
        generation taken or a claim smaller than its own. Alone, it wins. Smallest among
        several, it waits ``settle_s`` again and wins only if it is still the smallest and
        the generation still untaken. Why the second round: of two claimers, the later one
        always sees the earlier one (``settle_s > D``) but not the other way round; if the
        later one has the smaller name and the earlier one, alone, already won, the
        earlier's record is visible to the later one by the end of its second wait. Losers
        delete their claim and back off.

        A takeover (``watched``: the beat that stood still) re-reads that beat before it
        creates the generation: a holder that was only slow to show its beat keeps the run.
        ``sleep`` returning ``False`` means the worker is stopping: the claim is withdrawn.
        """
        nonce = secrets.token_hex(8)
        mine = paths.claim(generation, nonce)
        # The claim says who made it, so this host can ignore it at once if that process dies.
        atomic_write(self.fs, mine, LeaseRecord(self.host, self.worker, generation, nonce,
                                                self.started, self.lease_s).to_bytes())
        won: Lease | None = None
        try:
            for round_ in (1, 2):
                if self.sleep(self.settle_s) is False:
                    break
                listing = self._list(paths)
                claims = self._live_claims(paths, listing, generation)
                if (listing.top or 0) >= generation or min(claims, default=nonce) < nonce:
                    break
                if round_ == 2 or claims == [nonce]:
                    if watched is not _UNWATCHED and self._read(paths.beat(generation - 1)) != watched:
                        break  # the holder is alive after all
                    won = self._create(paths, generation, nonce)
                    break
        finally:
            # The winner's claim stays (a later claimer that sees it but not yet the record
            # must still lose to it); a loser's goes, even when an error cut the wait short.
            if won is None:
                with store_errors("delete", mine):
                    try:
                        self.fs.rm_file(mine)
                    except FileNotFoundError:
                        pass
        if won is None:
            self._seen[paths.run_dir] = _Seen(0, None, self.clock())
        return won

    # -- holding ------------------------------------------------------------------------------

    def renew(self, lease: Lease) -> int:
        """Write the next beat, then check that nobody took over; the beat count written.

        The beat goes first: a taker that created the next generation had already waited
        ``lease_s`` without seeing a beat change, so a holder learns of the takeover at its
        next renewal at the latest. One write and one read of a name that should not exist.
        Raises :class:`LeaseLost` when the next generation exists: the caller must stop the
        run's child at once and write nothing more for it.
        """
        paths = lease.paths
        atomic_write(self.fs, paths.beat(lease.generation), f"{lease.beats + 1}\n".encode())
        lease.beats += 1
        if self._read(paths.record(lease.generation + 1)) is not None:
            raise LeaseLost(f"run {posixpath.basename(lease.run_dir.rstrip('/'))}: lease generation "
                            f"{lease.generation} was taken over by another worker (its beat stood "
                            "still for longer than lease_s); this worker stops the run and writes "
                            "nothing more for it")
        if self.settle_s:
            # A late folder may let another machine's create of this very name win after
            # all (one overwrites the other when both sync): the record must still be ours.
            blob = self._read(paths.record(lease.generation))
            try:
                ours = blob is None or LeaseRecord.from_bytes(blob, "").nonce == lease.record.nonce
            except StoreError:
                ours = False
            if not ours:
                raise LeaseLost(f"run {posixpath.basename(lease.run_dir.rstrip('/'))}: another machine's "
                                f"claim of lease generation {lease.generation} replaced this one's (the "
                                "folder showed it late); this worker stops the run")
        return lease.beats

    def release(self, lease: Lease) -> None:
        """Give the run up so the next taker need not wait ``lease_s`` (finished or stopping)."""
        atomic_write(self.fs, lease.paths.released(lease.generation), b"")

    def retire(self, lease: Lease) -> None:
        """The run is done (its ``DONE`` is written): remove the files of older generations
        and of settled claims, then mark it released (takers look for ``DONE`` first; ``gc``
        and ``reset`` then know its launcher is done writing there). The newest record
        stays, so that a run made to run again goes on counting attempts from it."""
        with store_errors("list", lease.paths.folder):
            try:
                names = self.fs.ls(confine(self.fs, lease.paths.folder), detail=False)
            except FileNotFoundError:
                return
        old = []
        for name in names:
            file = LeaseName.parse(posixpath.basename(str(name).rstrip("/")))
            if file and (file.generation < lease.generation
                         or (file.kind == "claim" and file.generation <= lease.generation)):
                old.append(str(name))
        if old:
            with store_errors("delete", lease.paths.folder):
                remove(self.fs, old)
        self.release(lease)  # the launcher writes nothing more there: gc need not wait it out

    # -- reading ------------------------------------------------------------------------------

    def current(self, run_dir: str) -> LeaseState | None:
        """The run's current generation and holder as any machine sees them; ``None`` if never leased."""
        paths = LeasePaths(run_dir)
        listing = self._list(paths)
        top = listing.top
        if top is None:
            return None
        blob = self._read(paths.record(top))
        holder = LeaseRecord.from_bytes(blob, paths.record(top)) if blob is not None else None
        return LeaseState(top, holder, top in listing.released, listing.contested())

    # -- store access -------------------------------------------------------------------------

    def _list(self, paths: LeasePaths) -> _Listing:
        with store_errors("list", paths.folder):
            try:
                names = self.fs.ls(confine(self.fs, paths.folder), detail=False)
            except FileNotFoundError:
                return _Listing()
        return _Listing.parse(names)

    def _read(self, path: str) -> bytes | None:
        """A small lease file's bytes, ``None`` if absent: one ranged GET on object stores; on
        local disk a bounded read, so a pipe in the lease folder cannot block a worker."""
        return backend_for(self.fs).read_if_present(path, _READ_MAX)
