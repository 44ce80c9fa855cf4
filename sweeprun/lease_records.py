"""What a run's lease in the store is made of: the names of its files (:class:`LeasePaths`),
the record each holder creates (:class:`LeaseRecord`), one LIST of the folder parsed
(:class:`_Listing`), and what a taker or a watcher remembers of a beat. Pure data; the
protocol that takes, renews and judges leases is :mod:`sweeprun.leases`, which re-exports
these names.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import StoreError
from .numbers import bounded_int, finite, worker_pid
from .procs import HOST, ProcessRef
from .store import layout
from .store.layout import GENERATION_MAX as GENERATION_MAX
from .store.layout import LeaseName
from .training.checkpoints import warn_once

#: A holder's record may ask takers to wait longer than their own ``lease_s`` (machines
#: launched with different ``--lease-s``), up to this many times it: a record is a file
#: anyone can write, and ``lease_s: 1e9`` in one must not block a run for good.
HOLDER_LEASE_FACTOR = 10.0


@dataclass(frozen=True)
class LeasePaths:
    """Every path of one run's lease folder; no other code joins these names."""

    run_dir: str

    @property
    def folder(self) -> str:
        return posixpath.join(self.run_dir, layout.LEASE)

    def record(self, generation: int) -> str:
        return posixpath.join(self.folder, layout.lease_name(generation, "json"))

    def beat(self, generation: int) -> str:
        return posixpath.join(self.folder, layout.lease_name(generation, "beat"))

    def released(self, generation: int) -> str:
        return posixpath.join(self.folder, layout.lease_name(generation, "released"))

    def claim(self, generation: int, nonce: str) -> str:
        return posixpath.join(self.folder, layout.lease_name(generation, "claim", nonce))


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _number(value: object, parsed: float | None) -> Any:
    """``parsed`` (a bounded reading of ``value``), or ValueError naming what was wrong."""
    if parsed is None:
        raise ValueError(f"{str(value)[:40]!r} is not a number sweeprun writes there")
    return parsed


@dataclass(frozen=True)
class LeaseRecord:
    """The content of ``<generation>.json``: who took this generation."""

    host: str
    worker: str
    generation: int
    nonce: str
    #: The holder's process start time (clock ticks since boot, as the ledger records it):
    #: with the pid, it tells a dead holder from a new process that reuses its pid.
    started: int | None = None
    #: How long the holder's lease lasts without a beat, as the holder counts it: a taker
    #: waits at least this long, whatever its own setting.
    lease_s: float | None = None

    def gone(self) -> bool:
        """Is the holder a process of this host that is provably gone (see
        :meth:`ProcessRef.alive`)? A holder elsewhere is never known to be gone."""
        host, pid = worker_pid(self.worker)
        if self.host != HOST or host != HOST or pid is None:
            return False
        return not ProcessRef(host, pid, self.started).alive()

    def lease_for(self, lease_s: float) -> float:
        """How long a taker whose own lease is ``lease_s`` waits for this holder: the
        holder's lease where it is longer, at most :data:`HOLDER_LEASE_FACTOR` times ours."""
        return max(lease_s, min(self.lease_s or 0.0, HOLDER_LEASE_FACTOR * lease_s))

    def to_bytes(self) -> bytes:
        return (json.dumps({"host": self.host, "worker": self.worker, "generation": self.generation,
                            "nonce": self.nonce, "started": self.started, "lease_s": self.lease_s},
                           sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, blob: bytes, path: str) -> LeaseRecord:
        try:
            doc = json.loads(blob)
            started, lease_s = doc.get("started"), doc.get("lease_s")
            fields = cls(host=_text(doc["host"]), worker=_text(doc["worker"]),
                         generation=_number(doc["generation"], bounded_int(doc["generation"], 1, GENERATION_MAX)),
                         nonce=_text(doc["nonce"]),
                         started=None if started is None else _number(started, bounded_int(started)),
                         lease_s=None if lease_s is None else _number(lease_s, finite(lease_s)))
            if fields.lease_s is not None and fields.lease_s <= 0:
                raise ValueError("lease_s")
            return fields
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise StoreError(f"lease file {path} is not a sweeprun lease ({type(exc).__name__}); "
                             "move the run's lease/ folder away and run the same command again") from exc


@dataclass
class Lease:
    """A lease this process holds: the run, its generation (the attempt), beats written so far."""

    run_dir: str
    record: LeaseRecord
    beats: int = 0

    @property
    def generation(self) -> int:
        return self.record.generation

    @property
    def paths(self) -> LeasePaths:
        return LeasePaths(self.run_dir)


@dataclass(frozen=True)
class LeaseState:
    """What any machine can read about a run's lease (for ``status``)."""

    generation: int
    holder: LeaseRecord | None
    released: bool
    #: Two machines look like they want one generation (see :meth:`_Listing.contested`).
    contested: bool = False


@dataclass
class _Listing:
    """One LIST of a lease folder, parsed."""

    generations: set[int] = field(default_factory=set)
    released: set[int] = field(default_factory=set)
    claims: dict[int, list[str]] = field(default_factory=dict)  # generation -> claim nonces
    beats: set[int] = field(default_factory=set)
    #: A record name listed twice: folders that allow duplicate names (Google Drive) keep
    #: both of two creates that did not see each other.
    duplicated: bool = False

    @property
    def top(self) -> int | None:
        return max(self.generations) if self.generations else None

    def contested(self, settled: Callable[[int, str], bool] = lambda gen, nonce: True) -> bool:
        """Do two machines look like they hold, or are stuck wanting, one generation? A
        record name listed twice (Drive keeps both of two creates that did not see each
        other), or two claims for a generation not yet taken that ``settled(gen, nonce)``
        says are past their settle rounds: claims of two machines stand side by side during
        a normal contention, which one rule settles within two rounds; longer means a
        claimer died mid-settle or the store showed a write late. Claims below a taken
        generation are a winner's and maybe a loser's leftovers, not a contention."""
        top = self.top or 0
        return self.duplicated or any(
            sum(1 for nonce in nonces if settled(gen, nonce)) > 1
            for gen, nonces in self.claims.items() if gen > top)

    @classmethod
    def parse(cls, names: Iterable[str]) -> _Listing:
        """Lease files by their base names; anything else (temp files of atomic writes,
        what a user left there) is not ours and is passed over."""
        out = cls()
        for name in names:
            base = posixpath.basename(str(name).rstrip("/"))
            parsed = LeaseName.parse(base)
            if parsed is None:
                if layout.lease_generation_too_long(base):
                    warn_once(f"lease file {name} has a generation of more than 12 digits, which "
                              "sweeprun never writes; passing it over")
                continue
            gen = parsed.generation
            if parsed.kind == "claim":
                out.claims.setdefault(gen, []).append(parsed.nonce or "")
            elif parsed.kind == "json":
                out.duplicated |= gen in out.generations
                out.generations.add(gen)
            elif parsed.kind == "released":
                out.released.add(gen)
            else:
                out.beats.add(gen)
        return out


@dataclass(frozen=True)
class Holding:
    """The lease protocol's answer to "who holds this run" (see :meth:`StoreLeases.holder`)."""

    holder: str | None          # None: free to take
    moved: bool = False         # the beat or generation changed since the last look: alive
    left_s: float = 0.0         # how much longer the beat must stand still before it is free


@dataclass(frozen=True)
class _Seen:
    """What a taker last saw of a held lease, and since when by its own clock."""

    generation: int
    beat: bytes | None
    since: float
