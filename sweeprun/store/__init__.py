"""The run layout on durable storage, over any fsspec filesystem.

The store is the source of truth: a run with ``DONE`` is finished, a run with a
verified checkpoint resumes from it. So every state write goes through the store
interface (:class:`~sweeprun.store.base.StoreBackend`: atomic and create-only writes,
streaming, bounded reads, listings with mtimes, moves and deletes that never follow a
link), whose implementation for a filesystem is picked in one place,
:func:`backend_for`; and only :class:`RunPaths` / :class:`SweepPaths` know where files live.

Modules:

- :mod:`.base`: the interface and its contract; :mod:`.contract`: the shipped tests of it;
- :mod:`.local`, :mod:`.object`, :mod:`.late`: local disk, object stores, late folders;
- :mod:`.backends`: :func:`backend_for`, and the functions that take a filesystem;
- :mod:`.errors`: :func:`store_errors`, the one error policy;
- :mod:`.paths`: the layout; :mod:`.url`: :func:`open_store` and its checks.
"""

from __future__ import annotations

from .backends import (
    atomic_write,
    backend_for,
    create_only,
    listed_path,
    native_path,
    read_json,
    read_regular,
    remove,
    settle_default,
    store_kind,
    write_json,
)
from .base import JSON_MAX_BYTES, TEMP_PREFIX, UPLOAD_PART_BYTES, Sink, StoreBackend, json_bytes
from .errors import StoreLinkError, store_errors
from .late import SETTLE_DEFAULT_S, LateFolderBackend
from .local import (
    LocalBackend,
    StoreFileSystem,
    confine,
    current_umask,
    fsync_dir,
    is_local,
    mount_fstype,
)
from .object import MemoryBackend, ObjectBackend, literal
from .paths import RunPaths, SweepPaths, is_done_entry, newest_metrics_part
from .url import S3_FIRST_CONTACT, S3_RETRIES, Store, open_store, storage_options

__all__ = [
    "JSON_MAX_BYTES", "S3_FIRST_CONTACT", "S3_RETRIES", "SETTLE_DEFAULT_S", "TEMP_PREFIX",
    "UPLOAD_PART_BYTES", "LateFolderBackend", "LocalBackend", "MemoryBackend", "ObjectBackend", "RunPaths", "Sink",
    "Store", "StoreBackend", "StoreFileSystem", "StoreLinkError", "SweepPaths", "atomic_write",
    "backend_for", "confine", "create_only", "current_umask", "fsync_dir", "is_done_entry",
    "is_local", "json_bytes", "listed_path", "literal", "mount_fstype", "native_path", "newest_metrics_part",
    "open_store", "read_json", "read_regular", "remove", "settle_default", "storage_options",
    "store_errors", "store_kind", "write_json",
]
