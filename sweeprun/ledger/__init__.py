"""Ledgers: the coordination index of a sweep. ``open_ledger`` picks a backend from the URL."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import LedgerError
from .base import (
    Claim,
    Ledger,
    Outcome,
    Policy,
    RunRow,
    RunState,
    Uptime,
    Verdict,
    grid_key,
    judge,
    shown_state,
)
from .sqlite import SqliteLedger

__all__ = ["Claim", "Ledger", "Outcome", "Policy", "RunRow", "RunState", "SqliteLedger", "Uptime", "Verdict",
           "default_ledger_path", "grid_key", "judge", "open_ledger", "shown_state"]

HOME_ENV = "SWEEPRUN_HOME"


def _sqlite(url: str, sweep: str, readonly: bool) -> Ledger:
    return SqliteLedger(url.partition("://")[2], sweep, readonly=readonly)


def _postgres(url: str, sweep: str, readonly: bool) -> Ledger:
    from .postgres import PostgresLedger  # psycopg is an extra, imported only when asked for

    return PostgresLedger(url, sweep, readonly=readonly)


#: URL scheme -> backend constructor ``(whole URL, sweep, readonly)``: a server's URL carries
#: more than a path (user, host, port, options). A bare path means SQLite.
BACKENDS: dict[str, Callable[[str, str, bool], Ledger]] = {
    "sqlite": _sqlite,
    "postgresql": _postgres,
    "postgres": _postgres,
}


def state_home() -> Path:
    """``$SWEEPRUN_HOME`` or ``~/.local/state/sweeprun``: where default ledgers live."""
    raw = os.environ.get(HOME_ENV)
    if raw is not None:
        if not raw.strip() or "\0" in raw:
            raise LedgerError(f"{HOME_ENV}={raw!r} is not a usable folder; set it to a folder on "
                              "local disk or unset it")
        home = Path(raw).expanduser()
        if home.exists() and not home.is_dir():
            raise LedgerError(f"{HOME_ENV}={raw} is a file, not a folder; set it to a folder on local "
                              "disk or unset it")
        probe = home
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise LedgerError(f"{HOME_ENV}={raw} cannot be created: {probe} is a file; set it to a "
                              "folder on local disk or unset it")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise LedgerError(f"{HOME_ENV}={raw} is not writable ({probe}: permission denied); set it "
                              "to a writable folder on local disk or unset it")
        return home
    return Path.home() / ".local" / "state" / "sweeprun"


def default_ledger_path(store_key: str, sweep: str) -> Path:
    """Where the ledger lives when none is given: local state dir, one file per (store, sweep).

    ``store_key`` is the store's canonical URL, so every spelling of one store (a
    symlink, ``file://``) finds the same ledger. Never beside the data: the store may
    be a network mount where SQLite locking is unsafe, and the ledger can always be
    rebuilt from the store.
    """
    key = hashlib.sha256(f"{store_key}\0{sweep}".encode(errors="surrogateescape")).hexdigest()[:12]
    return state_home() / "ledgers" / f"{sweep[:80]}-{key}.sqlite"


def open_ledger(location: str | Path, sweep: str, *, readonly: bool = False) -> Ledger:
    """Open ``location``: a file path, ``sqlite:///path`` or ``postgresql://user@host:port/db``."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    if not sep:
        return SqliteLedger(text, sweep, readonly=readonly)
    backend = BACKENDS.get(scheme)
    if backend is None:
        from ..redact import redact

        raise LedgerError(f"ledger {redact(text)}: unknown backend {scheme!r}; "
                          f"use a file path or one of: {', '.join(s + '://' for s in BACKENDS)}")
    return backend(text, sweep, readonly)
