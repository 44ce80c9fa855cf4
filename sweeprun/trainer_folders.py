"""A Hugging Face Trainer run's checkpoint folders, as ``show`` and ``gc`` see them.

The Trainer keeps its state in ``<run>/trainer/checkpoint-<step>/`` folders that sweeprun
seals (:mod:`sweeprun.training.sealed`), not in sweeprun's own checkpoints. ``show``
lists them with whether each still verifies; ``gc`` keeps what a resume would take and the
Trainer's best. transformers is not imported: everything is read from the folders.

On local disk a folder is judged by :func:`.sealed.verify` (every file hashed). In a bucket
(:class:`BucketTrainer`) the folders come from the listing of the run's folder, the one
``status`` and ``gc`` already make, and a folder is judged by its seal and the sizes the
listing gives, as :mod:`.integrations.hf_store` uploads them (files, then the seal): only
the seals and the newest folder's ``trainer_state.json`` are read, never the weights. The
hashes are checked where the bytes are read anyway, when a resume downloads the folder.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec

from .errors import StoreError
from .store import confine, fsync_dir, listed_path, native_path, read_regular, remove, store_errors
from .store.layout import TEMP_PREFIX, TRAINER, parse_set_aside
from .training import sealed
from .training.checkpoints import CheckpointInfo

if TYPE_CHECKING:
    from .sweep import Sweep

#: What ``gc`` renames a folder to before deleting it, so that it is gone at once; one left
#: by a gc killed half-way is deleted by the next.
GC_PREFIX = TEMP_PREFIX + "gc-"


def trainer_dir(sweep: Sweep, run_id: str) -> str | None:
    """The run's Trainer folder, where there is one. The Trainer writes with plain file I/O,
    so a Trainer run lives on local disk; a run on another store has none. A symlinked
    folder is not followed: ``gc`` would delete what it points at."""
    fs = sweep.store.fs
    if native_path(fs, sweep.paths.run(run_id).dir) is None:
        return None
    path = os.path.join(confine(fs, sweep.paths.run(run_id).dir), TRAINER)
    return path if os.path.isdir(path) and not os.path.islink(path) else None


def trainer_checkpoints(folder: str) -> list[CheckpointInfo]:
    """Each ``checkpoint-<step>`` folder, oldest first, checked against its seal (the size
    and hash of every file), then those a resume set aside because they did not verify."""
    out = [_folder_info(path, f"{TRAINER}/{os.path.basename(path)}", step)
           for step, path in sorted(sealed.checkpoint_folders(folder))]
    aside = os.path.join(folder, sealed.REJECTED)
    try:
        names = sorted(os.listdir(aside)) if not os.path.islink(aside) else []
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        if (parsed := parse_set_aside(name)) and os.path.isdir(os.path.join(aside, name)):
            step, attempt = parsed
            info = _folder_info(os.path.join(aside, name), f"{TRAINER}/{sealed.REJECTED}/{name}", step)
            why = f"set aside by attempt {attempt}" + (f" ({info.problem})" if info.problem else "")
            out.append(CheckpointInfo(**{**info.__dict__, "verified": False, "problem": why}))
    return out


def _folder_info(path: str, rel: str, step: int) -> CheckpointInfo:
    record: dict[str, Any] | None = None
    try:
        record, problem = sealed.verify(path), None
    except (ValueError, RecursionError) as exc:  # RecursionError: a seal nested too deeply
        problem = str(exc) if isinstance(exc, ValueError) else "its seal is unreadable (nested too deeply)"
        try:
            record = sealed.read_seal(path)
        except (ValueError, RecursionError):
            pass
    files = record["files"] if record else {}
    size = (sum(int(f.get("size") or 0) for f in files.values() if isinstance(f, dict)) if files
            else _tree_size(path))
    created = record.get("created") if record else None
    if not (isinstance(created, (int, float)) and math.isfinite(created)):
        try:
            created = os.stat(os.path.join(path, sealed.SEAL) if record else path).st_mtime
        except OSError:
            created = 0.0
    attempt = record.get("attempt") if record else None
    return CheckpointInfo(data=rel, attempt=attempt if isinstance(attempt, int) else 0, step=step,
                          size=size, created=float(created), verified=problem is None,
                          problem=problem, metrics={})


def _tree_size(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@dataclass
class TrainerPlan:
    """What ``gc`` does in a done run's Trainer folder (absolute paths)."""

    keep: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    #: Folders that never sealed or do not verify, and ``.sweeprun-rejected/``: evidence of
    #: what went wrong, removed only when asked (``damaged=True``).
    damaged: list[str] = field(default_factory=list)
    #: Folders a killed gc renamed and did not finish deleting.
    leftovers: list[str] = field(default_factory=list)


