"""Capturing and restoring state: the weights_only-safe encoding, adapters, global RNGs.

``torch.load(weights_only=True)`` reads tensors, numbers, strings, lists, tuples,
dicts, OrderedDicts and sets, nothing else; that is what makes a checkpoint safe to
load. Everything a training script tracks is encoded into those types here and
decoded on restore, and the decoding must give back the same *types*: a scheduler
whose ``Counter`` of milestones came back as a plain dict crashes the first time it
asks for ``.elements()``.

torch is imported inside the functions that need it: the launcher imports the
package and must stay light.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

_NDARRAY = "__sweeprun_ndarray__"
_MAPPING = "__sweeprun_mapping__"

#: The ``default_factory`` values of a defaultdict that can be named in a checkpoint.
_FACTORIES: dict[str, Callable[[], Any]] = {
    "int": int, "float": float, "str": str, "list": list, "dict": dict, "set": set, "tuple": tuple}


class Stateful(Protocol):
    """Anything that can be checkpointed: models, optimizers, schedulers, GradScaler, samplers..."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


_LEAVES = (int, float, bool, str, bytes, bytearray, complex, type(None))


class HostBuffers:
    """The host tensors of the last snapshot, reused by the next one.

    Copying into memory already touched costs a memcpy; a fresh allocation also costs a
    page fault per 4 KiB (as much again, here), and for CUDA a pinned allocation. The
    caller must not start a snapshot before the write of the previous one has ended:
    the buffers are overwritten in place. Memory stays at one snapshot.
    """

    def __init__(self) -> None:
        self._last: dict[str, Any] = {}
        self._next: dict[str, Any] = {}

    def copy(self, where: str, tensor: Any) -> Any:
        import torch

        buffer = self._last.get(where)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            # pinned for a CUDA source: the copy runs at full bus speed without blocking
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                 pin_memory=tensor.device.type == "cuda")
        self._next[where] = buffer
        return buffer.copy_(tensor, non_blocking=tensor.device.type == "cuda")

    def cycle(self) -> None:
        """The snapshot is complete: what it did not use is freed, what it used is kept."""
        self._last, self._next = self._next, {}


def to_safe(obj: Any, where: str = "state", copy: bool | HostBuffers = True) -> Any:
    """A copy of ``obj`` that ``torch.load(weights_only=True)`` can read back and that no
    later training step can change: tensors cloned to CPU, numpy arrays as tagged bytes,
    Counter and defaultdict as tagged mappings (OrderedDict is safe as it is).

    ``copy=False`` leaves CPU tensors as they are (detached, shared): for a save written
    before training goes on, where a clone would only cost time and memory. Given
    :class:`HostBuffers`, tensors are copied into those (CUDA ones without blocking: the
    caller must :func:`sync_copies` before anyone reads them).

    Anything else is refused here, at the save, with ``where`` in the message (TypeError):
    torch.save would pickle it happily, and the run would learn only at its next restore
    that the checkpoint cannot be loaded safely.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        obj = obj.detach()
        if isinstance(copy, HostBuffers) and obj.device.type in ("cpu", "cuda"):
            return copy.copy(where, obj)
        if obj.device.type == "cpu":
            return obj.clone() if copy else obj
        return obj.to("cpu")
    if isinstance(obj, (torch.Size, torch.dtype, torch.device, torch.layout, *_LEAVES)):
        return obj
    if isinstance(obj, Counter):
        return {_MAPPING: "Counter", "items": {k: to_safe(v, f"{where}[{k!r}]", copy) for k, v in obj.items()}}
    if isinstance(obj, defaultdict):
        factory = obj.default_factory
        name = next((n for n, f in _FACTORIES.items() if f is factory), None)
        if factory is not None and name is None:
            raise TypeError(f"cannot checkpoint a defaultdict({getattr(factory, '__name__', factory)}): "
                            f"only the factories {', '.join(_FACTORIES)} can be restored; "
                            "convert it to a dict first")
        return {_MAPPING: "defaultdict", "factory": name,
                "items": {k: to_safe(v, f"{where}[{k!r}]", copy) for k, v in obj.items()}}
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, to_safe(v, f"{where}[{k!r}]", copy)) for k, v in obj.items())
    if isinstance(obj, Mapping):
        return {k: to_safe(v, f"{where}[{k!r}]", copy) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_safe(v, f"{where}[{i}]", copy) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(to_safe(v, f"{where}[{i}]", copy) for i, v in enumerate(obj))
    if type(obj) is set:
        return {to_safe(v, f"{where} item", copy) for v in obj}
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {_NDARRAY: obj.tobytes(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
        if isinstance(obj, np.generic):
            return obj.item()
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                    "torch.load(weights_only=True) cannot read back; store plain values "
                    "(numbers, strings, tensors, arrays, lists, dicts), or give it a "
                    "state_dict() and track it")


def sync_copies() -> None:
    """Wait for the non-blocking device-to-host copies of :func:`to_safe` (a no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)


def from_safe(obj: Any) -> Any:
    """Inverse of :func:`to_safe`: tagged bytes become numpy arrays, tagged mappings their type."""
    if isinstance(obj, dict):
        if _NDARRAY in obj:
            import numpy as np

            return np.frombuffer(obj[_NDARRAY], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        if obj.get(_MAPPING) == "Counter":
            return Counter({k: from_safe(v) for k, v in obj["items"].items()})
        if obj.get(_MAPPING) == "defaultdict":
            factory = _FACTORIES.get(obj["factory"]) if obj["factory"] is not None else None
            return defaultdict(factory, {k: from_safe(v) for k, v in obj["items"].items()})
        items = ((k, from_safe(v)) for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_safe(v) for v in obj)
    return obj


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
            from .checkpoints import warn

            warn(f"checkpoint has RNG states for {len(cuda)} CUDA device(s), this process sees "
                 f"{torch.cuda.device_count()}; restoring the first {min(len(cuda), torch.cuda.device_count())}")
        for device, rng in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)
