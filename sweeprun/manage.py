"""One run up close (``show``) and the two ways to change a sweep after the fact (``reset``, ``gc``).

``show`` only reads. ``reset`` and ``gc`` change the store under runs that might be
running, so both first ask :meth:`~sweeprun.sweep.Sweep.holders` and refuse while one of
the runs they would touch is held, by the ledger or by a lease in the store.

A reset never edits the ledger's rows by hand. Machines that share only the store each
keep their own ledger, which this machine cannot reach, so a reset speaks through the
store: a marker per run (``<sweep>/resets/``, see :meth:`~sweeprun.sweep.Sweep.mark_reset`)
that every launch, on any machine, hands to its ledger (:meth:`~sweeprun.ledger.Ledger.forget`),
which forgets the run's failures once per marker; then the run's folder is moved away,
which every ledger's :meth:`~sweeprun.ledger.Ledger.sync` reads as "not done". This
machine's ledger is synced at once. Killed at any point, it leaves nothing a launch cannot
mend, and every machine sees the same thing.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError, StoreError, SweeprunError
from .faults import crash_point
from .ledger import RunState
from .ledger.base import AttemptRow
from .resumes import Resume, Started, newest, read_started, started_numbers
from .rollbacks import RollbackRecord, read_rollbacks
from .store import (
    RunPaths,
    backend_for,
    confine,
    fsync_dir,
    layout,
    listed_path,
    literal,
    read_json,
    read_regular,
    remove,
    store_errors,
)
from .sweep import StatusRow, Sweep
from .trainer_folders import TrainerPlan, run_trainer
from .training.checkpoints import (
    CheckpointDir,
    CheckpointInfo,
    Manifest,
    Retention,
    recorded_retention,
)

#: How much of the newest log ``show`` reads, and how many of its last lines it shows.
LOG_TAIL_BYTES = 16 * 1024
LOG_TAIL_LINES = 20
#: How many of the last metrics entries ``show`` lists.
METRICS_SHOWN = 5


# -- finding a run ------------------------------------------------------------------------------


def resolve_run(sweep: Sweep, text: str) -> str:
    """The run ``text`` names: its id, or any part of it that only one run's id contains
    (the short hash ``status`` prints). Runs of the sweep file, of the store and of the
    ledger all count; an ambiguous or unknown name is a one-line error naming candidates."""
    ledger_rows, _ = sweep.ledger_rows()
    known = set(sweep.runs_by_id) | sweep.paths.run_ids() | set(ledger_rows)
    if text in known:
        return text
    matches = sorted(run_id for run_id in known if text and text in run_id)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SpecError(f"no run of sweep {sweep.spec.name} matches {text!r}; `sweeprun status` "
                        "lists the runs (the run column is the end of each id)")
    shown = ", ".join(matches[:5]) + (f" and {len(matches) - 5} more" if len(matches) > 5 else "")
    raise SpecError(f"{text!r} matches {len(matches)} runs of sweep {sweep.spec.name}: {shown}; "
                    "give more of the id")


def resolve_runs(sweep: Sweep, names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        run_id = resolve_run(sweep, name)
        if run_id not in out:
            out.append(run_id)
    return out


# -- show ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDetail:
    """Everything ``sweeprun show`` prints about one run."""

    row: StatusRow
    params: dict[str, Any]
    attempts: list[AttemptRow]
    #: "ledger", or "store" when the ledger has no rows (a new machine): then ends and
    #: outcomes are known only for the attempt that wrote ``DONE``.
    attempts_from: str
    checkpoints: list[CheckpointInfo]
    metrics: list[dict[str, Any]]
    log: str | None             # the newest attempt log's name
    log_tail: list[str]
    done: dict[str, Any] | None
    now: float = field(default_factory=time.time)
    #: attempt -> its start record (``attempts/<n>.started``, the training API's): its world
    #: size and a resume at another world size.
    started: dict[int, Started] = field(default_factory=dict)
    #: Its loss-spike rollbacks (``rollbacks/``), oldest first.
    rollbacks: list[RollbackRecord] = field(default_factory=list)
    #: Its last attempt that ran out of memory, in words (``attempts/<n>.oom``), or ``None``.
    oom: str | None = None

    @property
    def approximate_resume(self) -> Resume | None:
        """The run's resume at another world size, as ``status`` marks it: the latest attempt's,
        or the one the ledger kept through later exact resumes (the newer wins)."""
        latest = max([a.attempt for a in self.attempts] + list(self.started), default=None)
        record = self.started.get(latest) if latest is not None else None
        return newest(self.row.approximate_resume, record.resume if record else None)

    def _attempt_json(self, attempt: AttemptRow) -> dict[str, Any]:
        started = self.started.get(attempt.attempt) or Started(attempt.attempt)
        return {**attempt.__dict__, "world_size": started.world_size,
                "resumed": started.resume.as_json() if started.resume else None,
                "start_record_problem": started.problem}

    def as_json(self) -> dict[str, Any]:
        resume = self.approximate_resume
        return {"run_id": self.row.run_id, "params": self.params, "state": self.row.state.value,
                "worker": self.row.worker, "attempts_from": self.attempts_from,
                "attempts": [self._attempt_json(a) for a in self.attempts],
                "approximate_resume": resume.as_json() if resume else None,
                "checkpoints": [{**c.__dict__, "age_s": self.now - c.created} for c in self.checkpoints],
                "metrics": self.metrics, "log": self.log, "log_tail": self.log_tail,
                "done": self.done, "rollbacks": [r.as_json() for r in self.rollbacks], "oom": self.oom}


def run_detail(sweep: Sweep, run_id: str) -> RunDetail:
    """Read-only: the run's state as ``status`` judges it, its params, attempts,
    checkpoints (each verified against its manifest), last metrics and newest log's tail."""
    (row,) = sweep.status(only=[run_id])
    paths = sweep.paths.run(run_id)
    fs = sweep.store.fs
    files = {rel: mtime for rel, mtime in sweep.paths.listing(only=[run_id]).get(run_id, {}).items()}
    params = _params(sweep, run_id, paths.params, files)
    attempts, source = _attempts(sweep, run_id, files)
    done = paths.read_done() if layout.DONE in files else None
    if source == "store" and done:
        attempts = [_with_done(a, done) for a in attempts]
    metrics_path = paths.current_metrics()
    metrics = sweep._tail_entries(metrics_path)[0][-METRICS_SHOWN:] if metrics_path else []
    logs = sorted((n, rel) for rel in files if (n := _log_number(rel)) is not None)
    log, tail = None, []
    if logs:
        log = logs[-1][1]
        try:
            blob = read_regular(fs, posixpath.join(paths.dir, log), LOG_TAIL_BYTES, tail=True)
        except (StoreError, FileNotFoundError):
            blob = b""
        lines = blob.decode(errors="replace").splitlines()
        if len(blob) == LOG_TAIL_BYTES and lines:
            lines = lines[1:]  # cut mid-file: the first line is partial
        tail = lines[-LOG_TAIL_LINES:]  # the log was redacted as it was written
    checkpoints = _checkpoints(CheckpointDir(fs, paths.checkpoints))
    trainer = run_trainer(sweep, run_id, mtimes=files)
    if trainer is not None:
        checkpoints += trainer.checkpoints()
    started = {n: read_started(fs, paths.api_started(n), n) for n in started_numbers(files)}
    rollbacks = read_rollbacks(fs, paths.rollbacks) if any(
        rel.startswith(layout.ROLLBACKS + "/") for rel in files) else []
    return RunDetail(row=row, params=params, attempts=attempts, attempts_from=source,
                     checkpoints=checkpoints, metrics=metrics, log=log, log_tail=tail, done=done,
                     started=started, rollbacks=rollbacks, oom=_oom(fs, paths, files))


