"""A sweep bound to its store and ledger: preparation before launch, and status.

This is the library face of the CLI: ``Sweep.open(spec)`` then ``prepare()`` and
:class:`~sweeprun.runner.Launcher`, or ``status()`` for a read-only view.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import faults, settings
from .errors import StoreError, SweeprunError
from .fleet import Coordination, CoordinationRecord
from .holders import HolderWatch, LeaseView, lease_view, watch_holders
from .identity import RunSpec
from .leases import settle_default
from .ledger import (
    Ledger,
    Policy,
    RunRow,
    RunState,
    Verdict,
    check_location,
    default_ledger_path,
    judge,
    open_ledger,
    shown_state,
    state_home,
)
from .redact import redact
from .resumes import Resume, has_sharded_checkpoint, newest, read_started
from .rollbacks import RollbackSummary
from .spec import SweepSpec, parse_spec
from .store import (
    SweepPaths,
    atomic_write,
    backend_for,
    create_only,
    layout,
    newest_metrics_part,
    open_store,
    read_json,
    read_regular,
    store_errors,
    write_json,
)
from .training.metrics import tail_entries


@dataclass(frozen=True)
class StatusRow:
    """One line of ``sweeprun status``."""

    run_id: str
    params: dict[str, Any]      # the grid axes only: what tells runs apart
    state: RunState
    attempts: int               # starts, as the ledger numbers them
    failures: int               # real failures: what max_attempts counts
    max_attempts: int
    step: int | None
    metric: tuple[str, float] | None
    checkpoint_age_s: float | None
    worker: str | None
    #: Two machines' claims or records stand for one lease generation (store leases on a
    #: folder that showed a write late): the run may have run twice; see its logs.
    contested: bool = False
    #: The shown metric's last values, oldest first (``status`` draws them as a sparkline).
    trend: tuple[float, ...] = ()
    #: Where the run's newest metrics are (not shown): read by :meth:`Sweep.with_progress`.
    metrics_path: str | None = field(default=None, repr=False, compare=False)
    #: Its world size: the processes (ranks) it starts as, from the sweep file's ``nproc:``.
    nproc: int = 1
    #: It resumed at another world size (RNG and data position are approximate): the ledger's
    #: record of the run, or its latest attempt's start record when that one is newer.
    approximate_resume: Resume | None = None
    #: ``(path, attempt)`` of the latest attempt's start record, where :meth:`Sweep.status`
    #: chose to read it (not shown): read by :meth:`Sweep.with_progress`.
    started_record: tuple[str, int] | None = field(default=None, repr=False, compare=False)
    #: The scheduler's job of the attempt running it (``slurm 123_4``), from the attempt's record.
    job: str | None = None
    #: Where that record is, for a running run (not shown): read by :meth:`Sweep.with_progress`.
    job_record: str | None = field(default=None, repr=False, compare=False)
    #: Its loss-spike rollbacks, as the ledger recorded them at its attempts' ends.
    rollbacks: RollbackSummary | None = None

    def as_json(self) -> dict[str, Any]:
        metric = None
        if self.metric:
            metric = {self.metric[0]: self.metric[1] if math.isfinite(self.metric[1]) else None}
        return {"run_id": self.run_id, "params": self.params, "state": self.state.value,
                "attempts": self.attempts, "failures": self.failures,
                "max_attempts": self.max_attempts, "step": self.step, "metric": metric,
                "checkpoint_age_s": self.checkpoint_age_s, "worker": self.worker,
                "contested": self.contested, "nproc": self.nproc,
                "approximate_resume": self.approximate_resume.as_json() if self.approximate_resume else None,
                "job": self.job, "trend": [v if math.isfinite(v) else None for v in self.trend],
                "rollbacks": self.rollbacks.as_json() if self.rollbacks else None}


class Sweep:
    def __init__(self, spec: SweepSpec, ledger_location: str | None = None, *,
                 ephemeral_ok: bool = False) -> None:
        """``ephemeral_ok`` lets a library user (a test) put a sweep in a ``memory://`` store."""
        if not spec.store:
            raise StoreError(f"{spec.source}: no store given; add `store: ./sweeps-out` to the file "
                             "or pass --store")
        if str(spec.store).startswith("memory:") and not ephemeral_ok:
            raise StoreError(f"store {spec.store} lives in this process's memory and vanishes with it; "
                             "a sweep needs durable storage: give a path or a bucket URL")
        self.spec = spec
        self.store = open_store(spec.store)
        self.paths: SweepPaths = self.store.sweep(spec.name)
        self.runs: list[RunSpec] = spec.runs()
        self.runs_by_id = {run.run_id: run for run in self.runs}
        # --ledger, then SWEEPRUN_LEDGER (a notebook keeps a database password out of the
        # sweep file there), then `ledger:` in the file, then a SQLite file per store.
        self.ledger_location = check_location(str(
            ledger_location or (settings.LEDGER.get() or "").strip() or spec.ledger
            or default_ledger_path(self.store.canonical_url, spec.name)))
        #: Things the user should hear about before the runs start (the launcher prints them).
        self.notes: list[str] = []
        #: This grid's runs found done in the store by :meth:`prepare` (the ledger agrees after it).
        self.done_at_start: set[str] = set()
        #: How this launcher's workers are kept apart, as the store agreed in :meth:`prepare`.
        self.coordination: Coordination | None = None

    def open_ledger(self, readonly: bool = False, key: str | None = None) -> Ledger:
        return open_ledger(self.ledger_location, key or self.spec.name, readonly=readonly)

    @contextlib.contextmanager
    def read_ledger(self) -> Iterator[Ledger | None]:
        """This machine's ledger, read-only, looking at this sweep's rows; ``None`` when there is
        no ledger here or the sweep was never launched with it (then the store tells)."""
        if not self.ledger_exists():
            yield None
            return
        ledger = self.open_ledger(readonly=True)
        try:
            key = self.ledger_key()
            if key is not None:
                ledger.sweep = key
            yield ledger if key is not None else None
        finally:
            ledger.close()

    def ledger_key(self, create: bool = False) -> str | None:
        """The sweep's rows in a ledger: its name and the id kept in its folder of the store.

        One database serves many sweeps, and two sweep files may share a name while
        their stores differ (or ``--store`` points a relaunch at a new bucket): keyed by
        the name alone, each store would get only the runs its workers happened to
        claim, and both launches would end "all done". The id is created once, create-only,
        in the store, so every machine that reaches the folder (by any path or URL)
        agrees on it, and a deleted sweep folder starts afresh. ``None``: never launched.
        """
        path = self.paths.identity
        if create:
            create_only(self.store.fs, path, layout.sweep_id_text(uuid.uuid4().hex))
        try:
            raw = read_regular(self.store.fs, path, 256)
        except StoreError as exc:
            if not create and isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise
        ident = layout.parse_sweep_id(raw)
        if ident is None:
            raise StoreError(f"{self.store.fs.unstrip_protocol(path)} is not a sweep id written "
                             "by sweeprun; move it away and run again (finished runs stay finished)")
        return f"{self.spec.name}#{ident[:16]}"

    def prepare(self, move_ledger: bool = False) -> Ledger:
        """Check the store, open the ledger, agree with the store on how the sweep is
        coordinated, record the spec, and sync the ledger from the store.

        Checks come first so bad input writes nothing (a worker whose ledger would
        coordinate differently from the sweep's record included: see
        :meth:`CoordinationRecord.join`; ``move_ledger`` moves the sweep to this ledger);
        the store is listed once for done runs and once for started ones, whatever the
        sweep's size.
        """
        faults.check()
        self.store.check_writable()
        self.paths.check_no_links()
        ledger = self.open_ledger()  # opening checks the ledger before anything is written
        try:
            mine = Coordination.of(ledger)
            moved = CoordinationRecord(self.paths).join(
                mine, self.spec.name, move=move_ledger, settle_s=self.settle_s,
                holders=lambda: self.store_holders(self.paths.run_ids() - self.paths.done_ids()))
            self.coordination = mine
            if moved:
                self.notes.append(moved)
            ledger.sweep = self.ledger_key(create=True) or self.spec.name
            done = self.paths.done_ids(prune_stale=True)
            self.done_at_start = done & self.runs_by_id.keys()
            started = self.paths.run_ids()
            self._record_spec(done)
            ledger.sync(self.runs, done=done, started=started, still_done=self._still_done)
            self.honour_resets(ledger)
        except BaseException:
            ledger.close()
            raise
        return ledger

    # -- resets made on any machine ---------------------------------------------------------

    @property
    def resets_dir(self) -> str:
        """``resets/``: one marker per run ``sweeprun reset`` made run again, named
        ``<run id>@<token>``, beside ``runs/``: a run's own folder is moved away by the reset,
        and any folder there would make the run look started to every reader."""
        return self.paths.resets

    def _markers(self) -> list[tuple[str, str, str]]:
        """``(name, run id, token)`` of every reset marker, from one listing (temp files of a
        marker's write and anything else there are passed over)."""
        return [(name, *parsed) for name in self.paths._names(self.resets_dir, files_only=True)
                if (parsed := layout.parse_reset_marker(name)) is not None]

    def resets(self) -> dict[str, str]:
        """``run id -> token`` of each run's newest reset marker, from one listing (no reads:
        a launch pays one LIST however many runs were ever reset)."""
        out: dict[str, str] = {}
        for _, run_id, token in self._markers():
            if token > out.get(run_id, ""):
                out[run_id] = token
        return out

    def mark_reset(self, run_id: str, clock: Callable[[], float] = time.time) -> str:
        """Leave the marker every machine's ledger honours (:meth:`Ledger.forget`) for a run
        just reset, and remove its older ones. The token sorts after every earlier one of the
        run whatever the clocks say, so a kill before the old ones are gone still leaves this
        one the newest."""
        self.paths.run(run_id)  # the id is a safe path segment
        older = [(name, token) for name, marked, token in self._markers() if marked == run_id]
        stamp = max([int(clock() * 1000)] + [(layout.reset_token_ms(t) or 0) + 1 for _, t in older])
        token = layout.reset_token(stamp, uuid.uuid4().hex[:8])
        atomic_write(self.store.fs, self.paths.reset_marker(run_id, token),
                     (json.dumps({"run_id": run_id, "at": clock()}) + "\n").encode())
        faults.crash_point("reset.before_older_markers_go")
        for name, _ in older:
            with store_errors("delete", self.resets_dir):
                try:
                    self.store.fs.rm_file(posixpath.join(self.resets_dir, name))
                except FileNotFoundError:
                    pass
        return token

    def honour_resets(self, ledger: Ledger) -> set[str]:
        """Tell ``ledger`` of the resets made on any machine (after a sync: see :meth:`Ledger.forget`)."""
        markers = self.resets()
        return ledger.forget(markers) if markers else set()

    def _still_done(self, run_id: str) -> bool:
        """Is a run the ledger has as done, and the done index lacks, done in the store? If
        so it gets its entry now (a crash came between its ``DONE`` and the entry), or the
        next launch would look it up again and ``status`` count it from its folder."""
        paths = self.paths.run(run_id)
        if not paths.is_done():
            return False
        try:
            paths.index_done()
        except StoreError:
            pass  # asked again next launch
        return True

    def _record_spec(self, done: set[str]) -> None:
        """Keep the spec as launched in the store, without secrets; say so when the command changed."""
        fs = self.store.fs
        text = redact(self.spec.text)  # the exit of this stored file
        with store_errors("read", self.paths.spec):
            exists = fs.exists(self.paths.spec)
        # bounded like the sweep file itself; anything odd there is simply replaced
        try:
            current = read_regular(fs, self.paths.spec, 1 << 20) if exists else None
        except StoreError:
            current = None
        if current == text.encode():
            return
        if current is not None:
            try:
                before = parse_spec(current.decode(), self.paths.spec)
            except (SweeprunError, UnicodeDecodeError):
                before = None
            finished = len(done & set(self.runs_by_id))
            if before is not None and before.command != self.spec.command and finished:
                self.notes.append(
                    f"the command changed since this sweep was last launched; {finished} finished "
                    f"run(s) keep their results and are not run again. To re-run one with the new "
                    f"command, delete its folder under {self.store.fs.unstrip_protocol(self.paths.runs)}"
                    " (or give the sweep a new name)")
        atomic_write(fs, self.paths.spec, text.encode())

    def write_params(self, run_id: str, params: dict[str, Any]) -> None:
        paths = self.paths.run(run_id)
        with store_errors("read", paths.params):
            exists = self.store.fs.exists(paths.params)
        if not exists:
            write_json(self.store.fs, paths.params, params)

    @property
    def policy(self) -> Policy:
        return Policy(max_attempts=self.spec.max_attempts, max_lost=self.spec.max_lost,
                      oom_retries=self.spec.on_oom.retries)

    def ledger_rows(self, resets: Callable[[], Mapping[str, str]] | None = None
                    ) -> tuple[dict[str, RunRow], float]:
        """What the ledger knows of this sweep's runs, read-only, and the ledger's time now.

        Nothing when there is no ledger yet or the sweep was never launched with it.
        ``resets`` (:meth:`resets`, called only when the ledger has rows): runs reset on any
        machine are shown as this ledger will have them at its next launch
        (:meth:`honour_resets`): failures forgotten, a failed run pending.
        """
        if not self.ledger_exists():
            return {}, time.time()
        ledger = self.open_ledger(readonly=True)  # a bad --ledger is an error even here
        try:
            key = self.ledger_key()
            if key is None:  # never launched: the ledger holds nothing of it
                return {}, ledger.now()
            ledger.sweep = key
            rows = {r.run_id: r for r in ledger.rows()}
            markers = resets() if resets is not None and rows else {}
            pending = {run_id: token for run_id, token in markers.items() if run_id in rows}
            seen = ledger.honoured() if pending else {}
            for run_id, token in pending.items():
                if seen.get(run_id) != token:
                    row = rows[run_id]
                    rows[run_id] = replace(row, failures=0, lost=0, state=RunState.PENDING
                                           if row.state is RunState.FAILED else row.state)
            return rows, ledger.now()
        finally:
            ledger.close()

    def holders(self, run_ids: Iterable[str], watch_s: float = 0.0,
                note: Callable[[str], None] | None = None) -> dict[str, str]:
        """Which of ``run_ids`` are held right now, and by whom: under a live lease in the
        ledger (:func:`~sweeprun.ledger.judge`, on the ledger's own clock) or in the store
        (another machine's ledger cannot be seen), by the lease protocol's rule
        (:mod:`sweeprun.holders`): a store lease not yet proven stale is watched for up to
        ``watch_s`` and counts as held if still undecided. What ``reset`` and ``gc`` refuse
        to touch."""
        run_ids = set(run_ids)
        rows, now = self.ledger_rows()
        out = {run_id: rows[run_id].worker or "a worker" for run_id in run_ids
               if run_id in rows and judge(rows[run_id], now, self.policy) is Verdict.HELD}
        if out:
            return out
        leased = {}
        for run_id, files in self.paths.listing(only=sorted(run_ids)).items():
            lease = lease_view(files, settle_s=self.settle_s)
            if lease is not None and not lease.released:
                leased[run_id] = (self.paths.run(run_id).dir, lease.generation)
        return watch_holders(self.watch, leased, watch_s, poll_s=min(0.5, max(0.05, self.spec.lease_s / 8)),
                             note=note)

    def store_holders(self, run_ids: Iterable[str]) -> dict[str, str]:
        """Which of ``run_ids`` hold a store lease not proven stale by this machine's watch, and
        who: what any machine can see of another's runs without its ledger."""
        out = {}
        for run_id, files in self.paths.listing(only=sorted(run_ids)).items():
            lease = lease_view(files, settle_s=self.settle_s)
            holder = self._holder(run_id, lease) if lease is not None else None
            if holder:
                out[run_id] = holder
        self.watch.save()
        return out

    def progress_of(self, run_id: str) -> tuple[int | None, tuple[str, float] | None]:
        """A running run's step and latest metric, from the tail of its metrics: what the
        live view of ``launch`` shows (:meth:`~sweeprun.render.LiveEvents.progress`)."""
        paths = self.paths.run(run_id)
        try:
            path = paths.current_metrics()
        except StoreError:
            return None, None
        entries = self._tail_entries(path, METRICS_TAIL_FIRST_BYTES)[0] if path else []
        return _progress(entries[-1] if entries else None)

    def status(self, summary: bool = False, only: Iterable[str] | None = None) -> list[StatusRow]:
        """Read-only: the ledger if there is one, the store for what is done and how far runs got.

        Shows the runs of this spec and every other run the ledger knows for the sweep
        (another launcher's grid), each judged by the same rules the launcher uses.
        ``summary`` (a big sweep, shown as counts and the runs that need attention): done
        runs come from the done index with no detail, only the other runs' folders are
        listed, and no metrics are read; :meth:`with_progress` reads them for the rows
        a caller shows. Its cost then grows with the runs not done, not with the sweep.
        ``only``: just these runs (``show``), whether or not they belong to the grid.
        """
        self.store.check_present()
        ledger_rows, now = self.ledger_rows(self.resets)
        if only is not None:
            listing = self.paths.listing(only=only)
            done = self.paths.done_ids(listing)
        elif summary:
            done = self.paths.done_ids()
            listing = self.paths.listing(only=self.paths.run_ids() - done)
            done |= self.paths.done_ids(listing)  # DONE without its index entry (a crash between)
        else:
            listing = self.paths.listing()
            done = self.paths.done_ids(listing)
        policy = self.policy
        varying = self.spec.varying()  # grid and paired keys: what tells runs apart
        runs: list[tuple[str, dict[str, Any]]] = [
            (run.run_id, {k: run.params[k] for k in varying}) for run in self.runs]
        runs += [(row.run_id, row.params) for row in ledger_rows.values()
                 if row.run_id not in self.runs_by_id]
        if only is not None:
            wanted = set(only)
            runs = [(run_id, params) for run_id, params in runs if run_id in wanted]
            runs += [(run_id, {}) for run_id in sorted(wanted - {r for r, _ in runs})]
        rows = []
        for run_id, params in runs:
            files = listing.get(run_id, {})
            row = ledger_rows.get(run_id)
            state = shown_state(row, now, policy) if row else RunState.PENDING
            if run_id in done:
                state = RunState.DONE
            elif state is RunState.DONE or (row is None and files):
                state = RunState.INTERRUPTED if files else RunState.PENDING
            worker = row.worker if row and state is RunState.RUNNING else None
            attempts = row.attempts if row else 0
            lease = lease_view(files, settle_s=self.settle_s)
            if lease is not None:
                attempts = max(attempts, lease.generation)  # the number every machine agrees on
                holder = self._holder(run_id, lease) if state in (RunState.PENDING, RunState.INTERRUPTED) else None
                if holder:  # held by another machine, whose ledger this one cannot see
                    state, worker = RunState.RUNNING, holder
            ckpt = [m for p, m in files.items() if p.startswith(layout.CHECKPOINTS + "/") or layout.is_trainer_seal(p)]
            nproc = self._nproc(run_id, params)
            # a run with no files left (not done) has begun anew: no resume to tell of
            resumed = row.resumed if row is not None and (files or run_id in done) else None
            started = self._started_record(run_id, files, nproc, state)
            if started is not None and resumed is not None and started[1] <= resumed.attempt:
                started = None  # the ledger recorded that attempt's end: nothing newer to read
            rows.append(StatusRow(
                run_id=run_id, params=params, state=state,
                attempts=attempts, failures=row.failures if row else 0,
                max_attempts=self.spec.max_attempts,
                step=None, metric=None, checkpoint_age_s=time.time() - max(ckpt) if ckpt else None,
                worker=worker, contested=bool(lease and lease.contested and state is not RunState.DONE),
                metrics_path=self._metrics_path(run_id, files), nproc=nproc,
                approximate_resume=resumed, started_record=started,
                rollbacks=row.rollbacks if row is not None and (files or run_id in done) else None,
                job_record=self._job_record(run_id, attempts, files) if state is RunState.RUNNING else None))
        if only is None:  # `show` (``only``) writes nothing; `status` keeps its watch of the beats
            self.watch.save()
        return rows if summary else self.with_progress(rows)

    def _nproc(self, run_id: str, params: dict[str, Any]) -> int:
        """A run's world size by the sweep file (a run of another grid: by its own params)."""
        run = self.runs_by_id.get(run_id)
        if run is not None:
            return self.spec.nproc_of(run)
        if isinstance(self.spec.nproc, int):
            return self.spec.nproc
        value = params.get(self.spec.nproc)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1

    def _started_record(self, run_id: str, files: dict[str, float], nproc: int,
                        state: RunState) -> tuple[str, int] | None:
        """The latest attempt's start record, if the listing has one and the run may have
        resumed at another world size: it runs as several processes, it is not done, or it
        holds a multi-rank checkpoint. A done single-process run (most of a big sweep) costs
        no read; ``show`` reads every attempt's record whatever the run."""
        latest = layout.highest_attempt(files)
        rel = f"{layout.ATTEMPTS}/{layout.attempt_record_name(latest, 'started')}" if latest else None
        if rel is None or rel not in files:
            return None
        if nproc > 1 or state is not RunState.DONE or has_sharded_checkpoint(files):
            return self.paths.run(run_id).api_started(latest), latest
        return None

    def _job_record(self, run_id: str, attempt: int, files: dict[str, float]) -> str | None:
        """The record of the attempt running the run (``attempts/<n>.json``), if listed."""
        rel = f"{layout.ATTEMPTS}/{layout.attempt_record_name(attempt)}" if attempt else None
        return self.paths.run(run_id).attempt_record(attempt) if rel in files else None

    def with_progress(self, rows: list[StatusRow]) -> list[StatusRow]:
        """``rows`` with each run's step, last metric and that metric's recent values
        (the sparkline), all from one read of the tail of its metrics; and whether its
        latest attempt resumed approximately, where :meth:`status` chose to read that (the newer
        of it and the ledger's record wins: an attempt still running, or run on another machine)."""
        out = []
        for row in rows:
            if row.started_record is not None:
                found = read_started(self.store.fs, *row.started_record).resume
                row = replace(row, approximate_resume=newest(row.approximate_resume, found))
            if row.job_record is not None:
                row = replace(row, job=_job_of(self.store.fs, row.job_record))
            step, metric, trend = None, None, ()
            # A small tail first: parsing is what costs (64 KiB is ~1,500 lines); a longer
            # one only when it holds too few points of the metric (another logged between).
            size = METRICS_TAIL_FIRST_BYTES
            while row.metrics_path:
                entries, whole = self._tail_entries(row.metrics_path, size)
                step, metric = _progress(entries[-1] if entries else None)
                trend = _trend(entries, metric[0]) if metric else ()
                if whole or len(trend) >= TREND_POINTS or size >= METRICS_TAIL_BYTES:
                    break
                size = min(size * 4, METRICS_TAIL_BYTES)
            out.append(replace(row, step=step, metric=metric, trend=trend))
        return out

    @functools.cached_property
    def settle_s(self) -> float:
        """The settle delay store leases use in this store (status judges leases by it)."""
        if self.spec.lease_settle_s is not None:
            return self.spec.lease_settle_s
        return settle_default(self.store.fs, self.store.root)[0]

    @functools.cached_property
    def watch(self) -> HolderWatch:
        """This machine's watch over the sweep's store leases (:mod:`sweeprun.holders`)."""
        try:
            home: Path | None = state_home()
        except SweeprunError:
            home = None  # a bad SWEEPRUN_HOME: nothing remembered, every look starts a watch
        return HolderWatch(self.store.fs, self.store.fs.unstrip_protocol(self.paths.dir),
                           lease_s=self.spec.lease_s, settle_s=self.settle_s, home=home)

    def _holder(self, run_id: str, lease: LeaseView) -> str | None:
        """Who holds the run now by the lease protocol's rule, as this machine has watched
        its beat (never by comparing the store's timestamps with this machine's clock)."""
        return self.watch.holder(self.paths.run(run_id).dir, lease.generation, lease.released).holder

    def _metrics_path(self, run_id: str, files: dict[str, float]) -> str | None:
        """Where the run's metrics are, from the listing: ``metrics.jsonl`` on local disk,
        the newest attempt's object on object stores (see :class:`~sweeprun.training.metrics.MetricsLog`)."""
        if not files:  # a done run of a big sweep's summary, never listed: nothing to build
            return None
        paths = self.paths.run(run_id)
        if backend_for(self.store.fs).appendable:
            return paths.metrics if layout.METRICS in files else None
        parts = layout.METRICS_PARTS + "/"
        newest = newest_metrics_part(p[len(parts):] for p in files if p.startswith(parts))
        return posixpath.join(paths.metrics_parts, newest) if newest else None

    def ledger_exists(self) -> bool:
        location = self.ledger_location
        if "://" in location:
            return True
        return os.path.exists(os.path.expanduser(location))

    def _tail_entries(self, path: str, size: int | None = None) -> tuple[list[dict[str, Any]], bool]:
        """The whole entries in the last ``size`` bytes (default :data:`METRICS_TAIL_BYTES`)
        of a metrics file, never the whole file, never a FIFO; and whether that was all of it."""
        try:  # a long last line that is not an entry is looked past, in bounded chunks
            return tail_entries(self.store.fs, path, size or METRICS_TAIL_BYTES)
        except (StoreError, FileNotFoundError):
            return [], True

