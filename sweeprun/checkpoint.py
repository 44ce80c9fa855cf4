"""Checkpoint files on the store: state capture, atomic writes with a manifest, verified reads.

A run's ``checkpoints/`` folder holds pairs of files::

    ckpt-00000007-step0000000120.pt     torch.save of one snapshot
    ckpt-00000007-step0000000120.json   its manifest: seq, step, size, sha256, run id, sweep

The number after ``ckpt-`` is a save counter, not a clock: "newest" must not depend
on the clocks of the machines a run has moved between. The manifest is written
after its data file is complete and renamed into place, so a manifest always
describes a whole file; a data file without a manifest is an orphan of a crash and
is removed at the next save. Reads go newest first and fall back past files that
are truncated or corrupt; a file that verifies but needs code to unpickle is
refused outright, since only tampering produces one.

torch is imported inside the functions that need it: the launcher imports this
package and must stay light.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import random
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import fsspec

from .errors import CheckpointError
from .faults import crash_point
from .store import atomic_write, is_local, store_errors

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8})-step(\d{10,})\.(pt|json)$")
_NDARRAY = "__sweeprun_ndarray__"


class Stateful(Protocol):
    """Anything that can be checkpointed: models, optimizers, schedulers, GradScaler, samplers..."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


# -- making state safe for torch.load(weights_only=True) ---------------------------------


def to_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``torch.load(weights_only=True)`` can read back and that no
    later training step can change: tensors cloned to CPU, numpy arrays as tagged bytes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_safe(v) for v in obj)
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {_NDARRAY: obj.tobytes(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
        if isinstance(obj, np.generic):
            return obj.item()
    return obj


def from_safe(obj: Any) -> Any:
    """Inverse of :func:`to_safe`: tagged bytes become numpy arrays again."""
    if isinstance(obj, dict):
        if _NDARRAY in obj:
            import numpy as np

            return np.frombuffer(obj[_NDARRAY], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_safe(v) for v in obj)
    return obj


# -- adapters for things that are not state_dict-shaped -----------------------------------


@dataclass
class _GetSetState:
    """Wraps an object with ``getter()``/``setter(state)`` (torch.Generator, random.Random)."""

    get: Callable[[], Any]
    set: Callable[[Any], Any]

    def state_dict(self) -> Any:
        return self.get()

    def load_state_dict(self, state: Any) -> None:
        self.set(state)


def stateful(name: str, obj: Any) -> Stateful:
    """``obj`` itself if it has state_dict/load_state_dict, else an adapter for the RNG types
    users register (numpy Generator, torch.Generator, random.Random)."""
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        return obj
    if isinstance(obj, random.Random):
        return _GetSetState(obj.getstate, obj.setstate)
    module = type(obj).__module__
    if module.startswith("numpy") and hasattr(obj, "bit_generator"):  # numpy.random.Generator

        def set_bitgen(state: Any) -> None:
            obj.bit_generator.state = state

        return _GetSetState(lambda: obj.bit_generator.state, set_bitgen)
    if module.startswith("torch") and hasattr(obj, "get_state") and hasattr(obj, "set_state"):
        return _GetSetState(obj.get_state, obj.set_state)
    raise TypeError(f"cannot checkpoint {name!r} ({type(obj).__name__}): it has no "
                    "state_dict()/load_state_dict(); wrap it in an object that has, or keep "
                    "plain values in run.extras")


# -- global RNG state -----------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every global RNG a training step may draw from: Python, NumPy's legacy one, torch CPU
    and each CUDA device (only once CUDA is in use: asking earlier would start it)."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return to_safe(state)


def restore_rng(saved: Mapping[str, Any]) -> None:
    import torch

    state = from_safe(saved)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            print(f"sweeprun: warning: checkpoint has RNG states for {len(cuda)} CUDA device(s), "
                  f"this process sees {torch.cuda.device_count()}; restoring the first "
                  f"{min(len(cuda), torch.cuda.device_count())}", file=sys.stderr)
        for device, rng in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)


# -- manifests and the folder ---------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """Who a checkpoint belongs to; ``None`` for a standalone run (no sweep)."""

    run_id: str | None
    sweep: str | None

    def __str__(self) -> str:
        return f"run {self.run_id} of sweep {self.sweep}" if self.run_id else "a standalone run"


@dataclass(frozen=True)
class Manifest:
    """What a reader checks before trusting a data file."""

    seq: int
    step: int
    size: int
    sha256: str
    run_id: str | None
    sweep: str | None
    data: str                                   # the data file's name, next to the manifest
    metrics: dict[str, float] = field(default_factory=dict)
    created: float = 0.0
    format: int = FORMAT

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.data)[0]

    @property
    def owner(self) -> Owner:
        return Owner(self.run_id, self.sweep)

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        obj = json.loads(raw)
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})


@dataclass(frozen=True)
class Snapshot:
    """The first half of a save, taken on the training thread: state already copied to CPU,
    so training may go on while a writer serialises it."""

    step: int
    state: dict[str, Any]
    metrics: dict[str, float]


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

    def best_of(self, manifests: list[Manifest]) -> Manifest | None:
        scored = [m for m in manifests if self.best and _finite(m.metrics.get(self.best))]
        if not scored:
            return None
        sign = 1.0 if self.mode == "min" else -1.0
        return min(scored, key=lambda m: (sign * m.metrics[self.best or ""], m.seq))

    def keep(self, manifests: list[Manifest]) -> set[int]:
        seqs = {m.seq for m in sorted(manifests, key=lambda m: m.seq)[-self.keep_last:]}
        best = self.best_of(manifests)
        return seqs | ({best.seq} if best else set())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Loaded:
    manifest: Manifest
    state: dict[str, Any]


