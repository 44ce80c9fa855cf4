"""Object stores (S3, GCS, memory:// and any other fsspec filesystem that is not local disk):
a single PUT is atomic, ``If-None-Match: *`` makes one create-only, and there are no links."""

from __future__ import annotations

import contextlib
import errno
import io
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

from .base import TEMP_PREFIX, UPLOAD_PART_BYTES, Sink, StoreBackend
from .errors import _error, store_errors

_GLOB_MAGIC = re.compile(r"([*?\[])")


def literal(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` as fsspec's pattern-expanding calls (``rm`` with a list or ``recursive``,
    ``copy``, ``expand_path``) must be given it to mean this path only.

    They take ``*?[`` as glob characters, so ``s3://b/out[1]/...`` would match
    ``s3://b/out1/...``: a reset would delete another store's run. Each one is escaped as
    a one-character class. Local disk's ``rm`` takes names as they are.
    """
    from .local import is_local

    return path if is_local(fs) else _GLOB_MAGIC.sub(r"[\1]", path)


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
    return 0.0


def _not_a_file(path: str, info: dict[str, Any]) -> Exception:
    kind = "a folder" if info.get("type") == "directory" else "something else"
    return _error(f"cannot read {path}: it is {kind}, not a regular file; "
                  "move it away and run the same command again")


class ObjectBackend(StoreBackend):
    """An object store: whole-object PUTs, conditional creates, multipart uploads; no links."""

    kind = "object"
    #: Part size of a streaming write: what it holds in memory.
    part_bytes = UPLOAD_PART_BYTES

    def atomic_write(self, path: str, data: bytes) -> None:
        with store_errors("write", path):
            self.fs.pipe_file(path, data)  # one PUT: atomic by itself

    def create_only(self, path: str, data: bytes) -> bool:
        with store_errors("write", path):
            try:
                self.fs.pipe_file(path, data, mode="create")  # If-None-Match: *
            except FileExistsError:
                return False
            return True

    @contextmanager
    def stream_write(self, path: str, *, create_only: bool = False, temp_prefix: str = TEMP_PREFIX,
                     temp_suffix: str = "", before_commit: Callable[[], None] | None = None,
                     ) -> Iterator[Sink]:
        # A multipart upload: memory holds one part, never the whole file, parts lift S3's
        # 5 GiB limit of a single PUT, and the object appears whole on completion (create-
        # only: ``If-None-Match`` on the completion). A failed write aborts its upload; one
        # killed mid-way leaves an incomplete upload, which S3 bills until a lifecycle rule
        # (AbortIncompleteMultipartUpload) removes it.
        won = True
        with store_errors("write", path):
            try:
                f = self.fs.open(path, "xb" if create_only else "wb", block_size=self.part_bytes)
            except FileExistsError:
                won = False
            if won:
                try:
                    yield Sink(f, part_bytes=self.part_bytes)
                    if before_commit is not None:
                        before_commit()
                    f.close()
                except FileExistsError:
                    won = False
                except BaseException:
                    discard = getattr(f, "discard", None)
                    if discard is not None and not f.closed:
                        with contextlib.suppress(Exception):
                            discard()
                            f.closed = True  # or its finaliser would try to close it again
                    raise
        if not won:
            raise FileExistsError(errno.EEXIST, "another writer's file is there", path)

    def makedirs(self, path: str) -> None:
        """Folders are prefixes of names: nothing to create."""

    def read_regular(self, path: str, max_bytes: int, *, tail: bool = False) -> bytes:
        with store_errors("read", path):
            info = self.fs.info(path)
            if info.get("type") != "file":
                raise _not_a_file(path, info)
            size = int(info.get("size") or 0)
            start = max(0, size - max_bytes) if tail else 0
            return bytes(self.fs.cat_file(path, start=start, end=min(size, start + max_bytes)))

    def size(self, path: str) -> int:
        with store_errors("read", path):
            return int(self.fs.info(path).get("size") or 0)

    def read_range(self, path: str, start: int, end: int) -> bytes:
        with store_errors("read", path):
            return bytes(self.fs.cat_file(path, start=start, end=end))

    def exists(self, path: str) -> bool:
        with store_errors("read", path):
            return bool(self.fs.exists(path))

    def entries(self, folder: str) -> dict[str, bool]:
        with store_errors("list", folder):
            try:
                found = self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return {}
        return {str(info["name"]).rstrip("/").rsplit("/", 1)[-1]: info.get("type") == "file"
                for info in found}

    def files(self, top: str) -> dict[str, float]:
        with store_errors("list", top):
            try:
                found = self.fs.find(top, detail=True)
            except FileNotFoundError:
                return {}
        return {str(path): _mtime(info) for path, info in found.items() if info.get("type") == "file"}

    def move(self, src: str, dst: str) -> None:
        with store_errors("move", src):
            self.fs.mv(literal(self.fs, src), dst)

    def delete(self, paths: Iterable[str], *, recursive: bool = False) -> None:
        paths = list(paths)
        if paths:
            self.fs.rm([literal(self.fs, p) for p in paths], recursive=recursive)

    def delete_file(self, path: str, *, set_aside: str | None = None) -> None:
        with store_errors("delete", path):
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass


    def read_if_present(self, path: str, max_bytes: int) -> bytes | None:
        # One ranged GET: ``exists`` costs a HEAD and then a LIST for a missing key, and
        # s3fs's plain ``cat_file`` a HEAD first.
        with store_errors("read", path):
            try:
                return bytes(self.fs.cat_file(path, start=0, end=max_bytes))
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # S3 answers a ranged GET of an empty object 416
                    return b""
                raise


class MemoryBackend(ObjectBackend):
    """``memory://`` (tests, notebooks): a file there exists from the moment it is opened, so
    a streamed write is buffered and put whole at its commit."""

    kind = "object"

    @contextmanager
    def stream_write(self, path: str, *, create_only: bool = False, temp_prefix: str = TEMP_PREFIX,
                     temp_suffix: str = "", before_commit: Callable[[], None] | None = None,
                     ) -> Iterator[Sink]:
        buffer = io.BytesIO()
        yield Sink(buffer)  # type: ignore[arg-type]
        if before_commit is not None:
            before_commit()
        if create_only:
            if not self.create_only(path, buffer.getvalue()):
                raise FileExistsError(errno.EEXIST, "another writer's file is there", path)
        else:
            self.atomic_write(path, buffer.getvalue())
