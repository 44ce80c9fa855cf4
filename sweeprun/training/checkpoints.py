"""A run's ``checkpoints/`` folder: names, manifests, retention, verified and confined reads.

The folder holds pairs of files::

    ckpt-a2-00000007-step0000000120.pt     torch.save of one snapshot
    ckpt-a2-00000007-step0000000120.json   its manifest: attempt, seq, step, size, sha256, run id

``a2`` is the attempt that wrote it (the fencing token: ``SWEEPRUN_ATTEMPT`` under the
launcher), ``00000007`` a save counter: neither is a clock, so "newest" never depends on
the clocks of the machines a run has moved between. Newest is the largest ``(attempt,
seq)``, compared as integers: the zero padding is for people listing the folder, the
parser never relies on it. Two attempts never derive the same name.

The manifest is written after its data file is complete and renamed into place, so a
manifest always describes a whole file. Reads go newest first and fall back past files
that are missing, unreadable, truncated or corrupt; a file that verifies but needs code
to unpickle is refused outright, since only tampering produces one.

Everything in the folder is untrusted input: a manifest can only name the data file
next to it (the same stem), names must match the strict pattern, and on local disk
only regular files are read or deleted, never through a symlink, so a crafted
manifest or a symlinked folder cannot make a save read or delete anything elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import re
import stat
import sys
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import fsspec

from ..errors import CheckpointError, StoreError
from ..store import UPLOAD_PART_BYTES as _PART_BYTES
from ..store import backend_for, store_errors
from ..store.layout import TEMP_PREFIX, CheckpointName
from .digest import hash_of, new_hash

FORMAT = 2
_warned: set[str] = set()


def say(message: str) -> None:
    """``sweeprun: message`` on stderr, one line in one write. A run's ranks share its log,
    and ``print`` writes its text and its newline apart, two writes when Python runs
    unbuffered (``PYTHONUNBUFFERED``, common in containers and CI): another rank's line
    then lands between them, and two lines read as one."""
    sys.stderr.write(f"sweeprun: {message}\n")
    sys.stderr.flush()


def warn(message: str) -> None:
    say(f"warning: {message}")


def warn_once(message: str) -> None:
    """Warn about a file in the folder once per process: it is seen again at every save."""
    if message not in _warned:
        _warned.add(message)
        warn(message)


#: A checkpoint's name (``ckpt-a<attempt>-<seq>-step<step>.<pt|json>``), parsed by the one
#: layout of every name a sweep writes.
Name = CheckpointName


@dataclass(frozen=True)
class Owner:
    """Who a checkpoint belongs to; ``None`` for a standalone run (no sweep)."""

    run_id: str | None
    sweep: str | None

    def __str__(self) -> str:
        return f"run {self.run_id} of sweep {self.sweep}" if self.run_id else "a standalone run"


def _int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def recorded_retention(manifests: list[Manifest]) -> Retention | None:
    """The retention the script gave ``sweeprun.init`` as its newest manifest that records one
    has it (``best`` ``None``: it keeps no best); ``None`` when none does (written before the
    record existed). ``gc`` and ``load_checkpoint(run, "best")`` both go by this one rule,
    so what gc keeps is what a later load takes for the best."""
    return next((r for m in sorted(manifests, key=lambda m: m.name, reverse=True)
                 if (r := Retention.from_record(m.retention)) is not None), None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as its manifest describes it, and whether its data file still matches."""

    data: str
    attempt: int
    step: int
    size: int
    created: float
    verified: bool
    problem: str | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class Manifest:
    """What a reader checks before trusting a data file."""

    attempt: int
    seq: int
    step: int
    size: int
    sha256: str
    run_id: str | None
    sweep: str | None
    data: str                                   # the data file's name: always <this stem>.pt
    metrics: dict[str, float] = field(default_factory=dict)
    created: float = 0.0
    format: int = FORMAT
    #: The saving script's choice of best checkpoint (:meth:`Retention.record`), so that
    #: ``sweeprun gc`` keeps what ``best`` loads and no more; ``None`` in manifests written
    #: before it was recorded (they load as before).
    retention: dict[str, Any] | None = None
    #: A multi-rank run's checkpoint (:mod:`.sharded`): how many ranks wrote it, and each file
    #: of its folder (``data``, ``<stem>.dcp``) with its size and hash (:func:`~.digest.hash_of`); ``None`` for one file.
    world_size: int | None = None
    files: dict[str, dict[str, Any]] | None = None

    @property
    def sharded(self) -> bool:
        return self.world_size is not None

    @property
    def name(self) -> Name:
        return Name(self.attempt, self.seq, self.step)

    @property
    def stem(self) -> str:
        return self.name.stem

    @property
    def owner(self) -> Owner:
        return Owner(self.run_id, self.sweep)

    def to_bytes(self) -> bytes:
        record = asdict(self)
        if not self.sharded:                 # a one-file manifest reads as it always has
            del record["world_size"], record["files"]
        return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, filename: str) -> Manifest:
        """Parse and check a manifest read from ``filename``; ValueError says what is wrong.

        The name is the authority: a manifest must describe the checkpoint its own file
        name says, and can only point at the data file with the same stem.
        """
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("it is not a JSON object")
        name = Name.parse(filename)
        if name is None or filename != name.manifest:
            raise ValueError("its file name is not a checkpoint manifest's")
        problems = [key for key, ok in (
            ("attempt", _int(obj.get("attempt"), 1)), ("seq", _int(obj.get("seq"), 0)),
            ("step", _int(obj.get("step"), 0)), ("size", _int(obj.get("size"), 0)),
            ("sha256", isinstance(obj.get("sha256"), str)
             and re.fullmatch(r"[0-9a-f]{64}", obj["sha256"]) is not None),
            ("run_id", obj.get("run_id") is None or isinstance(obj.get("run_id"), str)),
            ("sweep", obj.get("sweep") is None or isinstance(obj.get("sweep"), str)),
            ("data", isinstance(obj.get("data"), str)),
            ("metrics", isinstance(obj.get("metrics", {}), dict)
             and all(isinstance(k, str) and _finite(v) for k, v in obj.get("metrics", {}).items())),
            ("created", _finite(obj.get("created", 0.0))),
            ("retention", obj.get("retention") is None or Retention.from_record(obj["retention"]) is not None),
            ("format", obj.get("format") == FORMAT),
            ("world_size", obj.get("world_size") is None or _int(obj.get("world_size"), 1)),
            ("files", _shard_files(obj.get("files"), obj.get("world_size")))) if not ok]
        if problems:
            shown = ", ".join(f"{key}={obj.get(key)!r}"[:60] for key in problems)
            raise ValueError(f"bad field(s): {shown}")
        if (obj["attempt"], obj["seq"], obj["step"]) != (name.attempt, name.seq, name.step):
            raise ValueError("its attempt/seq/step do not match its file name")
        own = name.shards if obj.get("world_size") is not None else name.data
        if obj["data"] != own:
            raise ValueError(f"it names the data file {obj['data']!r}, not {own!r} next to it; "
                             "it is never read or deleted")
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})