def _oom(fs: Any, paths: RunPaths, files: dict[str, float]) -> str | None:
    """``attempt 3 at step 120`` for the newest ``attempts/<n>.oom`` of the run, else ``None``."""
    found = [p for rel in files if rel.startswith(layout.ATTEMPTS + "/")
             and (p := layout.parse_attempt_record(rel.split("/", 1)[1])) and p[1] == "oom"]
    if not found:
        return None
    attempt = max(n for n, _ in found)
    try:
        record = read_json(fs, paths.api_oom(attempt))
    except (StoreError, ValueError):
        record = {}
    step = record.get("step") if isinstance(record, dict) else None
    return f"attempt {attempt}" + (f" at step {step}" if isinstance(step, int) else "")


def _params(sweep: Sweep, run_id: str, path: str, files: dict[str, float]) -> dict[str, Any]:
    if run_id in sweep.runs_by_id:
        return dict(sweep.runs_by_id[run_id].params)
    if layout.PARAMS in files:
        try:
            found = read_json(sweep.store.fs, path)
            if isinstance(found, dict):
                return found
        except (StoreError, ValueError):
            pass
    rows, _ = sweep.ledger_rows()
    return dict(rows[run_id].params) if run_id in rows else {}


def _attempts(sweep: Sweep, run_id: str, files: dict[str, float]) -> tuple[list[AttemptRow], str]:
    """The ledger's attempts; where it has none, the store's attempt records
    (``attempts/<n>.json``: worker and start) with each log's last write as its end."""
    with sweep.read_ledger() as ledger:
        found = ledger.attempts(run_id) if ledger is not None else []
    if found:
        return found, "ledger"
    numbers = {n for rel in files if (n := _record_number(rel)) is not None}
    numbers |= {n for rel in files if (n := _log_number(rel)) is not None}
    numbers |= set(started_numbers(files))
    out = []
    for n in sorted(numbers):
        record: dict[str, Any] = {}
        if f"{layout.ATTEMPTS}/{layout.attempt_record_name(n)}" in files:
            try:
                loaded = read_json(sweep.store.fs, sweep.paths.run(run_id).attempt_record(n))
                record = loaded if isinstance(loaded, dict) else {}
            except (StoreError, ValueError):
                pass
        started = record.get("started_at")
        out.append(AttemptRow(attempt=n, worker=str(record["worker"]) if record.get("worker") else None,
                              started_at=float(started) if isinstance(started, (int, float)) else None,
                              ended_at=files.get(f"{layout.LOGS}/{layout.log_name(n)}"), outcome=None,
                              exit_code=None))
    return out, "store"


