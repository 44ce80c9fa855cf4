"""Where a sweep's files live: :class:`SweepPaths` and :class:`RunPaths` (SPEC's layout),
the done index, and the one definition of a finished run."""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec

from ..errors import StoreError
from . import layout
from .backends import atomic_write, backend_for, create_only, read_json
from .base import json_bytes as _json_bytes
from .errors import _link_error, store_errors
from .local import (
    StoreFileSystem,
    _index_entry,
    _local_files,
    _regular_file,
    _suppress_missing,
    confine,
    fsync_dir,
    is_local,
)
from .object import _mtime


def is_done_entry(name: str, info: dict[str, Any]) -> bool:
    """The one definition of done: the run's ``DONE`` is there and is a regular file.

    ``name`` is the path relative to the run folder and ``info`` an fsspec listing entry.
    A folder, pipe or device called ``DONE`` is not a finished run: reading it as one
    would fail, or hang, later; nor is a link to a file, which every reader (the listing,
    the done index, :meth:`RunPaths.is_done`) sees without following it.
    """
    return name == layout.DONE and info.get("type") == "file"


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run's directory (SPEC's layout)."""

    fs: fsspec.AbstractFileSystem
    dir: str

    @property
    def url(self) -> str:
        """What the child gets as SWEEPRUN_RUN_DIR: a path for local disk, a URL otherwise."""
        return self.dir if is_local(self.fs) else self.fs.unstrip_protocol(self.dir)

    @property
    def run_id(self) -> str:
        """The run id, the folder's name (:meth:`SweepPaths.run` made it a safe segment)."""
        return posixpath.basename(self.dir.rstrip("/"))

    @property
    def params(self) -> str:
        return posixpath.join(self.dir, layout.PARAMS)

    @property
    def checkpoints(self) -> str:
        return posixpath.join(self.dir, layout.CHECKPOINTS)

    @property
    def metrics(self) -> str:
        """``metrics.jsonl``, appended in place: local disk only (see :meth:`metrics_part`)."""
        return posixpath.join(self.dir, layout.METRICS)

    @property
    def metrics_parts(self) -> str:
        return posixpath.join(self.dir, layout.METRICS_PARTS)

    def metrics_part(self, attempt: int) -> str:
        """``metrics/attempt-<n>.jsonl``: on object stores, the metrics as attempt ``n`` sees them.

        An object cannot be appended to, only rewritten, so a shared ``metrics.jsonl``
        would let a fenced-out attempt clobber the live one's lines. Each attempt
        writes only its own object (the entries it resumed from, then its own), and
        the newest attempt's object is the run's metrics.
        """
        return posixpath.join(self.metrics_parts, layout.metrics_part_name(attempt))

    def current_metrics(self) -> str | None:
        """The file holding the run's metrics as a reader should see them, or ``None``."""
        if is_local(self.fs):
            return self.metrics
        with store_errors("list", self.metrics_parts):
            try:
                found = self.fs.ls(self.metrics_parts, detail=True)
            except FileNotFoundError:
                return None
        parts = {posixpath.basename(str(e["name"]).rstrip("/")): str(e["name"])
                 for e in found if e.get("type") == "file"}
        newest = newest_metrics_part(parts)
        return parts[newest] if newest else None

    @property
    def logs(self) -> str:
        return posixpath.join(self.dir, layout.LOGS)

    def log(self, attempt: int) -> str:
        return posixpath.join(self.logs, layout.log_name(attempt))

    @property
    def done(self) -> str:
        return posixpath.join(self.dir, layout.DONE)

    @property
    def attempts(self) -> str:
        """``attempts/``: the durable record of every start of the run (the ledger may be rebuilt)."""
        return posixpath.join(self.dir, layout.ATTEMPTS)

    @property
    def lease(self) -> str:
        """``lease/``: the run's store lease (:mod:`sweeprun.leases`)."""
        return posixpath.join(self.dir, layout.LEASE)

    @property
    def trainer(self) -> str:
        """``trainer/``: a Hugging Face Trainer's sealed ``checkpoint-<step>/`` folders."""
        return posixpath.join(self.dir, layout.TRAINER)

    def attempt_record(self, attempt: int) -> str:
        """``attempts/<n>.json``: written create-only by the launcher when it starts attempt ``n``."""
        return posixpath.join(self.attempts, layout.attempt_record_name(attempt, "json"))

    def api_started(self, attempt: int) -> str:
        """``attempts/<n>.started``: written by ``sweeprun.init()`` under the launcher.

        Its presence says the script uses the training API, so exit 0 alone does not make
        the run done: :meth:`api_finished` must exist too.
        """
        return posixpath.join(self.attempts, layout.attempt_record_name(attempt, "started"))

    def api_finished(self, attempt: int) -> str:
        """``attempts/<n>.finished``: written by ``Run.finish()`` after the final checkpoint."""
        return posixpath.join(self.attempts, layout.attempt_record_name(attempt, "finished"))

    def write_marker(self, path: str, attempt: int, step: int, **extra: Any) -> None:
        """``attempts/<n>.started``, ``.finished``, ``.diverged``, ``.oom``: what the training API
        tells the launcher of attempt ``n`` (a multi-rank run's ``.started`` also has its
        ``world_size``), written atomically."""
        record = {"attempt": attempt, "step": step, **extra}
        atomic_write(self.fs, path, (json.dumps(record) + "\n").encode())

    def api_diverged(self, attempt: int) -> str:
        """``attempts/<n>.diverged``: attempt ``n`` met a loss spike past its rollbacks' cap."""
        return posixpath.join(self.attempts, layout.attempt_record_name(attempt, "diverged"))

    def api_oom(self, attempt: int) -> str:
        """``attempts/<n>.oom``: attempt ``n`` ran out of accelerator memory (its step inside)."""
        return posixpath.join(self.attempts, layout.attempt_record_name(attempt, "oom"))

    @property
    def tracker(self) -> str:
        """``tracker.json``: the tracker run this run logs to, for its whole life (:mod:`sweeprun.trackers`)."""
        return posixpath.join(self.dir, layout.TRACKER)

    @property
    def tensorboard(self) -> str:
        """``tensorboard/``: the run's TensorBoard event files."""
        return posixpath.join(self.dir, layout.TENSORBOARD)

    @property
    def rollbacks(self) -> str:
        """``rollbacks/``: the run's loss-spike rollbacks (:mod:`sweeprun.rollbacks`)."""
        return posixpath.join(self.dir, layout.ROLLBACKS)

    def rollback(self, number: int) -> str:
        return posixpath.join(self.rollbacks, layout.rollback_name(number))

    def rollback_data(self, number: int, rank: int) -> str:
        return posixpath.join(self.rollbacks, layout.rollback_data_name(number, rank))

    def is_done(self) -> bool:
        """Is the run's ``DONE`` a regular file (:func:`is_done_entry`)? From one listing of the
        run folder by the store, which never follows a link (as ``done_ids`` and
        :meth:`SweepPaths.listing` do not): fsspec's own ``info`` would, and a linked ``DONE``
        would be done here and nowhere else."""
        return backend_for(self.fs).entries(self.dir).get(layout.DONE) is True

    @property
    def done_entry(self) -> str:
        """``<sweep>/done/<run id>``: the run's entry in the sweep's done index."""
        runs = posixpath.dirname(self.dir.rstrip("/"))
        return posixpath.join(posixpath.dirname(runs), layout.DONE_INDEX, self.run_id)

    def write_done(self, summary: dict[str, Any]) -> bool:
        """Mark the run finished; ``False`` when it already was (not an error: it is done).

        Written last (everything it summarises is already durable) and create-only, so
        a stale worker can never replace the live attempt's ``DONE``. An entry in the
        done index follows (see :meth:`SweepPaths.done_ids`); a crash between the two
        leaves a run that is done but unindexed, which the per-run check before every
        start still finds.
        """
        summary = {"finished_at": time.time(), **summary}
        wrote = create_only(self.fs, self.done, _json_bytes(summary))
        try:
            self.index_done(summary["finished_at"])
        except StoreError:
            pass  # only a hint: the check before every start finds DONE and adds the entry
        return wrote

    def index_done(self, finished_at: float | None = None) -> None:
        """Add the run to the done index. Also how a run found done without an entry (a
        crash between the two writes) gets one.

        Only the entry's name counts, and only while the run's ``DONE`` is there: on
        local disk its content is not fsynced, only its folder (the name must outlive a
        power loss, or a run the ledger has as done would be looked up on every launch).
        """
        data = _json_bytes({"finished_at": finished_at or time.time()})
        if not is_local(self.fs):
            create_only(self.fs, self.done_entry, data)
            return
        with store_errors("write", self.done_entry):
            entry = confine(self.fs, self.done_entry)
            _index_entry(entry, data)
            fsync_dir(os.path.dirname(entry))

    def read_done(self) -> dict[str, Any] | None:
        try:
            return read_json(self.fs, self.done)
        except (StoreError, ValueError, FileNotFoundError):
            return None


