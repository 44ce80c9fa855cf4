"""The hash of a checkpoint file as it is written, computed on a thread of its own.

Hashed on the writing thread, a save costs the write plus the hash (SHA-256 runs at
0.5 to 1.5 GB/s on CPUs of this decade, about as fast as a disk takes the bytes).
hashlib and xxhash release the GIL on large buffers, so a helper thread can hash one chunk
while the writer writes the next and then fsyncs: a save costs about the larger of the two.

Which hash: a manifest's hash is a checksum, there so that a torn, truncated or bit-rotted
file is never restored; nobody forges a checkpoint past a manifest the same attacker could
rewrite. One-file checkpoints keep SHA-256 (their manifests and the Trainer's seals name
it). The files of a sharded checkpoint are hashed with XXH3-128 (:data:`SHARD_HASH`, the
``xxhash`` library): every rank hashes its shards on the same cores that write them, and
SHA-256 cost a sharded save half again the time of ``dcp.save`` on a 2-core machine, where
XXH3 runs at four times its speed (6.5 against 1.6 GB/s, one core). A record names its hash by its key
(:func:`hash_of`), so manifests written with either verify.

No copy of the state is made for this. The chunks ``torch.save`` hands its file are
read-only memoryviews whose memory it does not promise to keep once ``write`` returns:

- tensor data: the storage of a CPU tensor of the state being saved, which lives as
  long as that state, so until the save returns. These chunks, nearly all the bytes,
  are queued as the views themselves. They are recognised by address and length
  against the storages of the state (:func:`tensor_memory`), never by size alone: a
  view of memory that is freed while still queued would be read after the free.
- everything else: zip headers and small records (tens of bytes per tensor) are
  copied into a batch; a large pickle (big numpy arrays in ``run.extras``) is hashed
  on the spot once the helper has caught up, so the order of the bytes holds.

The queue is bounded, so a writer far ahead of the hasher holds at most
``QUEUE_ITEMS`` small batches besides views of memory the state owns anyway.
"""

from __future__ import annotations

import ctypes
import hashlib
import queue
import re
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import xxhash

#: The hashes a file record may name, by the key it is stored under, and their hex length.
HASHES: dict[str, tuple[Callable[[], Any], int]] = {
    "sha256": (hashlib.sha256, 64),
    "xxh3_128": (xxhash.xxh3_128, 32),
}
#: What each file of a sharded checkpoint is hashed with (see the module's docstring).
SHARD_HASH = "xxh3_128"


def new_hash(algorithm: str) -> Any:
    """A fresh hash object (``update``, ``hexdigest``) of one of :data:`HASHES`."""
    return HASHES[algorithm][0]()


def hash_of(record: Any) -> tuple[str, str] | None:
    """``(algorithm, hexdigest)`` of a file record (``{"size": n, "<algorithm>": hex}``) that
    names exactly one known hash in the right form; ``None`` for anything else."""
    if not isinstance(record, dict):
        return None
    found = [(name, record[name]) for name in HASHES if name in record]
    if len(found) != 1:
        return None
    name, value = found[0]
    ok = isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{HASHES[name][1]}}}", value) is not None
    return (name, value) if ok else None


#: Pieces smaller than this are copied into a batch (headers, small records).
BATCH_BYTES = 64 * 2**10
#: What may wait for the hasher: views of the state cost nothing, batches BATCH_BYTES each.
QUEUE_ITEMS = 64


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable ABI since 3.11): the one way to learn where a
    read-only memoryview points without numpy."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def address(chunk: Any) -> int:
    """Where a buffer's bytes start in memory."""
    view = _PyBuffer()
    if _get_buffer(chunk, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes
        raise BufferError("not a contiguous buffer")
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


def tensor_memory(state: Any) -> set[tuple[int, int]]:
    """``(address, bytes)`` of the storage of every CPU tensor in ``state``: the memory
    that stays valid for as long as the caller holds ``state``."""
    import torch

    found: set[tuple[int, int]] = set()
    stack = [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.nbytes():
                    found.add((storage.data_ptr(), storage.nbytes()))
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
    return found


class _Drained:
    """A marker the helper sets once it has hashed everything queued before it."""

    def __init__(self) -> None:
        self.event = threading.Event()


class StreamDigest:
    """``update`` in file order on the writing thread; the hashing happens on a helper.

    Use as a context manager around the writes: leaving it always stops the helper
    (on an error too), so no view is read after the state it points into is released.
    """

    def __init__(self, memory: set[tuple[int, int]], algorithm: str = "sha256") -> None:
        self._memory = memory
        self._hasher = new_hash(algorithm)
        self._queue: queue.Queue[memoryview | bytes | _Drained | None] = queue.Queue(QUEUE_ITEMS)
        self._batch = bytearray()
        self._error: BaseException | None = None
        self._hexdigest: str | None = None
        self.size = 0
        self._thread = threading.Thread(target=self._hash, name="sweeprun-checkpoint-hash",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> StreamDigest:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop()

    def update(self, chunk: Any) -> None:
        view = memoryview(chunk).cast("B")
        n = len(view)
        self.size += n
        if n < BATCH_BYTES:
            self._batch += view
            if len(self._batch) >= BATCH_BYTES:
                self._send_batch()
        elif (address(view), n) in self._memory:
            self._send_batch()
            self._queue.put(view)
        else:
            self._send_batch()                   # memory torch may free after this write:
            drained = _Drained()                 # hash it now, after everything before it
            self._queue.put(drained)
            drained.event.wait()
            self._hasher.update(view)

    def hexdigest(self) -> str:
        """Wait for the helper to hash what is queued; the hash of everything updated."""
        self._stop()
        if self._error is not None:
            raise self._error
        assert self._hexdigest is not None
        return self._hexdigest

    def _send_batch(self) -> None:
        if self._batch:
            self._queue.put(bytes(self._batch))
            self._batch.clear()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._send_batch()
            self._queue.put(None)
            self._thread.join()

    def _hash(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            if isinstance(item, _Drained):
                item.event.set()
            elif self._error is None:            # after an error, only keep the writer unblocked
                try:
                    self._hasher.update(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the writer by hexdigest()
                    self._error = exc
        self._hexdigest = self._hasher.hexdigest()
