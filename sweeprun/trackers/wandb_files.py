"""Reading W&B's offline run files (``run-<id>.wandb``), which its Python package no longer
reads itself: what an offline attempt logged, for the next attempt (which steps W&B holds
already) and for tests.

The file is LevelDB's log format with W&B's header: 7 bytes (``:W&B``, magic 0xBEE1,
version 0), then blocks of 32 KiB holding records, each with a 7-byte header (CRC-32 of type
and data, length, type: full, first, middle, last) and a serialized ``wandb.proto`` Record.
A torn tail (the process killed mid-write) ends the reading: what was whole is returned.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEADER = struct.Struct("<4sHB")
_RECORD = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[bytes]:
    """The whole records of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER.size or _HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
        return
    pos, pending = _HEADER.size, b""
    while pos + _RECORD.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD.size:           # padding at a block's end
            pos += left_in_block
            continue
        checksum, length, kind = _RECORD.unpack_from(data, pos)
        start, pos = pos + _RECORD.size, pos + _RECORD.size + length
        chunk = data[start:pos]
        if kind == 0 and length == 0:              # zeros: preallocated or padded
            continue
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != checksum:
            return                                 # torn or damaged: stop at the last whole record
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def history(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(step, values)`` of each history row the file holds."""
    from wandb.proto import wandb_internal_pb2

    for raw in records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a record of a newer W&B: passed over
            continue
        if record.WhichOneof("record_type") != "history":
            continue
        values = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                values[key] = json.loads(item.value_json)
            except ValueError:          # a value W&B encodes its own way: not a number we logged
                continue
        step = record.history.step.num if record.history.HasField("step") else values.get("_step", 0)
        yield int(step), {k: v for k, v in values.items() if not k.startswith("_")}


def exit_code(path: str | Path) -> int | None:
    """The exit code the file's run finished with (``wandb.finish``), or ``None``."""
    from wandb.proto import wandb_internal_pb2

    found = None
    for raw in records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001
            continue
        if record.WhichOneof("record_type") == "exit":
            found = record.exit.exit_code
    return found


def run_files(folder: str | Path, run: str) -> list[Path]:
    """The offline files of W&B run ``run`` under ``folder`` (its ``wandb/``), oldest first."""
    return sorted(Path(folder).glob(f"offline-run-*-{run}/run-{run}.wandb"))