@dataclass(frozen=True)
class SweepPaths:
    """The sweep's folder: ``<store>/<sweep name>/`` with ``sweep.yaml`` and ``runs/``."""

    fs: fsspec.AbstractFileSystem
    dir: str

    @property
    def spec(self) -> str:
        return posixpath.join(self.dir, layout.SPEC)

    @property
    def runs(self) -> str:
        return posixpath.join(self.dir, layout.RUNS)

    @property
    def identity(self) -> str:
        """``ID``: the sweep's id, created once (see :meth:`sweeprun.sweep.Sweep.ledger_key`)."""
        return posixpath.join(self.dir, layout.SWEEP_ID)

    @property
    def coordination(self) -> str:
        """``COORDINATION``: how the sweep's workers are kept apart (:mod:`sweeprun.fleet`)."""
        return posixpath.join(self.dir, layout.COORDINATION)

    @property
    def stop(self) -> str:
        """``STOP``: the latest request that the sweep's workers stop (:mod:`sweeprun.fleet`)."""
        return posixpath.join(self.dir, layout.STOP)

    @property
    def resets(self) -> str:
        """``resets/``: one marker per run ``sweeprun reset`` made run again (:func:`.layout.reset_marker`)."""
        return posixpath.join(self.dir, layout.RESETS)

    def reset_marker(self, run_id: str, token: str) -> str:
        return posixpath.join(self.resets, layout.reset_marker(run_id, token))

    @property
    def slurm_logs(self) -> str:
        """``slurm/``: the output of the sweep's SLURM tasks (:mod:`sweeprun.slurm`)."""
        return posixpath.join(self.dir, layout.SLURM_LOGS)

    @property
    def slurm_record(self) -> str:
        """``SLURM``: the jobs submitted for the sweep (:mod:`sweeprun.slurm`)."""
        return posixpath.join(self.dir, layout.SLURM_RECORD)

    @property
    def slurm_submitting(self) -> str:
        """``SLURM.submitting``: held by whoever submits the sweep's SLURM jobs right now."""
        return posixpath.join(self.dir, layout.SLURM_SUBMITTING)

    @property
    def report(self) -> str:
        """``report.html``: the page ``sweeprun report`` writes (:mod:`sweeprun.report`)."""
        return posixpath.join(self.dir, layout.REPORT)

    @property
    def trash(self) -> str:
        """``trash/``: where ``reset`` moves run folders (:func:`.layout.trash_name`)."""
        return posixpath.join(self.dir, layout.TRASH)

    def check_no_links(self) -> None:
        """Refuse, before anything is written, a sweep folder that is a link or holds one at its
        top (``done/``, ``runs/``, ``resets/``, ...): each write there would go through it. Deeper
        links (a run's ``logs/``) are refused by :func:`confine` when the run is touched."""
        if not isinstance(self.fs, StoreFileSystem):
            return
        with store_errors("list", self.dir):
            folder = confine(self.fs, self.dir)
            try:
                with os.scandir(folder) as entries:
                    links = sorted(e.path for e in entries if e.is_symlink())
            except (FileNotFoundError, NotADirectoryError):
                return
        if links:
            raise _link_error(links[0])

    def run(self, run_id: str) -> RunPaths:
        if not layout.is_run_id(run_id):
            raise StoreError(f"run id {run_id!r} is not a safe path segment")
        return RunPaths(self.fs, posixpath.join(self.runs, run_id))

    @property
    def done_index(self) -> str:
        """``done/``: one entry per finished run, beside ``runs/``."""
        return posixpath.join(self.dir, layout.DONE_INDEX)

    @property
    def done_index_complete(self) -> str:
        """``done/.complete``: says that every run done before it was written has an entry.

        Sweeps from before local disk had a done index have none; their first launch
        indexes them (:meth:`done_ids`). No run id starts with a dot.
        """
        return posixpath.join(self.done_index, layout.DONE_INDEX_COMPLETE)

    def done_ids(self, listing: dict[str, dict[str, float]] | None = None, *,
                 prune_stale: bool = False) -> set[str]:
        """Ids of finished runs (:func:`is_done_entry`).

        Given the result of :meth:`listing`, it costs no I/O at all, so a caller that
        lists anyway (status) uses the same definition for free. Otherwise the done
        index is read: a glob would look into every run folder (10,000 folder reads and
        50,000 stats for 10,000 runs on local disk; a LIST of every checkpoint and log on
        object stores). It costs two listings: one directory pass each on local disk,
        one LIST request per 1,000 runs each on object stores. The store stays the
        truth: an entry counts only while its run's folder exists, since deleting a
        run's folder is how a user asks for a re-run. ``prune_stale`` (for launchers,
        which write anyway) deletes such orphaned entries, before the re-run can
        recreate the folder; the folders are listed before the index so that a launcher
        pruning meanwhile cannot make a re-run look done. A run done but not indexed
        (a crash between ``DONE`` and its entry) is found by the check before every start.

        On local disk, a sweep whose index was never completed (written by an older
        sweeprun) is globbed as before; a launcher (``prune_stale``) then indexes it, once.
        """
        if listing is not None:
            return {run_id for run_id, files in listing.items() if layout.DONE in files}
        if is_local(self.fs) and not self._exists(self.done_index_complete):
            return self._index_old_sweep(prune_stale)
        present = self.run_ids()
        indexed = {name for name in self._names(self.done_index, files_only=True)
                   if layout.is_done_index_entry(name)}
        if is_local(self.fs):
            # A stat per indexed run (milliseconds for 10,000): a DONE deleted by hand is
            # a re-run here as it is in `status`, which sees the DONE files themselves.
            runs = confine(self.fs, self.runs)
            present = {run_id for run_id in present & indexed
                       if _regular_file(os.path.join(runs, run_id, layout.DONE))}
        if prune_stale:
            # Listed again after the index: a run started and finished between the two
            # listings has a folder now, and its fresh entry must stay.
            stale = indexed - present
            if stale and not is_local(self.fs):
                stale -= self.run_ids()
            for run_id in stale:
                with store_errors("delete", self.done_index), _suppress_missing():
                    self.fs.rm_file(posixpath.join(self.done_index, run_id))
        return indexed & present


    def _index_old_sweep(self, write: bool) -> set[str]:
        """Done runs of a local sweep without a complete index, by one listing of ``runs/``
        and a look at each run's DONE; ``write``: give each an entry, then mark the index
        complete."""
        with store_errors("list", self.runs):
            runs = confine(self.fs, self.runs)
            done = {run_id for run_id in self.run_ids()
                    if _regular_file(os.path.join(runs, run_id, layout.DONE))}
        if write:
            with store_errors("write", self.done_index):
                folder = confine(self.fs, self.done_index)
                for run_id in done:
                    _index_entry(os.path.join(folder, run_id), b"{}")
                os.makedirs(folder, exist_ok=True)
                fsync_dir(folder)
            create_only(self.fs, self.done_index_complete, b"")
        return done

    def _exists(self, path: str) -> bool:
        with store_errors("read", path):
            return bool(self.fs.exists(confine(self.fs, path)))

    def run_ids(self) -> set[str]:
        """Ids of the runs that have a folder in the store (one listing of ``runs/``)."""
        return self._names(self.runs)

    def _names(self, folder: str, files_only: bool = False) -> set[str]:
        with store_errors("list", folder):
            try:
                if is_local(self.fs):
                    # os.scandir, not fs.ls: ls stats every entry, scandir reads only names and types
                    with os.scandir(confine(self.fs, folder)) as entries:
                        return {e.name for e in entries if not e.is_symlink()
                                and (not files_only or e.is_file(follow_symlinks=False))}
                found = self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return set()
        return {posixpath.basename(str(e["name"]).rstrip("/")) for e in found
                if not files_only or e.get("type") == "file"}

    def listing(self, only: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
        """``run id -> {relative path: mtime}`` for every regular file of the sweep, from one listing.

        Only regular files are listed (see :func:`is_done_entry`): ``"DONE" in
        listing[run_id]`` means the run is done, and a named pipe called
        ``metrics.jsonl`` never reaches a reader. ``only``: just these runs' folders, one
        listing each (what ``status`` needs of a big sweep whose most runs are done).
        """
        out: dict[str, dict[str, float]] = {}
        prefix = self.runs.rstrip("/") + "/"
        with store_errors("list", self.runs):
            if is_local(self.fs):
                tops = [self.runs] if only is None else [prefix + run_id for run_id in only]
                for top in tops:
                    for path, mtime in _local_files(confine(self.fs, top)):
                        run_id, _, inner = path[len(prefix):].partition("/")
                        out.setdefault(run_id, {})[inner] = mtime
                return out
            if not self.fs.exists(self.runs):
                return out
            if only is None:
                found = self.fs.find(self.runs, detail=True)
            else:
                found = {}
                for run_id in only:
                    found.update(self.fs.find(posixpath.join(self.runs, run_id), detail=True))
        for path, info in found.items():
            if info.get("type") != "file":
                continue
            rel = path[len(prefix):] if path.startswith(prefix) else path
            run_id, _, inner = rel.partition("/")
            out.setdefault(run_id, {})[inner] = _mtime(info)
        return out


def newest_metrics_part(names: Iterable[str]) -> str | None:
    """The name among ``metrics/`` entries that belongs to the highest attempt."""
    numbered = [(n, name) for name in names if (n := layout.parse_metrics_part(name)) is not None]
    return max(numbered)[1] if numbered else None
