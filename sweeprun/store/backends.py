"""The one place a store's kind is decided (:func:`backend_for`), and the module-level
functions the rest of sweeprun calls with a filesystem in hand."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

from .base import JSON_MAX_BYTES, StoreBackend, json_bytes
from .late import LateFolderBackend, late_reason
from .local import LocalBackend, StoreFileSystem, is_local
from .object import MemoryBackend, ObjectBackend

#: Where a filesystem keeps its picked backend: on the instance itself, since two fsspec
#: filesystems with equal options compare equal yet may reach different endpoints.
_PICKED = "_sweeprun_backend"


def backend_for(fs: fsspec.AbstractFileSystem, root: str | None = None) -> StoreBackend:
    """The store backend for ``fs``: local disk, a late folder, or an object store.

    ``root`` is the store's folder where ``fs`` does not know it (a plain local filesystem);
    a :class:`StoreFileSystem` carries its own. A local folder is late where its path or
    mount says so (:func:`~sweeprun.store.late.late_reason`): every machine that opens the
    store decides alike, with no setting to keep in step. Picked once per filesystem.
    """
    if root is None:
        picked_before = getattr(fs, _PICKED, None)
        if isinstance(picked_before, StoreBackend) and picked_before.fs is fs:
            return picked_before
    if isinstance(fs, MemoryFileSystem):
        picked: StoreBackend = MemoryBackend(fs)
    elif not is_local(fs):
        picked = ObjectBackend(fs)
    else:
        folder = root if root is not None else getattr(fs, "store_root", None)
        why = late_reason(str(fs._strip_protocol(folder))) if folder is not None else None
        picked = LateFolderBackend(fs, why) if why else LocalBackend(fs)
    if root is None:
        try:
            setattr(fs, _PICKED, picked)
        except AttributeError:  # a filesystem with __slots__: picked again next time
            pass
    return picked


def settle_default(fs: fsspec.AbstractFileSystem, root: str) -> tuple[float, str | None]:
    """``(settle_s, why)`` for a store: claim-then-confirm on folders that show other
    machines' writes late (a mounted Google Drive, an rclone or gcsfuse mount), plain
    exclusive creates everywhere else (a local disk, NFS, and object stores, which are
    strongly consistent: S3 since 2020, GCS always)."""
    backend = backend_for(fs, root)
    return backend.settle_s, backend.settle_why


def store_kind(fs: fsspec.AbstractFileSystem) -> str:
    """``"local"``, ``"late"`` or ``"object"``: for messages and tests."""
    return backend_for(fs).kind


def native_path(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """See :meth:`StoreBackend.native_path`: an OS path on local disk, ``None`` in an object store."""
    return backend_for(fs).native_path(path)


def listed_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` as ``fs`` names it in its own listings (``find``, ``ls``): without protocol,
    so that a listed name can be made relative to it."""
    return str(fs._strip_protocol(path))


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one
    (:meth:`StoreBackend.atomic_write`)."""
    backend_for(fs).atomic_write(path, data)


def create_only(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` only if nothing is there yet; ``False`` when something was
    (:meth:`StoreBackend.create_only`)."""
    return backend_for(fs).create_only(path, data)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    atomic_write(fs, path, json_bytes(obj))


def read_json(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """The JSON document at ``path``; a non-regular or oversized file is a :class:`StoreError`."""
    return backend_for(fs).read_json(path, max_bytes)


def read_regular(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int, *,
                 tail: bool = False) -> bytes:
    """At most ``max_bytes`` of the regular file ``path`` (:meth:`StoreBackend.read_regular`)."""
    return backend_for(fs).read_regular(path, max_bytes, tail=tail)


def remove(fs: fsspec.AbstractFileSystem, paths: Iterable[str], *, recursive: bool = False) -> None:
    """Delete exactly ``paths`` (folders too, with ``recursive``): never what a pattern in
    their names matches, never through a link (:meth:`StoreBackend.delete`)."""
    backend_for(fs).delete(paths, recursive=recursive)


__all__ = ["StoreFileSystem", "atomic_write", "backend_for", "create_only", "listed_path", "native_path",
           "read_json", "read_regular", "remove", "settle_default", "store_kind", "write_json"]
