"""A Hugging Face Trainer run's checkpoint folders, as ``show`` and ``gc`` see them.

The Trainer keeps its state in ``<run>/trainer/checkpoint-<step>/`` folders that sweeprun
seals (:mod:`sweeprun.integrations.sealed`), not in sweeprun's own checkpoints. ``show``
lists them with whether each still verifies; ``gc`` keeps what a resume would take and the
Trainer's best. transformers is not imported: everything is read from the folders.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .integrations import sealed
from .store import confine, fsync_dir, is_local, store_errors
from .training.checkpoints import TEMP_PREFIX, CheckpointInfo

if TYPE_CHECKING:
    from .sweep import Sweep

#: A Hugging Face Trainer run's ``output_dir`` inside its run folder, where it keeps its
#: sealed ``checkpoint-<step>/`` folders (see :mod:`sweeprun.integrations.sealed`).
TRAINER = "trainer"
#: What ``gc`` renames a folder to before deleting it, so that it is gone at once; one left
#: by a gc killed half-way is deleted by the next.
GC_PREFIX = TEMP_PREFIX + "gc-"
#: A folder a resume set aside: ``checkpoint-<step>-a<attempt>`` (``.<n>`` when repeated).
_SET_ASIDE = re.compile(r"^checkpoint-([0-9]+)-a([0-9]+)(?:\.[0-9]+)?$")


def trainer_dir(sweep: Sweep, run_id: str) -> str | None:
    """The run's Trainer folder, where there is one. The Trainer writes with plain file I/O,
    so a Trainer run lives on local disk; a run on another store has none. A symlinked
    folder is not followed: ``gc`` would delete what it points at."""
    fs = sweep.store.fs
    if not is_local(fs):
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
        if (match := _SET_ASIDE.match(name)) and os.path.isdir(os.path.join(aside, name)):
            info = _folder_info(os.path.join(aside, name), f"{TRAINER}/{sealed.REJECTED}/{name}",
                                int(match.group(1)))
            why = f"set aside by attempt {match.group(2)}" + (f" ({info.problem})" if info.problem else "")
            out.append(CheckpointInfo(**{**info.__dict__, "verified": False, "problem": why}))
    return out


def _folder_info(path: str, rel: str, step: int) -> CheckpointInfo:
    record: dict[str, Any] | None = None
    try:
        record, problem = sealed.verify(path), None
    except ValueError as exc:
        problem = str(exc)
        try:
            record = sealed.read_seal(path)
        except ValueError:
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
    except ValueError:
        return False
    return True


def _trainer_best(folder: str, newest: str) -> str | None:
    """The folder the Trainer names as its best (``load_best_model_at_end``), if it is one of
    this run's checkpoint folders."""
    try:
        with open(os.path.join(newest, "trainer_state.json"), "rb") as f:
            state = json.loads(f.read(1 << 24))
    except (OSError, ValueError):
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
