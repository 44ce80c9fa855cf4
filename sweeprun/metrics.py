"""metrics.jsonl: one JSON object per logged step, consistent with the checkpoint it resumes from.

Entries logged after the last checkpoint are replayed when the run resumes, so
:meth:`MetricsLog.open` drops every entry past the restored step (no duplicate or
ghost points on the curve) and a torn last line left by a kill mid-append. On local
disk entries are appended and flushed one by one, so ``sweeprun status`` sees
progress live; object stores cannot append, so there the whole file is rewritten
atomically at each save.
"""

from __future__ import annotations

import json
import math
import os
from typing import IO, Any

import fsspec

from .store import atomic_write, is_local, store_errors


def plain(value: Any) -> Any:
    """A JSON-ready value: tensors and numpy scalars become Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


class MetricsLog:
    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path
        self._lines: list[str] = []          # the whole file, kept for object stores
        self._file: IO[str] | None = None
        self._dirty = False
        self.opened = False

    def open(self, resume_step: int) -> None:
        """Keep only whole entries with ``step <= resume_step``; rewrite the file if that changed it."""
        with store_errors("read", self.path):
            try:
                raw = self.fs.cat_file(self.path).decode(errors="replace")
            except FileNotFoundError:
                raw = ""
        pieces = raw.split("\n")
        whole = pieces[:-1]                  # the text after the last newline is a torn line (or "")
        kept = [line for line in whole if _step_of(line) is not None
                and _step_of(line) <= resume_step]  # type: ignore[operator]
        self._lines = [line + "\n" for line in kept]
        if kept != whole or pieces[-1]:
            atomic_write(self.fs, self.path, "".join(self._lines).encode())
        if is_local(self.fs):
            with store_errors("open", self.path):
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for appends
        self.opened = True

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps({k: plain(v) for k, v in entry.items()}) + "\n"
        if self._file is not None:
            with store_errors("append to", self.path):
                self._file.write(line)
                self._file.flush()
        else:
            self._lines.append(line)
            self._dirty = True

    def flush(self) -> None:
        """Make every entry so far durable-or-visible (called before each checkpoint write)."""
        if self._file is None and self._dirty:
            atomic_write(self.fs, self.path, "".join(self._lines).encode())
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def _step_of(line: str) -> int | float | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    step = entry.get("step") if isinstance(entry, dict) else None
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
        return None
    return step


def parse_entries(raw: bytes) -> list[dict[str, Any]]:
    """The whole entries of a metrics file's bytes (a torn last line is left out)."""
    text = raw.decode(errors="replace")
    return [json.loads(line) for line in text.split("\n")[:-1] if _step_of(line) is not None]


def read_metrics(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """The whole entries of a metrics file (a torn last line is left out)."""
    with store_errors("read", path):
        return parse_entries(fs.cat_file(path))
