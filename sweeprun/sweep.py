"""A sweep bound to its store and ledger: preparation before launch, and status.

This is the library face of the CLI: ``Sweep.open(spec)`` then ``prepare()`` and
:class:`~sweeprun.runner.Launcher`, or ``status()`` for a read-only view.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass
from typing import Any

from .errors import LedgerError, StoreError
from .identity import RunSpec
from .ledger import Ledger, RunRow, RunState, default_ledger_path, open_ledger
from .metrics import parse_entries
from .spec import SweepSpec
from .store import SweepPaths, atomic_write, open_store, store_errors, write_json


@dataclass(frozen=True)
class StatusRow:
    """One line of ``sweeprun status``."""

    run_id: str
    params: dict[str, Any]      # the grid axes only: what tells runs apart
    state: RunState
    attempts: int
    failures: int
    step: int | None
    metric: tuple[str, float] | None
    checkpoint_age_s: float | None
    worker: str | None

    def as_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "params": self.params, "state": self.state.value,
                "attempts": self.attempts, "failures": self.failures, "step": self.step,
                "metric": dict([self.metric]) if self.metric else None,
                "checkpoint_age_s": self.checkpoint_age_s, "worker": self.worker}


class Sweep:
    def __init__(self, spec: SweepSpec, ledger_location: str | None = None) -> None:
        if not spec.store:
            raise StoreError(f"{spec.source}: no store given; add `store: ./sweeps-out` to the file "
                             "or pass --store")
        self.spec = spec
        self.store = open_store(spec.store)
        self.paths: SweepPaths = self.store.sweep(spec.name)
        self.runs: list[RunSpec] = spec.runs()
        self.runs_by_id = {run.run_id: run for run in self.runs}
        self.ledger_location = str(ledger_location or spec.ledger
                                   or default_ledger_path(spec.store, spec.name))

    def open_ledger(self, readonly: bool = False) -> Ledger:
        return open_ledger(self.ledger_location, self.spec.name, readonly=readonly)

    def prepare(self) -> Ledger:
        """Check the store, open the ledger, record the spec, and sync the ledger from the store.

        Checks come first so bad input writes nothing; the store is listed
        once for done runs and once for started ones, whatever the sweep's size.
        """
        self.store.check_writable()
        ledger = self.open_ledger()
        try:
            done = self.paths.done_ids()
            started = self._started_ids()
            self._record_spec()
            ledger.sync(self.runs, done=done, started=started)
        except BaseException:
            ledger.close()
            raise
        return ledger

    def _started_ids(self) -> set[str]:
        fs = self.store.fs
        with store_errors("list", self.paths.runs):
            if not fs.exists(self.paths.runs):
                return set()
            return {posixpath.basename(p.rstrip("/")) for p in fs.ls(self.paths.runs, detail=False)}

    def _record_spec(self) -> None:
        fs = self.store.fs
        with store_errors("read", self.paths.spec):
            current = fs.cat_file(self.paths.spec) if fs.exists(self.paths.spec) else None
        if current != self.spec.text.encode():
            atomic_write(fs, self.paths.spec, self.spec.text.encode())

    def write_params(self, run_id: str, params: dict[str, Any]) -> None:
        paths = self.paths.run(run_id)
        with store_errors("read", paths.params):
            exists = self.store.fs.exists(paths.params)
        if not exists:
            write_json(self.store.fs, paths.params, params)

    def status(self) -> list[StatusRow]:
        """Read-only: the ledger if there is one, the store for what is done and how far runs got."""
        ledger_rows: dict[str, RunRow] = {}
        try:
            ledger = self.open_ledger(readonly=True)
        except LedgerError:
            ledger = None  # no ledger yet (or unreadable): the store alone tells the states
        if ledger is not None:
            try:
                ledger_rows = {r.run_id: r for r in ledger.rows()}
            finally:
                ledger.close()
        listing = self.paths.listing()
        metrics_paths = {run.run_id: self.paths.run(run.run_id).metrics for run in self.runs
                         if "metrics.jsonl" in listing.get(run.run_id, {})}
        last_entries = self._last_entries(list(metrics_paths.values()))
        now = time.time()
        rows = []
        for run in self.runs:
            files = listing.get(run.run_id, {})
            row = ledger_rows.get(run.run_id)
            state = row.state if row else RunState.PENDING
            if "DONE" in files:
                state = RunState.DONE
            elif state is RunState.DONE or (row is None and files):
                state = RunState.INTERRUPTED if files else RunState.PENDING
            if state is RunState.RUNNING and row and (row.lease_until or 0) < now:
                state = RunState.INTERRUPTED  # the holder stopped renewing: the run is up for grabs
            ckpt = [m for p, m in files.items() if p.startswith("checkpoints/")]
            step, metric = _progress(last_entries.get(metrics_paths.get(run.run_id, "")))
            rows.append(StatusRow(
                run_id=run.run_id, params={k: run.params[k] for k in self.spec.grid},
                state=state, attempts=row.attempts if row else 0, failures=row.failures if row else 0,
                step=step, metric=metric, checkpoint_age_s=now - max(ckpt) if ckpt else None,
                worker=row.worker if row and state is RunState.RUNNING else None))
        return rows

    def _last_entries(self, paths: list[str]) -> dict[str, dict[str, Any]]:
        """``path -> last whole metrics entry``, read with one (concurrent) call for all runs."""
        if not paths:
            return {}
        with store_errors("read", self.paths.runs):
            blobs = self.store.fs.cat(paths, on_error="omit")  # concurrent on object stores
        if isinstance(blobs, bytes):
            blobs = {paths[0]: blobs}
        out = {}
        for path, blob in blobs.items():
            entries = parse_entries(blob)
            if entries:
                out[self.store.fs._strip_protocol(path)] = entries[-1]
        return out


def _progress(entry: dict[str, Any] | None) -> tuple[int | None, tuple[str, float] | None]:
    if not entry:
        return None, None
    step = entry.get("step")
    metric = next(((k, float(v)) for k, v in entry.items()
                   if k not in ("step", "epoch", "time", "lr") and isinstance(v, (int, float))
                   and not isinstance(v, bool)), None)
    return (step if isinstance(step, int) else None), metric