def _shard_files(files: Any, world_size: Any) -> bool:
    """A sharded manifest's file list: only names sweeprun and DCP write in the folder (never a
    path elsewhere), each with a size and one hash (:func:`~.digest.hash_of`); absent for a
    one-file checkpoint."""
    if world_size is None:
        return files is None
    from ..store.layout import DCP_METADATA, parse_rank_state, shard_file_rank

    return isinstance(files, dict) and DCP_METADATA in files and all(
        isinstance(n, str) and (n == DCP_METADATA or shard_file_rank(n) is not None
                                or parse_rank_state(n) is not None)
        and isinstance(r, dict) and _int(r.get("size"), 0) and hash_of(r) is not None
        for n, r in files.items())


@dataclass(frozen=True)
class Retention:
    """Keep the last ``keep_last`` checkpoints and, with ``best``, the one whose value of
    that metric is lowest (``mode="min"``) or highest (``"max"``)."""

    keep_last: int = 3
    best: str | None = None
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {self.keep_last}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def record(self) -> dict[str, Any]:
        """What a manifest keeps of this retention: the best metric (or ``None``) and its mode."""
        return {"best": self.best, "mode": self.mode}

    @classmethod
    def from_record(cls, record: Any) -> Retention | None:
        """The retention a manifest recorded; ``None`` if ``record`` is not one :meth:`record` writes."""
        if not isinstance(record, dict) or record.get("mode") not in ("min", "max"):
            return None
        best = record.get("best")
        if best is not None and not (isinstance(best, str) and best):
            return None
        return cls(best=best, mode=record["mode"])

    def best_of(self, manifests: list[Manifest]) -> Manifest | None:
        scored = [m for m in manifests if self.best and _finite(m.metrics.get(self.best))]
        if not scored:
            return None
        sign = 1.0 if self.mode == "min" else -1.0
        return min(scored, key=lambda m: (sign * m.metrics[self.best or ""], m.name))

    def keep(self, manifests: list[Manifest]) -> set[Name]:
        names = {m.name for m in sorted(manifests, key=lambda m: m.name)[-self.keep_last:]}
        best = self.best_of(manifests)
        return names | ({best.name} if best else set())


