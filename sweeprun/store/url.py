"""Opening a store: a path or fsspec URL checked and resolved to a :class:`Store`."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec

from ..errors import StoreError
from ..redact import redact_url
from .backends import backend_for
from .base import StoreBackend
from .errors import _error, _first_line, store_errors
from .local import StoreFileSystem, is_local
from .paths import SweepPaths

#: Filesystems that cannot hold a sweep: archives and read-only views. fsspec opens some of
#: them happily (``zip://x`` reads the current folder as a zip), so they are refused by name.
_READ_ONLY_PROTOCOLS = frozenset({"zip", "tar", "libarchive", "reference", "http", "https",
                                  "github", "git", "data", "jlab", "jupyter", "dask"})

@dataclass(frozen=True)
class Store:
    """A root on some fsspec filesystem under which sweeps live."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @property
    def canonical_url(self) -> str:
        """One spelling per place: what identifies the store (the default ledger is keyed by it).

        ``/x``, ``file:///x``, ``x/../x``, ``~/x``, ``/x/`` and a path through a symlink to
        ``/x`` all give ``/x`` (Colab's ``My Drive`` is a symlink to ``MyDrive``): two
        spellings of one store must never get two ledgers, or every run executes twice
        at once. A URL gives protocol, host and path, never credentials or a query.
        """
        if is_local(self.fs):
            return os.path.realpath(self.root)
        protocol = self.protocol
        path = self.root.strip("/")
        try:
            parts = urlsplit(self.url) if "://" in self.url else None
        except ValueError:  # "ftp://[x": the backend took it; its host is not shown
            parts = None
        host = (parts.hostname or "") if parts else ""
        try:
            port = parts.port if parts else None
        except ValueError:  # not a number: no port, as the backend saw it
            port = None
        if port:
            host += f":{port}"
        # s3fs and memory:// keep the bucket (or first segment) in ``root``; ftp:// and
        # sftp:// keep the host in the filesystem's options instead, so it is added here.
        if host and not type(self.fs)._strip_protocol(f"{protocol}://sweeprun-probe/p").lstrip(
                "/").startswith("sweeprun-probe"):
            path = f"{host}/{path}" if path else host
        return redact_url(f"{protocol}://{path}".split("?", 1)[0].split("#", 1)[0])

    @property
    def backend(self) -> StoreBackend:
        """The store interface for this store (:func:`~sweeprun.store.backends.backend_for`)."""
        return backend_for(self.fs, self.root)

    @property
    def protocol(self) -> str:
        return self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]

    def first_contact(self) -> fsspec.AbstractFileSystem:
        """The filesystem for the checks that open a store: on s3://, few retries and a short
        connect timeout (:data:`S3_FIRST_CONTACT`), with everything else as configured."""
        if self.protocol not in ("s3", "s3a"):
            return self.fs
        options = dict(self.fs.storage_options)
        # a copy of the retries: botocore rewrites them in place (max_attempts -> total_max_attempts)
        first = {**S3_FIRST_CONTACT, "retries": dict(S3_FIRST_CONTACT["retries"])}
        options["config_kwargs"] = {**options.get("config_kwargs", {}), **first}
        return type(self.fs)(**options)

    def _check_bucket(self, fs: fsspec.AbstractFileSystem, next_step: str) -> None:
        """A missing bucket is a wrong URL (or a store not made yet), not a sweep not started."""
        if self.protocol not in _BUCKETED:
            return
        bucket = self.root.strip("/").split("/", 1)[0]
        # The root first: an unreachable endpoint raises there, where a bucket's own check
        # (s3fs's exists) would say only "no such bucket".
        if bucket and not fs.exists(self.root) and not fs.exists(bucket):
            raise _error(f"store {self.url}: bucket {bucket} does not exist, or cannot be reached "
                         f"with this endpoint and these credentials; {next_step}")

    def sweep(self, name: str) -> SweepPaths:
        return SweepPaths(self.fs, posixpath.join(self.root, name))

    def check_present(self) -> None:
        """For readers: a local store whose parent folder is missing is an unmounted drive,
        not a sweep that has not started; saying "all pending" there would mislead. So is
        an object store's missing bucket."""
        if not is_local(self.fs):
            with store_errors("use store", self.url):
                self._check_bucket(self.first_contact(), "check the URL, the endpoint "
                                   "(AWS_ENDPOINT_URL) and the credentials, or give the right --store")
            return
        with store_errors("use store", self.url):
            parent = posixpath.dirname(self.root.rstrip("/"))
            if not self.fs.exists(self.root) and parent and not self.fs.exists(parent):
                raise _error(f"store {self.url}: parent folder {parent} does not exist "
                             "(is the drive mounted?); mount it or give the right --store")

    def check_writable(self) -> None:
        """Fail early, before anything is written, when the store cannot hold a sweep.

        The root itself may be created, but not its parent: a missing parent
        usually means an unmounted drive, and creating it would silently put the
        sweep on the local disk of a machine that is about to disappear.
        """
        with store_errors("use store", self.url):
            if not is_local(self.fs):
                self._check_bucket(self.first_contact(), "create it, or check the URL, the "
                                   "endpoint (AWS_ENDPOINT_URL) and the credentials")
                return
            if not self.fs.exists(self.root):
                parent = posixpath.dirname(self.root.rstrip("/"))
                if is_local(self.fs) and parent and not self.fs.exists(parent):
                    raise _error(f"store {self.url}: parent folder {parent} does not exist "
                                 "(is the drive mounted?); create it or choose another --store")
                if is_local(self.fs):
                    if not os.path.isdir(parent or "/"):
                        raise _error(f"store {self.url}: {parent} is not a folder; "
                                     "choose another --store")
                    if not os.access(parent or "/", os.W_OK):
                        raise _error(f"store {self.url}: cannot create it in {parent}: "
                                     "permission denied; choose another --store")
                    return
            if is_local(self.fs):
                if not self.fs.isdir(self.root):
                    raise _error(f"store {self.url} is a file, not a folder; choose another --store")
                if not os.access(self.root, os.W_OK):
                    raise _error(f"store {self.url} is not writable; check its permissions "
                                 "or choose another --store")