def trainer_plan(folder: str, damaged: bool = False) -> TrainerPlan:
    """Keep the newest folder that verifies (what a resume would take) and the Trainer's
    best (``best_model_checkpoint`` in its ``trainer_state.json``), remove the older sealed
    folders (their seals are read, not their files hashed: they are going), and leave the
    rest unless ``damaged``."""
    plan = TrainerPlan()
    newest = sealed.newest_sealed(folder).chosen
    if newest is not None:
        plan.keep.append(newest.path)
        best = _trainer_best(folder, newest.path)
        if best is not None and best != newest.path:
            plan.keep.append(best)
    for step, path in sealed.checkpoint_folders(folder):
        if path in plan.keep or os.path.islink(path):
            continue  # a symlink is never followed into, nor removed
        if newest is not None and step < newest.step and _has_seal(path):
            plan.remove.append(path)
        else:
            (plan.remove if damaged else plan.damaged).append(path)
    aside = os.path.join(folder, sealed.REJECTED)
    if os.path.isdir(aside) and not os.path.islink(aside):
        (plan.remove if damaged else plan.damaged).append(aside)
    with os.scandir(folder) as entries:
        plan.leftovers = sorted(e.path for e in entries if e.name.startswith(GC_PREFIX)
                                and e.is_dir(follow_symlinks=False))
    return plan


def _has_seal(path: str) -> bool:
    try:
        sealed.read_seal(path)
    except (ValueError, RecursionError):
        return False
    return True


def _trainer_best(folder: str, newest: str) -> str | None:
    """The folder the Trainer names as its best (``load_best_model_at_end``), if it is one of
    this run's checkpoint folders."""
    try:
        with open(os.path.join(newest, "trainer_state.json"), "rb") as f:
            state = json.loads(f.read(1 << 24))
    except (OSError, ValueError, RecursionError):
        return None
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    if not isinstance(best, str) or sealed.step_of(os.path.basename(best.rstrip("/\\"))) is None:
        return None
    path = os.path.join(folder, os.path.basename(best.rstrip("/\\")))
    return path if os.path.isdir(path) and not os.path.islink(path) else None


def remove_tree(path: str) -> None:
    """Rename, then delete: the folder is gone at once, and a kill during the deletion leaves
    a ``GC_PREFIX`` folder that no reader takes for a checkpoint and the next gc removes."""
    parent, name = os.path.split(path)
    target = path if name.startswith(GC_PREFIX) else os.path.join(parent, f"{GC_PREFIX}{name}-{os.getpid()}")
    with store_errors("delete", path):
        if target != path:
            try:
                os.rename(path, target)
            except FileNotFoundError:
                return  # another gc took it
            fsync_dir(parent)
        shutil.rmtree(target, ignore_errors=False)


# -- in a bucket ----------------------------------------------------------------------------------

#: How much of a seal or ``trainer_state.json`` is read from a bucket (as :func:`.sealed.read_seal`).
_SMALL_FILE_BYTES = 1 << 24
#: What ``gc`` writes into a folder in a bucket before removing it (an object store cannot
#: rename a folder as :func:`remove_tree` does), and removes last: a folder that still has it
#: was half removed by a gc that was killed, and the next gc finishes it. A temp file's name:
#: never part of a seal.
GC_MARK = GC_PREFIX + "removing"