def _with_done(attempt: AttemptRow, done: dict[str, Any]) -> AttemptRow:
    if done.get("attempt") != attempt.attempt:
        return attempt
    finished = done.get("finished_at")
    return AttemptRow(attempt.attempt, attempt.worker or done.get("worker"), attempt.started_at,
                      float(finished) if isinstance(finished, (int, float)) else attempt.ended_at,
                      "done", 0)


def _log_number(rel: str) -> int | None:
    """The attempt of ``logs/attempt-<n>.log`` (a path in the run's folder)."""
    folder, _, name = rel.partition("/")
    return layout.parse_log(name) if folder == layout.LOGS else None


def _record_number(rel: str) -> int | None:
    """The attempt of the launcher's record ``attempts/<n>.json``."""
    folder, _, name = rel.partition("/")
    record = layout.parse_attempt_record(name) if folder == layout.ATTEMPTS else None
    return record[0] if record and record[1] == "json" else None


def _checkpoints(directory: CheckpointDir) -> list[CheckpointInfo]:
    out = []
    for manifest in directory.manifests():
        try:
            directory.verify(manifest)
            problem = None
        except ValueError as exc:
            problem = str(exc)
        out.append(CheckpointInfo(data=manifest.data, attempt=manifest.attempt, step=manifest.step,
                                  size=manifest.size, created=manifest.created, verified=problem is None,
                                  problem=problem, metrics=dict(manifest.metrics)))
    return out


# -- refusing while held ------------------------------------------------------------------------


