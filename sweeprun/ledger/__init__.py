"""Ledgers: the coordination index of a sweep. ``open_ledger`` picks a backend from the URL."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import LedgerError
from .base import Claim, Ledger, Outcome, RunRow, RunState
from .sqlite import SqliteLedger

__all__ = ["Claim", "Ledger", "Outcome", "RunRow", "RunState", "SqliteLedger", "default_ledger_path",
           "open_ledger"]

HOME_ENV = "SWEEPRUN_HOME"

#: URL scheme -> backend constructor ``(location, sweep, readonly)``. A PostgreSQL
#: backend registers ``postgresql`` here; a bare path means SQLite.
BACKENDS: dict[str, Callable[[str, str, bool], Ledger]] = {
    "sqlite": lambda loc, sweep, ro: SqliteLedger(loc, sweep, readonly=ro),
}


def default_ledger_path(store_url: str, sweep: str) -> Path:
    """Where the ledger lives when none is given: local state dir, one file per (store, sweep).

    Never beside the data: the store may be a network mount where SQLite
    locking is unsafe, and the ledger can always be rebuilt from the store.
    """
    home = Path(os.environ.get(HOME_ENV) or Path.home() / ".local" / "state" / "sweeprun")
    key = hashlib.sha256(f"{_normalise_store(store_url)}\0{sweep}".encode()).hexdigest()[:12]
    return home / "ledgers" / f"{sweep}-{key}.sqlite"


def _normalise_store(url: str) -> str:
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def open_ledger(location: str | Path, sweep: str, *, readonly: bool = False) -> Ledger:
    """Open ``location``: a file path or ``sqlite:///path`` (later ``postgresql://...``)."""
    text = str(location)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return BACKENDS["sqlite"](text, sweep, readonly)
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise LedgerError(f"ledger {text}: unknown backend {scheme!r}; "
                          f"use a file path or one of: {', '.join(s + '://' for s in BACKENDS)}")
    return backend(rest, sweep, readonly)