class BucketTrainer:
    """A run's ``trainer/`` folder in an object store, as :mod:`.integrations.hf_store` keeps
    it, judged from one listing: ``files`` maps each regular file's path inside ``trainer/``
    to its size. Paths handed out (:class:`TrainerPlan`) are store paths."""

    def __init__(self, fs: fsspec.AbstractFileSystem, remote: str, files: Mapping[str, int],
                 mtimes: Mapping[str, float] | None = None) -> None:
        self.fs = fs
        self.remote = remote.rstrip("/")
        self.mtimes = dict(mtimes or {})
        #: folder name -> {path inside it: size}, for ``checkpoint-<step>`` folders and for
        #: those set aside (``.sweeprun-rejected/<name>``).
        self.folders: dict[str, dict[str, int]] = {}
        self.aside: dict[str, dict[str, int]] = {}
        self.rejected_mark = f"{sealed.REJECTED}/{GC_MARK}" in files
        for rel, size in files.items():
            top, _, rest = rel.partition("/")
            if not rest:
                continue
            if top == sealed.REJECTED:
                name, _, inner = rest.partition("/")
                if inner:
                    self.aside.setdefault(name, {})[inner] = size
            elif sealed.step_of(top) is not None:
                self.folders.setdefault(top, {})[rest] = size
        self._judged: dict[str, tuple[dict[str, Any] | None, str | None]] = {}

    def rel(self, path: str) -> str:
        """A store path of this folder as a path inside the run's folder."""
        return f"{TRAINER}/{path[len(self.remote) + 1:]}"

    def _path(self, rel: str) -> str:
        return posixpath.join(self.remote, rel)

    def judge(self, rel: str, files: Mapping[str, int]) -> tuple[dict[str, Any] | None, str | None]:
        """``(seal, problem)`` of the folder at ``rel`` (inside ``trainer/``): the seal as
        written (``None`` when there is none to read) and what is wrong (``None``: it
        verifies as far as a listing can tell: every file its seal lists is there, with the
        size it was sealed with)."""
        if rel not in self._judged:
            self._judged[rel] = self._judge(rel, files)
        return self._judged[rel]

    def _judge(self, rel: str, files: Mapping[str, int]) -> tuple[dict[str, Any] | None, str | None]:
        if GC_MARK in files:
            return None, "half removed by a gc that was stopped; the next gc removes the rest"
        if sealed.SEAL not in files:
            return None, "it was never sealed in the store (the upload was cut short)"
        try:
            record = self._read_seal(rel)
        except ValueError as exc:
            return None, str(exc)
        for name, expected in sorted(record["files"].items()):
            try:
                sealed.inside("/folder", name)
            except ValueError as exc:
                return record, str(exc)
            if not isinstance(expected, dict):
                return record, f"its seal's entry for {name!r} is not one sweeprun writes"
            if name not in files:
                return record, f"{name} is missing"
            if files[name] != expected.get("size"):
                return record, (f"{name} is truncated or changed: {files[name]} bytes, "
                                f"sealed {expected.get('size')}")
        return record, None

    def _read_seal(self, rel: str) -> dict[str, Any]:
        """The seal, judged by :func:`.sealed.parse_seal` (one rule for what a seal is)."""
        try:
            blob = read_regular(self.fs, self._path(f"{rel}/{sealed.SEAL}"), _SMALL_FILE_BYTES)
        except StoreError as exc:
            raise ValueError(f"its seal is unreadable ({exc})") from None
        return sealed.parse_seal(blob)

    def _info(self, rel: str, files: Mapping[str, int], step: int) -> CheckpointInfo:
        record, problem = self.judge(rel, files)
        listed = record["files"] if record else {}
        size = (sum(int(f.get("size") or 0) for f in listed.values()
                    if isinstance(f, dict) and isinstance(f.get("size"), int)) if listed
                else sum(files.values()))
        created = record.get("created") if record else None
        if not (isinstance(created, (int, float)) and not isinstance(created, bool) and math.isfinite(created)):
            seal_time = self.mtimes.get(f"{rel}/{sealed.SEAL}")
            created = seal_time if seal_time is not None else max(
                (self.mtimes.get(f"{rel}/{name}", 0.0) for name in files), default=0.0)
        attempt = record.get("attempt") if record else None
        return CheckpointInfo(data=f"{TRAINER}/{rel}",
                              attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0,
                              step=step, size=size, created=float(created), verified=problem is None,
                              problem=problem, metrics={})

    def _steps(self) -> list[tuple[int, str]]:
        """``(step, name)`` of each ``checkpoint-<step>`` folder, newest first."""
        return sorted(((step, name) for name in self.folders
                       if (step := sealed.step_of(name)) is not None), reverse=True)

    def checkpoints(self) -> list[CheckpointInfo]:
        """As :func:`trainer_checkpoints`: each folder oldest first, then those set aside."""
        out = [self._info(name, self.folders[name], step) for step, name in reversed(self._steps())]
        for name in sorted(self.aside):
            if parsed := parse_set_aside(name):
                step, attempt = parsed
                rel = f"{sealed.REJECTED}/{name}"
                info = self._info(rel, self.aside[name], step)
                why = f"set aside by attempt {attempt}" + (f" ({info.problem})" if info.problem else "")
                out.append(CheckpointInfo(**{**info.__dict__, "verified": False, "problem": why}))
        return out

    def plan(self, damaged: bool = False) -> TrainerPlan:
        """As :func:`trainer_plan`: keep the newest folder that verifies and the Trainer's best,
        remove older sealed folders, leave the rest unless ``damaged``."""
        plan = TrainerPlan()
        newest = next(((step, name) for step, name in self._steps()
                       if self.judge(name, self.folders[name])[1] is None), None)
        if newest is not None:
            plan.keep.append(self._path(newest[1]))
            best = self._best(newest[1])
            if best is not None and best != newest[1]:
                plan.keep.append(self._path(best))
        for step, name in self._steps():
            path = self._path(name)
            if GC_MARK in self.folders[name]:
                plan.leftovers.append(path)
                continue
            if path in plan.keep:
                continue
            if newest is not None and step < newest[0] and self.judge(name, self.folders[name])[0] is not None:
                plan.remove.append(path)
            else:
                (plan.remove if damaged else plan.damaged).append(path)
        if self.rejected_mark:
            plan.leftovers.append(self._path(sealed.REJECTED))
        elif self.aside:
            (plan.remove if damaged else plan.damaged).append(self._path(sealed.REJECTED))
        return plan

    def _best(self, newest: str) -> str | None:
        """The folder the Trainer names as its best in the newest folder's ``trainer_state.json``."""
        if "trainer_state.json" not in self.folders.get(newest, {}):
            return None
        try:
            state = json.loads(read_regular(self.fs, self._path(f"{newest}/trainer_state.json"),
                                            _SMALL_FILE_BYTES))
        except (StoreError, ValueError, RecursionError):
            return None
        best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
        if not isinstance(best, str):
            return None
        name = posixpath.basename(best.replace("\\", "/").rstrip("/"))
        return name if name in self.folders else None

    def remove(self, path: str) -> None:
        """The mark, then the seal (as :mod:`.integrations.hf_store` removes a folder: one half
        removed is never taken for a checkpoint), then every other file, the mark last."""
        mark = posixpath.join(path, GC_MARK)
        with store_errors("delete", path):
            self.fs.pipe_file(mark, b"")
            try:
                self.fs.rm_file(posixpath.join(path, sealed.SEAL))
            except FileNotFoundError:
                pass
            try:
                rest = [p for p in self.fs.find(path) if posixpath.basename(str(p)) != GC_MARK]
            except FileNotFoundError:
                rest = []
            if rest:
                remove(self.fs, rest)  # literally: a store path may hold glob characters
            try:
                self.fs.rm_file(mark)
            except FileNotFoundError:
                pass