def refuse_held(sweep: Sweep, run_ids: Iterable[str], what: str,
                note: Callable[[str], None] | None = None) -> None:
    """Refuse (one line) while one of ``run_ids`` is held, by the ledger or by a store lease.

    A one-shot command cannot watch a beat across looks as a taker does, and moving or
    deleting a run's files must never rest on comparing the store's timestamps with this
    machine's clock (one 45 s fast would move a run still trained elsewhere). So a store
    lease not yet proven stale is watched here, by this machine's own clock, for up to one
    lease (``lease_s`` plus the settle delay): a beat that moves refuses at once, one that
    stands still that long frees the run, and one still undecided (a holder whose own
    lease is longer) refuses, its watch remembered so that the same command run again
    goes on from there. There is no force flag: a lost machine's lease is proven stale
    within a lease, and ``sweeprun stop`` releases live ones."""
    held = sweep.holders(run_ids, watch_s=sweep.spec.lease_s + sweep.settle_s, note=note)
    if not held:
        return
    shown = "; ".join(f"run {run_id} is held by {who}" for run_id, who in sorted(held.items())[:3])
    more = f" (and {len(held) - 3} more)" if len(held) > 3 else ""
    raise SweeprunError(f"cannot {what} while runs are running: {shown}{more}; wait for them to "
                        "end, or drain the workers with `sweeprun stop` (a lost worker's lease runs "
                        f"out after lease_s = {sweep.spec.lease_s:g} s), then run it again")


# -- reset --------------------------------------------------------------------------------------


@dataclass
class ResetReport:
    run_ids: list[str]
    #: run id -> where its folder went (a path in the store), or None: deleted, or it had none
    moved: dict[str, str | None]
    dry_run: bool
    delete: bool
    had_folder: set[str] = field(default_factory=set)


def reset(sweep: Sweep, names: Iterable[str] = (), *, failed: bool = False, dry_run: bool = False,
          delete: bool = False, clock: Callable[[], float] = time.time,
          note: Callable[[str], None] | None = None) -> ResetReport:
    """Make runs run again from scratch: the named ones and, with ``failed``, every failed one.

    Their folders go to ``<sweep>/trash/<run id>-<UTC time>/`` (or are deleted), their
    done-index entries go, and the ledger is brought to pending with no failures counted.
    """
    names = list(names)
    if not names and not failed:
        raise SpecError("name the runs to reset (run ids, or parts of them such as the hash "
                        "`status` shows), or give --failed")
    sweep.store.check_present()
    run_ids = resolve_runs(sweep, names)
    if failed:
        run_ids += [r.run_id for r in sweep.status() if r.state is RunState.FAILED and r.run_id not in run_ids]
    report = ResetReport(run_ids=run_ids, moved={}, dry_run=dry_run, delete=delete)
    if not run_ids:
        return report
    refuse_held(sweep, run_ids, "reset", note)
    present = sweep.paths.run_ids()
    report.had_folder = present & set(run_ids)
    now = clock()
    for run_id in run_ids:
        if run_id not in present:
            report.moved[run_id] = None
        else:
            report.moved[run_id] = None if delete else posixpath.join(
                sweep.paths.trash, layout.trash_name(run_id, now))
    if dry_run:
        return report
    sweep.store.check_writable()
    sweep.paths.check_no_links()
    # Per run: its done entry, its folder, then its marker. Until the marker is written
    # nothing offers the run again (a failed run stays failed in every ledger), so no
    # launch starts it under a folder about to be moved away; once it is, every machine's
    # ledger (this one's too, at the sync below) forgets the run's failures once. The
    # entry goes before DONE: an object store's done index counts a run whose folder is
    # there, and a kill during a slow move must not leave a run done with no DONE. Killed
    # at any point, every machine agrees on the run's state, and the same command run
    # again finishes the reset.
    for run_id in run_ids:
        with store_errors("delete", sweep.paths.run(run_id).done_entry):
            try:
                sweep.store.fs.rm_file(sweep.paths.run(run_id).done_entry)
            except FileNotFoundError:
                pass
        crash_point("reset.before_set_aside")
        if run_id in present:
            report.moved[run_id] = _set_aside(sweep, run_id, report.moved[run_id])
        sweep.mark_reset(run_id, clock)
    _ledger_sync(sweep)
    return report


