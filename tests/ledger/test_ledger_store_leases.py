"""Whether a sweep takes leases in the store is what its ledger declares (``Ledger.store_leases``),
never what class it is: a backend of its own gets exactly what it says, through the launcher.

Each backend here is registered under a URL scheme of its own, as a third-party backend would
be, and reached through ``--ledger`` like the built-in ones.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sweeprun import Sweep, parse_spec
from sweeprun.errors import LedgerError
from sweeprun.ledger import BACKENDS, Ledger, SqliteLedger
from sweeprun.render import PlainEvents
from sweeprun.runner import Launcher, LaunchOptions


def forwarding(name: str) -> Callable[..., Any]:
    def call(self: Forwarding, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)
    return call


class Forwarding(Ledger):
    """A backend of its own, not a :class:`SqliteLedger`: each call goes to a SQLite file
    underneath (as a backend adding metrics or a cache around another would)."""

    def __init__(self, url: str, sweep: str, readonly: bool,
                 clock: Callable[[], float] | None = None) -> None:
        self.inner = SqliteLedger(url.partition("://")[2], sweep, readonly=readonly, clock=clock)

    @property  # type: ignore[override]
    def sweep(self) -> str:
        return self.inner.sweep

    @sweep.setter
    def sweep(self, key: str) -> None:
        self.inner.sweep = key

    for _name in sorted(Ledger.__abstractmethods__) + ["settled", "now"]:
        locals()[_name] = forwarding(_name)
    del _name


class NamedButLeasing(Forwarding):
    """A ledger every machine reaches but none can trust to keep them apart (a SQLite file on
    a network share, say): it names itself and still asks for leases in the store."""

    store_leases = True

    def shared(self) -> tuple[str, str, str]:
        return "share", "0123456789abcdef", "nas:/ledgers"


class Authority(Forwarding):
    """A ledger that declares itself the authority every machine shares, and names itself."""

    store_leases = False

    def shared(self) -> tuple[str, str, str]:
        return "authority", "fedcba9876543210", "db.example:1234/sweeps"


class Unnamed(Forwarding):
    """Declares itself the shared authority, but cannot say which database it is."""

    store_leases = False


def launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: type[Forwarding]) -> None:
    """A two-run sweep launched in this process through the launcher's own path, its ledger
    ``backend``, its store on local disk under ``tmp_path``."""
    monkeypatch.setitem(BACKENDS, "custom", backend)
    monkeypatch.setenv("SWEEPRUN_HOME", str(tmp_path / "home"))
    spec = parse_spec(f"""
name: declared
command: {sys.executable} -c "print('ran')"
store: {tmp_path / 'store'}
grid:
  x: [1, 2]
""")
    sweep = Sweep(spec, f"custom://{tmp_path / 'ledger.sqlite'}")
    ledger = sweep.prepare()
    try:
        result = Launcher(sweep, ledger, LaunchOptions(workers=1),
                          PlainEvents(Console(record=True, width=100), 1, 0)).run()
    finally:
        ledger.close()
    assert result.exit_code == 0 and result.started == 2


def lease_records(tmp_path: Path) -> list[Path]:
    """The files of the runs' leases in the store (each run's ``lease/`` folder)."""
    runs = tmp_path / "store" / "declared" / "runs"
    return sorted(p for p in runs.rglob("*") if p.is_file() and "lease" in p.relative_to(runs).parts[:-1])


def coordination(tmp_path: Path) -> dict[str, Any]:
    """The sweep's record of how its workers are kept apart."""
    return json.loads((tmp_path / "store" / "declared" / "COORDINATION").read_text())


def test_a_backend_that_declares_store_leases_gets_them_though_it_names_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launch(tmp_path, monkeypatch, NamedButLeasing)
    assert coordination(tmp_path) == {"kind": "store-leases"}
    assert lease_records(tmp_path), "no run was leased in the store"


def test_a_backend_of_its_own_gets_store_leases_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that declares nothing gets the safe answer: leases in the store."""
    assert Forwarding.store_leases is True and not issubclass(Forwarding, SqliteLedger)
    launch(tmp_path, monkeypatch, Forwarding)
    assert coordination(tmp_path) == {"kind": "store-leases"}
    assert lease_records(tmp_path)


def test_a_backend_that_declares_itself_the_authority_takes_no_store_leases(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launch(tmp_path, monkeypatch, Authority)
    assert coordination(tmp_path) == {"kind": "authority", "id": "fedcba9876543210",
                                   "where": "db.example:1234/sweeps"}
    assert lease_records(tmp_path) == []


def test_declaring_itself_the_authority_without_a_name_is_one_clear_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LedgerError, match=r"^the Unnamed ledger declares that it keeps machines "
                                          r"apart \(store_leases False\) but does not name"):
        launch(tmp_path, monkeypatch, Unnamed)
    assert not (tmp_path / "store" / "declared" / "COORDINATION").exists()


def test_the_built_in_backends_declare_it() -> None:
    from sweeprun.ledger.postgres import PostgresLedger

    assert SqliteLedger.store_leases is True and PostgresLedger.store_leases is False