class LocalTrainer:
    """A run's ``trainer/`` folder on local disk, with :class:`BucketTrainer`'s interface."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def rel(self, path: str) -> str:
        return f"{TRAINER}/{os.path.relpath(path, self.folder)}"

    def checkpoints(self) -> list[CheckpointInfo]:
        return trainer_checkpoints(self.folder)

    def plan(self, damaged: bool = False) -> TrainerPlan:
        return trainer_plan(self.folder, damaged)

    def remove(self, path: str) -> None:
        remove_tree(path)


def run_trainer(sweep: Sweep, run_id: str, sizes: Mapping[str, int] | None = None,
                mtimes: Mapping[str, float] | None = None) -> LocalTrainer | BucketTrainer | None:
    """The run's Trainer folder on whichever store the sweep is, or ``None`` where it has none.

    In a bucket, ``sizes`` (and ``mtimes``) are the run's files (paths inside its folder) as
    the caller already listed them; without ``sizes``, the ``trainer/`` folder is listed once
    here, and only when ``mtimes`` (the run's listing) shows it has files."""
    fs = sweep.store.fs
    if native_path(fs, sweep.paths.run(run_id).dir) is not None:
        folder = trainer_dir(sweep, run_id)
        return LocalTrainer(folder) if folder is not None else None
    prefix = TRAINER + "/"
    remote = sweep.paths.run(run_id).trainer
    if sizes is None:
        if mtimes is not None and not any(rel.startswith(prefix) for rel in mtimes):
            return None
        with store_errors("list", remote):
            try:
                found = fs.find(remote, detail=True)
            except FileNotFoundError:
                found = {}
        top = listed_path(fs, remote).rstrip("/") + "/"
        sizes = {prefix + str(path)[len(top):]: int(info.get("size") or 0)
                 for path, info in found.items()
                 if info.get("type") == "file" and str(path).startswith(top)}
    inner = {rel[len(prefix):]: size for rel, size in sizes.items() if rel.startswith(prefix)}
    if not inner:
        return None
    times = {rel[len(prefix):]: t for rel, t in (mtimes or {}).items() if rel.startswith(prefix)}
    return BucketTrainer(fs, remote, inner, times)