@dataclass(frozen=True)
class Loaded:
    manifest: Manifest
    state: dict[str, Any]


class CheckpointDir:
    """One run's ``checkpoints/`` folder on any fsspec filesystem (paths are posix, never os.path)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.store = backend_for(fs)

    def join(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def check(self) -> None:
        """Refuse a folder that is a symlink: pruning through it would delete files elsewhere."""
        native = self.store.native_path(self.path)
        if native is None:
            return  # an object store has no links
        try:
            mode = os.lstat(native).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {os.strerror(exc.errno or 0)}") from None
        if stat.S_ISLNK(mode):
            raise CheckpointError(f"checkpoints folder {self.path} is a symlink to "
                                  f"{os.path.realpath(self.path)}; sweeprun only reads and deletes "
                                  "files inside the run's own folder: replace it with a real folder")
        if not stat.S_ISDIR(mode):
            raise CheckpointError(f"checkpoints folder {self.path} is not a folder; move it away "
                                  "and run again")

    def listing(self) -> dict[str, bool]:
        """``name -> is a regular file`` for everything in the folder (a symlink is not)."""
        self.check()
        return self.store.entries(self.path)

    def names(self) -> list[Name]:
        """The parsed checkpoint names present (data or manifest), warning once about anything else."""
        out = set()
        for name, regular in self.listing().items():
            parsed = Name.parse(name)
            if parsed is not None and (regular or name == parsed.shards):
                out.add(parsed)
            elif not name.startswith(TEMP_PREFIX) or not regular:
                warn_once(f"{self.join(name)} is not a checkpoint file sweeprun writes; ignoring it")
        return sorted(out)

    def read(self, name: str) -> bytes:
        """The bytes of a regular file in this folder, never through a symlink (OSError if not)."""
        native = self.store.native_path(self.join(name))
        if native is None:
            return self.fs.cat_file(self.join(name))
        fd = os.open(native, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise IsADirectoryError(f"{self.join(name)} is not a regular file")
            return f.read()

    def delete(self, name: str, *, set_aside: str | None = None) -> None:
        """Remove a regular file of this folder; anything else is left alone. ``set_aside``:
        see :meth:`~sweeprun.store.base.StoreBackend.delete_file`."""
        if posixpath.basename(name) != name or name in ("", ".", ".."):
            return
        parsed = Name.parse(name)
        if parsed is not None and name == parsed.shards:
            self._delete_shards(name)
            return
        self.store.delete_file(self.join(name), set_aside=set_aside)

    def _delete_shards(self, name: str) -> None:
        """Remove a sharded checkpoint's folder (after its manifest): a real folder only,
        never through a link."""
        path = self.join(name)
        native = self.store.native_path(path)
        with store_errors("delete", path):
            if native is not None:
                try:
                    if not stat.S_ISDIR(os.lstat(native).st_mode):
                        return
                except FileNotFoundError:
                    return
            try:
                self.store.delete([path], recursive=True)
            except FileNotFoundError:
                return

    def manifests(self, listing: dict[str, bool] | None = None) -> list[Manifest]:
        """Every manifest that parses and checks out, oldest first. Anything else is reported
        once per process and skipped: only bit rot, a hand edit or an attacker makes one."""
        listing = self.listing() if listing is None else listing
        out = []
        for name, regular in listing.items():
            parsed = Name.parse(name)
            if parsed is None or name != parsed.manifest:
                continue
            if not regular:
                warn_once(f"manifest {self.join(name)} is not a regular file; ignoring it")
                continue
            try:
                with store_errors("read", self.join(name)):
                    out.append(Manifest.from_bytes(self.read(name), name))
            except (ValueError, TypeError, KeyError, UnicodeDecodeError, StoreError, OSError) as exc:
                warn_once(f"manifest {self.join(name)} is unusable ({exc}); ignoring it")
        return sorted(out, key=lambda m: m.name)

    def digest(self, path: str, algorithm: str = "sha256") -> tuple[int, str] | None:
        """Size and hash of a file of the store, read in parts (a shard may be large);
        ``None`` if it is not there."""
        digest, size = new_hash(algorithm), 0
        with store_errors("read", path):
            try:
                f = self.fs.open(path, "rb", block_size=_PART_BYTES)
            except FileNotFoundError:
                return None
            with f:
                while chunk := f.read(_PART_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
        return size, digest.hexdigest()

    def _verify_shards(self, manifest: Manifest) -> None:
        """ValueError unless every file a sharded manifest lists is there with its size and hash."""
        folder = self.join(manifest.data)
        for name, record in sorted((manifest.files or {}).items()):
            algorithm, expected = hash_of(record) or ("", "")
            try:
                digest = self.digest(posixpath.join(folder, name), algorithm)
            except (StoreError, OSError) as exc:
                raise ValueError(f"{name} is unreadable: {exc}") from None
            if digest is None:
                raise ValueError(f"{name} is missing")
            size, found = digest
            if size != record["size"]:
                raise ValueError(f"{name} is truncated: {size} bytes, manifest says {record['size']}")
            if found != expected:
                raise ValueError(f"{name} is corrupt: {algorithm} {found[:12]}..., manifest says "
                                 f"{expected[:12]}...")

    def verify(self, manifest: Manifest) -> bytes:
        """The data file's bytes, or ValueError saying why they are not the ones the manifest
        describes. A sharded checkpoint's files are each checked and nothing is returned
        (b""): its state is read through DCP (:mod:`.sharded`)."""
        if manifest.sharded:
            self._verify_shards(manifest)
            return b""
        try:
            with store_errors("read", self.join(manifest.data)):
                data = self.read(manifest.data)
        except FileNotFoundError:
            raise ValueError("its data file is missing") from None
        except (StoreError, OSError) as exc:
            raise ValueError(f"its data file is unreadable: {exc}") from None
        if len(data) != manifest.size:
            raise ValueError(f"truncated: {len(data)} bytes, manifest says {manifest.size}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.sha256:
            raise ValueError(f"corrupt: sha256 {digest[:12]}..., manifest says {manifest.sha256[:12]}...")
        return data

    def load(self, manifest: Manifest) -> dict[str, Any]:
        data = self.verify(manifest)
        import pickle

        import torch

        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"checkpoint {self.join(manifest.data)} is refused: it does not load with "
                f"torch.load(weights_only=True) ({reason}); sweeprun never writes such files, so it "
                "was replaced by hand or tampered with; delete it and run again") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {self.join(manifest.data)} is not a sweeprun "
                                  f"checkpoint of format {FORMAT}; delete it and run again")
        return state

    def load_latest(self, owner: Owner | None = None,
                    load: Callable[[Manifest], dict[str, Any]] | None = None,
                    skip: Collection[str] = ()) -> Loaded | None:
        """The newest checkpoint that verifies, falling back past missing, unreadable,
        truncated or corrupt ones (with a warning naming both). ``None`` when there is
        none at all. With ``owner``, a checkpoint written by another run or sweep is refused.
        ``load`` reads one (ValueError: it does not verify); a multi-rank run reads sharded ones.
        ``skip``: stems never to restore (written after a loss spike began, :mod:`.rollback`)."""
        manifests = [m for m in self.manifests() if m.stem not in skip]
        failed: list[str] = []
        for manifest in reversed(manifests):
            if owner is not None and owner.run_id is not None and manifest.owner != owner:
                raise CheckpointError(
                    f"checkpoint {self.join(manifest.data)} belongs to {manifest.owner}, not to "
                    f"{owner}; it was copied from another run directory: remove it (or the "
                    "checkpoints folder) and run again")
            try:
                state = (load or self.load)(manifest)
            except ValueError as exc:
                failed.append(f"{manifest.data} ({exc})")
                continue
            if failed:
                warn(f"newest checkpoint(s) failed verification: {'; '.join(failed)}; "
                     f"resuming from {manifest.data} (step {manifest.step}) instead")
            return Loaded(manifest, state)
        if failed:
            raise CheckpointError(f"no checkpoint in {self.path} verifies: {'; '.join(failed)}; "
                                  "delete the folder to start the run over")
        return None