def _ledger_sync(sweep: Sweep) -> None:
    """Sync the sweep's ledger as a launch does, then honour the resets (this one's among
    them). No ledger yet, or a sweep never launched with it: nothing to tell it."""
    if not sweep.ledger_exists():
        return
    key = sweep.ledger_key()
    if key is None:
        return
    ledger = sweep.open_ledger()
    try:
        ledger.sweep = key
        ledger.sync(sweep.runs, done=sweep.paths.done_ids(prune_stale=True),
                    started=sweep.paths.run_ids(),
                    still_done=lambda run_id: sweep.paths.run(run_id).is_done())
        sweep.honour_resets(ledger)
    finally:
        ledger.close()


def _set_aside(sweep: Sweep, run_id: str, dest: str | None) -> str | None:
    """Move the run's folder to ``dest`` (``None``: delete it). On local disk one rename (a
    deletion is a rename into the trash first), so the run is gone at once or not at all;
    on object stores a copy, then ``DONE`` first so that a kill half-way leaves a run that
    is not done, never a done run with missing files."""
    fs = sweep.store.fs
    src = sweep.paths.run(run_id).dir
    trash = sweep.paths.trash
    if backend_for(fs).renames_folders:
        with store_errors("move", src):
            local_src, local_trash = confine(fs, src), confine(fs, trash)
            os.makedirs(local_trash, exist_ok=True)
            target = confine(fs, dest) if dest else os.path.join(
                local_trash, layout.trash_deleting_name(run_id, os.getpid()))
            if os.path.lexists(target):
                raise StoreError(f"cannot move {src} to {target}: something is there already; "
                                 "wait a second and run the same command again")
            os.rename(local_src, target)
            fsync_dir(os.path.dirname(local_src))
            fsync_dir(local_trash)
            if dest is None:
                shutil.rmtree(target)
        return dest
    with store_errors("move", src):
        if dest is not None:
            fs.copy(literal(fs, src.rstrip("/")) + "/", dest, recursive=True)
        try:
            fs.rm_file(sweep.paths.run(run_id).done)
        except FileNotFoundError:
            pass
        remove(fs, [src], recursive=True)
    return dest


# -- gc -----------------------------------------------------------------------------------------


@dataclass
class GcRun:
    run_id: str
    checkpoints: list[str] = field(default_factory=list)   # data files removed
    temp_files: list[str] = field(default_factory=list)    # paths inside the run's folder
    kept: list[str] = field(default_factory=list)          # data files kept
    #: Trainer folders left in place: never sealed, not verifying, or set aside (``damaged``
    #: removes them). Paths inside the run's folder.
    damaged: list[str] = field(default_factory=list)
    files: int = 0                                         # files removed, all told
    bytes_freed: int = 0


@dataclass
class GcReport:
    runs: list[GcRun]
    dry_run: bool

    @property
    def bytes_freed(self) -> int:
        return sum(r.bytes_freed for r in self.runs)

    @property
    def files(self) -> int:
        return sum(r.files for r in self.runs)


def keep_set(directory: CheckpointDir, manifests: list[Manifest], best: str | None = None,
             mode: str | None = None) -> set[str]:
    """The data files that ``load_checkpoint(run, "latest")`` and ``load_checkpoint(run, "best",
    best=..., mode=...)`` would load: the newest that verifies, and the best as the script
    chose it (``sweeprun.init(best=..., mode=...)``, recorded in its newest manifest; none if
    it kept no best). ``best`` (and ``mode``) given: by that metric instead. Manifests from
    before the choice was recorded: the best by each metric they hold, lowest and highest."""
    keep: set[str] = set()
    for manifest in reversed(manifests):
        try:
            directory.verify(manifest)
        except ValueError:
            continue
        keep.add(manifest.data)
        break
    recorded = recorded_retention(manifests)
    if best and not mode and recorded is not None and recorded.best == best:
        mode = recorded.mode  # the script's own metric: its own direction
    if best or mode or recorded is None:
        names = [best] if best else sorted({k for m in manifests for k in m.metrics})
        choices = [Retention(best=name, mode=how)  # type: ignore[arg-type]
                   for name in names for how in ([mode] if mode else ["min", "max"])]
    else:
        choices = [recorded] if recorded.best else []
    for retention in choices:
        chosen = retention.best_of(manifests)
        if chosen is not None:
            keep.add(chosen.data)
    return keep