def open_store(url: str) -> Store:
    """Resolve a path or fsspec URL (``./out``, ``memory://x``, ``s3://bucket/x``) to a :class:`Store`.

    Every way this can fail (unknown or read-only protocol, backend not installed,
    host unreachable, a path that is not UTF-8) is one redacted :class:`StoreError`.
    """
    if not url or not str(url).strip():
        raise StoreError("store is empty; give a path or an fsspec URL with --store or `store:`")
    url = str(url)
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        shown = url.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise _error(f"store {shown} is not valid UTF-8 (a file name in another encoding?); "
                     "rename the folder or choose another --store") from None
    protocol = url.split("://", 1)[0].lower() if "://" in url else ""
    if "::" in url:
        raise _error(f"store {url}: chained URLs (a::b) are not supported as a store; use a local "
                     "path or an object store URL such as s3://bucket/x")
    if protocol in _READ_ONLY_PROTOCOLS:
        raise _error(f"store {url}: {protocol}:// is read-only and cannot hold a sweep; use a local "
                     "path or an object store URL such as s3://bucket/x")
    _check_url(url, protocol)
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options(protocol))
    except ValueError as exc:
        if str(exc).startswith("Protocol not known"):
            raise _error(f"store {url}: Protocol not known: {protocol}://; use a local path or "
                         "an fsspec URL such as s3://bucket/x or gs://bucket/x") from exc
        raise _error(f"store {url}: {_first_line(exc)}") from exc
    except ImportError as exc:
        if protocol in ("s3", "s3a"):
            raise _error(f"store {url}: s3:// stores need s3fs: pip install 'sweeprun[s3]'") from exc
        raise _error(f"store {url}: {_first_line(exc)}; install it and run the same command "
                     "again") from exc
    except OSError as exc:
        reason = exc.strerror or _first_line(exc)
        raise _error(f"store {url}: cannot connect: {reason}; check that the store is reachable "
                     "and its URL is right") from exc
    except Exception as exc:  # a backend failing in its constructor (auth, network, ...)
        raise _error(f"store {url}: cannot open it: {_first_line(exc)}") from exc
    root = root.rstrip("/") or "/"
    if is_local(fs):
        fs = StoreFileSystem(store_root=root)
    return Store(fs=fs, root=root, url=url)


