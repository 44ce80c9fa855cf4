"""The store's one error policy: every low-level failure becomes one redacted, actionable
:class:`~sweeprun.errors.StoreError`, and a symlink inside the store is refused by name."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import StoreError
from ..redact import redact

#: Where the exceptions of storage backends come from (besides OSError): see store_errors.
_BACKEND_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure",
                    "aiohttp", "requests", "urllib3", "ftplib", "paramiko", "smbprotocol", "webdav4",
                    "huggingface_hub", "ocifs", "ossfs")


def _is_backend_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.split(".", 1)[0] in _BACKEND_MODULES


def _error(message: str) -> StoreError:
    """Every store message passes here: it may quote a URL, and URLs may carry credentials."""
    return StoreError(redact(" ".join(message.split())))


@contextmanager
def store_errors(action: str, path: str) -> Iterator[None]:
    """Turn low-level I/O errors into one actionable, redacted :class:`StoreError`.

    Besides ``OSError``, the exceptions storage backends define themselves (botocore,
    ftplib, aiohttp, ...) are the store failing. Everything else passes unchanged: a
    parse error inside the block (callers catch ``ValueError``) or a bug must not turn
    into "check that the store is reachable".
    """
    try:
        yield
    except StoreError as exc:
        if redact(str(exc)) == str(exc):
            raise
        raise _error(str(exc)) from exc.__cause__
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
        hint = {errno.ENOSPC: "free space on it and run the same command again",
                errno.EROFS: "the filesystem is read-only; remount it or choose another --store",
                errno.EACCES: "check its permissions or choose another --store",
                errno.EDQUOT: "the disk quota is exceeded; free space and run again"}.get(
                    exc.errno or 0, "check that the store is reachable and writable")
        if isinstance(exc, PermissionError) and not exc.errno:  # an object store said 403
            hint = ("check the store's credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE, ...) and their permissions on it")
        raise _error(f"cannot {action} {path}: {reason}; {hint}") from exc
    except Exception as exc:
        if not _is_backend_error(exc):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _error(f"cannot {action} {path}: {reason}; check that the store is reachable, "
                     "that its credentials are valid, and that it is writable") from exc


class StoreLinkError(StoreError):
    """A symlink inside the store where sweeprun would write, delete or read: not a passing
    failure of the store, so no retry can help; the user replaces it."""


def _link_error(path: str) -> StoreError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return StoreLinkError(redact(f"{path} is a symbolic link{target} inside the store; sweeprun never writes, "
                                "deletes or trusts files through a link there, since they would be outside "
                                "the store: replace it with a real folder or file (move its content in) and "
                                "run the same command again"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