def gc(sweep: Sweep, *, dry_run: bool = False, best: str | None = None,
       mode: str | None = None, damaged: bool = False,
       note: Callable[[str], None] | None = None) -> GcReport:
    """For every done run: remove checkpoints that neither "latest" nor "best" would load
    (and data files whose manifest never came), and stray temp files of atomic writes.
    In a Trainer run's folder, see :func:`trainer_plan`; ``damaged`` also removes the
    folders that do not verify."""
    sweep.store.check_present()
    listing = sweep.paths.listing()
    done = sorted(sweep.paths.done_ids(listing))
    refuse_held(sweep, done, "collect garbage", note)
    fs = sweep.store.fs
    report = GcReport(runs=[], dry_run=dry_run)
    for run_id in done:
        paths = sweep.paths.run(run_id)
        with store_errors("list", paths.dir):
            sizes = {str(path): int(info.get("size") or 0)
                     for path, info in fs.find(paths.dir, detail=True).items() if info.get("type") == "file"}
        prefix = listed_path(fs, paths.dir).rstrip("/") + "/"
        rel_sizes = {p[len(prefix):] if p.startswith(prefix) else p: s for p, s in sizes.items()}
        item = GcRun(run_id)
        directory = CheckpointDir(fs, paths.checkpoints)
        present = directory.listing()
        manifests = directory.manifests(present)
        keep = keep_set(directory, manifests, best, mode)
        described = {m.data for m in manifests}
        for manifest in manifests:
            if manifest.data in keep:
                item.kept.append(manifest.data)
                continue
            item.checkpoints.append(manifest.data)
            for name in (manifest.name.manifest, manifest.data):
                if f"{layout.CHECKPOINTS}/{name}" in rel_sizes:
                    item.files += 1
                    item.bytes_freed += rel_sizes[f"{layout.CHECKPOINTS}/{name}"]
        orphans = [name for name, regular in present.items()
                   if regular and (c := layout.CheckpointName.parse(name)) is not None and name == c.data
                   and name not in described and c.manifest not in present]
        for name in orphans:
            item.checkpoints.append(name)
            item.files += 1
            item.bytes_freed += rel_sizes.get(f"{layout.CHECKPOINTS}/{name}", 0)
        trainer = run_trainer(sweep, run_id, sizes=rel_sizes)
        plan = trainer.plan(damaged) if trainer is not None else TrainerPlan()
        gone = [trainer.rel(p) for p in plan.remove + plan.leftovers] if trainer else []

        def inside(rel: str, tops: list[str] = gone) -> list[str]:
            return [top for top in tops if rel.startswith(top + "/")]

        temps = sorted(rel for rel in rel_sizes
                       if posixpath.basename(rel).startswith(layout.TEMP_PREFIX) and not inside(rel))
        item.temp_files = temps + gone[len(plan.remove):]
        temp_set = set(temps)
        for rel, size in rel_sizes.items():
            if rel in temp_set or inside(rel):
                item.files += 1
                item.bytes_freed += size
        item.checkpoints += gone[:len(plan.remove)]
        if trainer is not None:
            item.kept += [trainer.rel(p) for p in plan.keep]
            item.damaged = [trainer.rel(p) for p in plan.damaged]
        if not dry_run:
            for manifest in manifests:
                if manifest.data in item.checkpoints:
                    directory.delete(manifest.name.manifest)  # first: a manifest never outlives its data
                    directory.delete(manifest.data)
            for name in orphans:
                directory.delete(name)
            for rel in temps:
                _remove_file(sweep, posixpath.join(paths.dir, rel))
            for path in plan.leftovers + plan.remove:
                trainer.remove(path)  # type: ignore[union-attr]  (a plan has paths only with a trainer)
        if item.checkpoints or item.temp_files or item.damaged:
            report.runs.append(item)
    return report


def _remove_file(sweep: Sweep, path: str) -> None:
    """Remove a regular file, never what a symlink points at."""
    backend_for(sweep.store.fs).delete_file(path)