#: How much of a metrics file status reads at most for its last entry and the sparkline's points.
METRICS_TAIL_BYTES = 64 * 1024
#: The first read: enough for the last entry and the sparkline of most files.
METRICS_TAIL_FIRST_BYTES = 4 * 1024
#: Points of the shown metric in a status row's sparkline (fewer when the tail holds fewer).
TREND_POINTS = 20


def _trend(entries: list[dict[str, Any]], name: str) -> tuple[float, ...]:
    """The last :data:`TREND_POINTS` values of metric ``name``, oldest first (entries that
    log other metrics in between are passed over)."""
    values = [float(e[name]) for e in entries
              if isinstance(e.get(name), (int, float)) and not isinstance(e.get(name), bool)]
    return tuple(values[-TREND_POINTS:])


def _progress(entry: dict[str, Any] | None) -> tuple[int | None, tuple[str, float] | None]:
    if not entry:
        return None, None
    step = entry.get("step")
    metric = next(((k, float(v)) for k, v in entry.items()
                   if k not in ("step", "epoch", "time", "lr") and isinstance(v, (int, float))
                   and not isinstance(v, bool)), None)
    return (step if isinstance(step, int) else None), metric


def _job_of(fs: Any, record: str) -> str | None:
    """The scheduler's job an attempt record names (see :meth:`Tenure.take_number`); ``None``
    when it names none or cannot be read (status shows what it can)."""
    try:
        found = read_json(fs, record)
    except (StoreError, ValueError, RecursionError):
        return None
    job = found.get("job") if isinstance(found, dict) else None
    return job if isinstance(job, str) else None
