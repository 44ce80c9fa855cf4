"""Ledgers: the coordination index of a sweep. ``open_ledger`` picks a backend from the URL."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from .. import settings
from ..errors import LedgerError
from ..redact import redact, redact_url, secrets_in
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
           "check_location", "default_ledger_path", "grid_key", "judge", "open_ledger", "shown_state"]

HOME_ENV = settings.HOME.name


Clock = Callable[[], float]


def _sqlite(url: str, sweep: str, readonly: bool, clock: Clock | None = None) -> Ledger:
    return SqliteLedger(url.partition("://")[2], sweep, readonly=readonly, clock=clock)


def _postgres(url: str, sweep: str, readonly: bool, clock: Clock | None = None) -> Ledger:
    from .postgres import PostgresLedger  # psycopg is an extra, imported only when asked for

    return PostgresLedger(url, sweep, readonly=readonly, clock=clock)


#: URL scheme -> backend constructor ``(whole URL, sweep, readonly, clock)``: a server's URL
#: carries more than a path (user, host, port, options). A bare path means SQLite. The clock
#: is ``None`` (the backend's own) unless a caller injects one (tests).
BACKENDS: dict[str, Callable[[str, str, bool, Clock | None], Ledger]] = {
    "sqlite": _sqlite,
    "postgresql": _postgres,
    "postgres": _postgres,
}


def state_home() -> Path:
    """``$SWEEPRUN_HOME`` or ``~/.local/state/sweeprun``: where default ledgers live."""
    raw = settings.HOME.get()
    if raw is not None:
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


#: libpq's connection keywords: ``host=db user=me password=...`` is a PostgreSQL connection
#: string, never meant as the name of a SQLite file.
_LIBPQ_WORDS = ("host", "hostaddr", "port", "dbname", "user", "password", "passfile", "sslmode",
                "service", "options", "connect_timeout", "application_name", "target_session_attrs",
                "sslcert", "sslkey", "sslrootcert", "require_auth", "channel_binding", "gssencmode")
_LIBPQ_PAIR = rf"\s*(?:{'|'.join(_LIBPQ_WORDS)})\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s']*)\s*"
_LIBPQ_STRING = re.compile(rf"(?:{_LIBPQ_PAIR})+", re.IGNORECASE)


def check_location(location: str) -> str:
    """``location`` if it can name a ledger; a libpq keyword string is refused without quoting it.

    Taken as a path, ``host=db password=s3cret`` would silently become a SQLite file named
    with the password, and each machine would coordinate alone. A single ``word=value``
    with a ``/`` stays a path (``host=a/ledger.sqlite``).
    """
    if "://" not in location and _LIBPQ_STRING.fullmatch(location) and (
            len(location.split()) > 1 or "/" not in location):
        words = sorted({w.split("=", 1)[0].strip().lower() for w in re.findall(
            rf"(?:{'|'.join(_LIBPQ_WORDS)})\s*=", location, re.IGNORECASE)})
        raise LedgerError(f"ledger is a PostgreSQL keyword string (with {', '.join(words)}), which "
                          "sweeprun does not take: give --ledger a postgresql:// URL "
                          "(postgresql://HOST:5432/DATABASE) and the user and password in PGUSER "
                          "and PGPASSWORD or ~/.pgpass; for a SQLite file of that name, write ./ "
                          "before it")
    return location


def open_ledger(location: str | Path, sweep: str, *, readonly: bool = False,
                clock: Clock | None = None) -> Ledger:
    """Open ``location``: a file path, ``sqlite:///path`` or ``postgresql://user@host:port/db``.

    ``clock``: the ledger's time in seconds, instead of its own (this process's for SQLite,
    the server's for PostgreSQL); tests move time with it.

    No message says a credential of ``location``, even one the backend's own error
    quotes back (psycopg does, for a password it cannot parse).
    """
    text = check_location(str(location))
    scheme, sep, _ = text.partition("://")
    if not sep:
        return SqliteLedger(text, sweep, readonly=readonly, clock=clock)
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise LedgerError(f"ledger {redact_url(text)}: unknown backend {scheme!r}; "
                          f"use a file path or one of: {', '.join(s + '://' for s in BACKENDS)}")
    secrets = secrets_in(text)
    try:
        return backend(text, sweep, readonly, clock)
    except LedgerError as exc:
        message = redact(str(exc), also=secrets)
        if message == str(exc):
            raise
        raise LedgerError(message) from None