class CheckpointDir:
    """One run's ``checkpoints/`` folder on any fsspec filesystem (paths are posix, never os.path)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")

    def join(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def names(self) -> list[str]:
        with store_errors("list", self.path):
            try:
                return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)]
            except FileNotFoundError:
                return []

    def manifests(self, names: list[str] | None = None) -> list[Manifest]:
        """Every readable manifest, oldest first. A manifest that cannot be parsed is
        reported and skipped: only bit rot or a hand edit makes one."""
        out = []
        for name in names if names is not None else self.names():
            if not (_NAME.match(name) and name.endswith(".json")):
                continue
            try:
                with store_errors("read", self.join(name)):
                    out.append(Manifest.from_bytes(self.fs.cat_file(self.join(name))))
            except (ValueError, TypeError, KeyError) as exc:
                _warn(f"manifest {self.join(name)} is unreadable ({exc}); ignoring it")
        return sorted(out, key=lambda m: m.seq)

    def verify(self, manifest: Manifest) -> bytes:
        """The data file's bytes, or ValueError saying why they are not the ones the manifest describes."""
        path = self.join(manifest.data)
        try:
            with store_errors("read", path):
                data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise ValueError("its data file is missing") from None
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

    def load_latest(self, owner: Owner | None = None) -> Loaded | None:
        """The newest checkpoint that verifies, falling back past truncated or corrupt ones
        (with a warning naming both). ``None`` when there is none at all. With ``owner``,
        a checkpoint written by another run or sweep is refused."""
        manifests = self.manifests()
        failed: list[str] = []
        for manifest in reversed(manifests):
            if owner is not None and owner.run_id is not None and manifest.owner != owner:
                raise CheckpointError(
                    f"checkpoint {self.join(manifest.data)} belongs to {manifest.owner}, not to "
                    f"{owner}; it was copied from another run directory: remove it (or the "
                    "checkpoints folder) and run again")
            try:
                state = self.load(manifest)
            except ValueError as exc:
                failed.append(f"{manifest.data} ({exc})")
                continue
            if failed:
                _warn(f"newest checkpoint(s) failed verification: {'; '.join(failed)}; "
                      f"resuming from {manifest.data} (step {manifest.step}) instead")
            return Loaded(manifest, state)
        if failed:
            raise CheckpointError(f"no checkpoint in {self.path} verifies: {'; '.join(failed)}; "
                                  "delete the folder to start the run over")
        return None


def _warn(message: str) -> None:
    print(f"sweeprun: warning: {message}", file=sys.stderr, flush=True)


def serialise(state: Mapping[str, Any]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


class CheckpointWriter:
    """The second half of a save: serialise a snapshot, write data then manifest, prune.

    Synchronous. A background writer can take the same :class:`Snapshot` on a thread
    and run :meth:`write` there; ``close()`` is where it would wait for the queue.
    """

    def __init__(self, directory: CheckpointDir, owner: Owner, retention: Retention) -> None:
        self.dir = directory
        self.owner = owner
        self.retention = retention

    def write(self, snapshot: Snapshot) -> Manifest:
        data = serialise(snapshot.state)
        names = self.dir.names()
        seq = max((int(m.group(1)) for m in map(_NAME.match, names) if m), default=0) + 1
        stem = f"ckpt-{seq:08d}-step{snapshot.step:010d}"
        manifest = Manifest(seq=seq, step=snapshot.step, size=len(data),
                            sha256=hashlib.sha256(data).hexdigest(), run_id=self.owner.run_id,
                            sweep=self.owner.sweep, data=stem + ".pt",
                            metrics={k: v for k, v in snapshot.metrics.items() if _finite(v)},
                            created=time.time())
        atomic_write(self.dir.fs, self.dir.join(manifest.data), data, crash_prefix="checkpoint")
        crash_point("checkpoint.before_manifest")
        atomic_write(self.dir.fs, self.dir.join(stem + ".json"), manifest.to_bytes())
        self.prune(names + [stem + ".pt", stem + ".json"])
        return manifest

    def prune(self, names: list[str]) -> None:
        """Apply retention and remove orphans: data files with no manifest, temp files of a
        crashed write. Manifest first, so no manifest ever names a deleted file."""
        manifests = self.dir.manifests(names)
        keep = self.retention.keep(manifests)
        doomed: list[str] = []
        for m in manifests:
            if m.seq not in keep:
                doomed += [m.stem + ".json", m.data]
        described = {m.data for m in manifests}
        doomed += [n for n in names if n.endswith(".pt") and _NAME.match(n) and n not in described]
        if is_local(self.dir.fs):
            doomed += [n for n in names if n.startswith(".tmp-")]
        for name in doomed:
            try:
                with store_errors("delete", self.dir.join(name)):
                    self.dir.fs.rm_file(self.dir.join(name))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Nothing queued in the synchronous writer."""