#: Object stores whose first segment is a bucket name, which never holds ``@`` or ``:``: one
#: that does is credentials (``s3://KEY:SECRET@bucket``, the secret perhaps holding ``/``).
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})
_SHOWN_TAIL = re.compile(r"[A-Za-z0-9._-]+(?:/[^?#=&@\s]*)?")


def _check_url(url: str, protocol: str) -> None:
    """Refuse what a store URL must not carry, without ever quoting it.

    Credentials: the URL is copied into logs, messages and every run's
    ``SWEEPRUN_RUN_DIR``. A query string or fragment: fsspec would take it as part of the
    path, so options there (``?secret_access_key=...``) would end up in every object's key.
    Only what surely follows the credentials and holds no option is shown.
    """
    if not protocol or protocol in ("file", "local"):
        return
    rest = url.split("://", 1)[1]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if protocol in _BUCKET_PROTOCOLS and ("@" in authority or ":" in authority):
        tail = url.rsplit("@", 1)[1] if "@" in url else ""
        shown = f"{protocol}://***@{tail}" if _SHOWN_TAIL.fullmatch(tail) else f"{protocol}://***"
        raise StoreError(f"store {shown}: credentials do not belong in the store URL (it is copied "
                         "into logs and the store); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(or AWS_PROFILE) in the environment and give s3://bucket/path")
    if "?" in rest or "#" in rest:
        head = f"{protocol}://..." if "@" in url else re.split(r"[?#]", url, maxsplit=1)[0] + "?..."
        raise _error(f"store {head}: a store URL takes no query string or fragment (?... or "
                     "#...): fsspec would make it part of every object's name, credentials "
                     "included; set options in the environment (AWS_ENDPOINT_URL, "
                     "AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) or in fsspec's configuration "
                     "(~/.config/fsspec/), and give the URL without them")


#: Object stores whose filesystems cache listings (fsspec's DirCache).
_LISTING_CACHES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
#: botocore's retries for s3://: "adaptive" backs off on throttling (503 SlowDown) and
#: transient errors and slows the client down; s3fs adds its own retries on top.
S3_RETRIES = {"mode": "adaptive", "max_attempts": 10}
#: The first contact with an s3:// store (:meth:`Store.check_writable`, :meth:`Store.check_present`):
#: a dead endpoint or a wrong URL is bad input, said in seconds, not after a minute of the
#: backoff above meant for a live store that stumbles.
S3_FIRST_CONTACT = {"connect_timeout": 3, "read_timeout": 20,
                    "retries": {"mode": "standard", "max_attempts": 2}}
#: Protocols whose root starts with a bucket (container) that must exist.
_BUCKETED = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def storage_options(protocol: str) -> dict[str, Any]:
    """What sweeprun asks of a backend beyond the user's fsspec configuration.

    No listing cache: a long-lived worker must see what other machines wrote (a newer
    attempt's checkpoint is exactly what a stale writer has to notice). Retries with
    backoff for S3. Endpoint and credentials are never here: they come from the
    standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as for any AWS tool.
    """
    options: dict[str, Any] = {}
    if protocol in _LISTING_CACHES:
        options["use_listings_cache"] = False
    if protocol in ("s3", "s3a"):
        configured = fsspec.config.conf.get(protocol, {}).get("config_kwargs", {})
        if "retries" not in configured:
            options["config_kwargs"] = {**configured, "retries": dict(S3_RETRIES)}
    return options
