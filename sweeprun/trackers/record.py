"""A run's tracker record, ``tracker.json``: which tracker run this life of the run logs to."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from ..errors import SpecError
from ..store import create_only, read_json, write_json

if TYPE_CHECKING:
    from ..store import RunPaths


def life(paths: RunPaths) -> dict[str, Any]:
    """The run's tracker record (``tracker.json``), made create-only at the first start of this
    life of the run with a random ``life`` token: a ``reset`` run starts a new folder, so a new
    life, and a new tracker run, never the old one's history. Two starters agree on one token."""
    fresh = {"life": uuid.uuid4().hex}
    if create_only(paths.fs, paths.tracker, json.dumps(fresh).encode()):
        return fresh
    record = read_json(paths.fs, paths.tracker)
    if not isinstance(record, dict) or not isinstance(record.get("life"), str):
        raise SpecError(f"{paths.tracker} is not a tracker record sweeprun wrote; remove it")
    return record


def remember(paths: RunPaths, record: dict[str, Any], **found: Any) -> dict[str, Any]:
    """``record`` with ``found`` (the tracker run's id, ...), written whole over the old one."""
    record = {**record, **found}
    write_json(paths.fs, paths.tracker, record)
    return record
