"""Sealed checkpoint folders: a framework's checkpoint folder made verifiable.

The Hugging Face Trainer writes ``checkpoint-<step>/`` in place, file by file, and
resumes from the highest number without looking inside, so a kill during a save leaves
a folder that looks like a checkpoint and is not one. Once a folder is complete, sweeprun
*seals* it: ``sweeprun-seal.json``, written atomically and last, lists the size and
SHA-256 of every file in it, and only a folder whose seal still verifies is a checkpoint.

Kept apart from the Trainer callback so that whatever reads a run directory (``status``,
``show``, ``gc``, ``verify``) can tell a good folder from a cut-short one without
importing transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..store import atomic_write, fsync_dir

# The names (the seal, the set-aside folder, checkpoint-<step>, the Trainer's folder) are the layout's.
from ..store.layout import REJECTED as REJECTED
from ..store.layout import SEAL as SEAL
from ..store.layout import TEMP_PREFIX, parse_checkpoint_folder
from ..store.layout import TRAINER as TRAINER_DIR

SEAL_FORMAT = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Sealed:
    """A checkpoint folder whose seal verified."""

    path: str
    step: int
    seal: dict[str, Any]


@dataclass
class Scan:
    """What :func:`newest_sealed` found in a Trainer's ``output_dir``."""

    chosen: Sealed | None = None
    #: Newer folders that do not verify, newest first: (path, "name (why)").
    rejected: list[tuple[str, str]] = field(default_factory=list)
    #: Some folder has a seal (so "none verifies" is damage, not a run that never saved).
    sealed_seen: bool = False


#: The step of a ``checkpoint-<step>`` folder name; ``None`` for any other name.
step_of = parse_checkpoint_folder


def _hash_file(path: str, sync: bool = True) -> tuple[int, str]:
    """Size and SHA-256 of a file, fsynced on the way when sealing: the seal must not
    outlive its data."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def _hash_all(paths: list[str], sync: bool = True) -> list[tuple[int, str]]:
    """:func:`_hash_file` of each, on a few threads: hashlib and reads release the GIL, and a
    Trainer folder is a few large files (weights, optimizer) that hash in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(paths)))) as pool:
        return list(pool.map(lambda path: _hash_file(path, sync), paths))


def _files(folder: str) -> list[str]:
    """Every regular file under ``folder`` as a relative posix path, the seal and temp files aside."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != SEAL and not name.startswith(TEMP_PREFIX):
                out.append(rel)
    return sorted(out)


def seal(folder: str, step: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder``'s seal: size and SHA-256 of every file in it, atomically and last."""
    import fsspec

    names = _files(folder)
    files = {rel: {"size": size, "sha256": sha}
             for rel, (size, sha) in zip(names, _hash_all([os.path.join(folder, n) for n in names]), strict=True)}
    for root, _, _ in os.walk(folder):
        fsync_dir(root)
    record = {"format": SEAL_FORMAT, "step": step, "files": files, **extra}
    atomic_write(fsspec.filesystem("file"), os.path.join(folder, SEAL),
                 (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return record


def read_seal(folder: str) -> dict[str, Any]:
    """``folder``'s seal as written, without checking the files; ValueError if there is
    none or it is not one sweeprun writes."""
    path = os.path.join(folder, SEAL)
    try:
        with open(path, "rb") as f:
            blob = f.read(1 << 24)
    except FileNotFoundError:
        raise ValueError("it was never sealed (the save was cut short)") from None
    except OSError as exc:
        raise ValueError(f"its seal is unreadable ({exc})") from None
    return parse_seal(blob)


def parse_seal(blob: bytes) -> dict[str, Any]:
    """A seal's bytes as :func:`read_seal` judges them, wherever they were read from (a
    bucket's folder is judged without a local copy); ValueError if not one sweeprun writes."""
    try:
        record = json.loads(blob)
    except ValueError as exc:
        raise ValueError(f"its seal is unreadable ({exc})") from None
    except RecursionError:  # a file anyone can write: nested past the parser's limit
        raise ValueError("its seal is unreadable (nested too deeply)") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or record.get("format") != SEAL_FORMAT or not files:
        raise ValueError("its seal is not one sweeprun writes")
    return record


def recorded_best(folder: str) -> str | None:
    """The name of the folder (``checkpoint-<step>``) that ``folder``'s ``trainer_state.json``
    names as the best model, or ``None``. The Trainer records an absolute path, valid only
    where the run directory was when it saved: the name is what holds everywhere."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), "rb") as f:
            best = json.loads(f.read(1 << 24)).get("best_model_checkpoint")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(best, str):
        return None
    return os.path.basename(best.rstrip("/" + os.sep)) or None


def inside(folder: str, rel: str) -> str:
    """``folder``/``rel``, which a seal lists; ValueError when it would lie outside ``folder``
    (a seal is a file anyone can edit, and it names what is read, hashed and downloaded)."""
    target = os.path.normpath(os.path.join(folder, rel))
    if os.path.isabs(rel) or not target.startswith(os.path.normpath(folder) + os.sep):
        raise ValueError(f"its seal names {rel!r}, outside the folder")
    return target


def verify(folder: str) -> dict[str, Any]:
    """The seal of ``folder`` once every file it lists is there with its size and hash;
    ValueError saying what is wrong otherwise."""
    record = read_seal(folder)
    listed = sorted(record["files"].items())
    for rel, expected in listed:
        target = inside(folder, rel)
        if not isinstance(expected, dict):
            raise ValueError(f"its seal's entry for {rel!r} is not one sweeprun writes")
        try:
            present = os.stat(target, follow_symlinks=False)
        except FileNotFoundError:
            raise ValueError(f"{rel} is missing") from None
        except OSError as exc:
            raise ValueError(f"{rel} is unreadable ({exc})") from None
        if present.st_size != expected.get("size"):  # cheap, before any hashing
            raise ValueError(f"{rel} is truncated or changed: {present.st_size} bytes, "
                             f"sealed {expected.get('size')}")
    try:
        hashed = _hash_all([os.path.join(folder, rel) for rel, _ in listed], sync=False)
    except OSError as exc:
        raise ValueError(f"a sealed file is unreadable ({exc})") from None
    for (rel, expected), (size, sha) in zip(listed, hashed, strict=True):
        if size != expected.get("size"):
            raise ValueError(f"{rel} is truncated or changed: {size} bytes, sealed {expected.get('size')}")
        if sha != expected.get("sha256"):
            raise ValueError(f"{rel} is corrupt: sha256 {sha[:12]}..., sealed {str(expected.get('sha256'))[:12]}...")
    return record


def checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder in ``output_dir``, newest first."""
    try:
        names = os.listdir(output_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(((s, os.path.join(output_dir, n)) for n in names if (s := step_of(n)) is not None),
                  reverse=True)


def newest_sealed(output_dir: str) -> Scan:
    """The newest folder of ``output_dir`` that verifies, and the newer ones that do not.

    Reads only: the Trainer callback sets the rejected folders aside before a resume,
    anything else (``show``, ``verify``) merely reports them.
    """
    scan = Scan()
    for step, path in checkpoint_folders(output_dir):
        scan.sealed_seen = scan.sealed_seen or os.path.exists(os.path.join(path, SEAL))
        try:
            record = verify(path)
        except ValueError as exc:
            scan.rejected.append((path, f"{os.path.basename(path)} ({exc})"))
            continue
        scan.chosen = Sealed(path, step, record)
        break
    return scan


def rotate(output_dir: str, keep: int | None, best: str | None, also: Collection[str] = ()) -> list[str]:
    """The Trainer's ``save_total_limit`` rule, applied once the newest folder is sealed.

    The Trainer rotates inside its save, before sweeprun seals the new folder: a kill in
    between leaves the new folder unsealed and the previous one already deleted, so the run
    resumes from an older folder still. Here the same rule runs after the seal: keep at most
    ``keep`` folders, never the newest nor ``best`` (by name: the run directory may have moved),
    the oldest removed first, each one's seal first so a folder half removed is never taken
    for a checkpoint. ``also``: more folder names never removed (what a loss-spike rollback may
    go back to). The paths removed.
    """
    if keep is None or keep <= 0:
        return []
    folders = sorted(checkpoint_folders(output_dir))           # oldest first
    if len(folders) <= keep:
        return []
    protected = {folders[-1][1], *(os.path.join(output_dir, name) for name in also)}
    if best:
        protected.add(os.path.join(output_dir, os.path.basename(best.rstrip("/" + os.sep))))
    remaining, removed = len(folders), []
    for _, path in folders:
        if remaining <= max(keep, len(protected)):
            break
        if path in protected:
            continue
        try:
            os.remove(os.path.join(path, SEAL))
        except FileNotFoundError:
            pass
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        remaining -= 1
    return removed


def sealed_names(fs: Any, run_dir: str) -> list[str]:
    """Names of the ``checkpoint-<step>`` folders in ``run_dir``'s Trainer folder that carry a
    seal, on any fsspec filesystem (a local disk, a bucket), from one listing and without
    verifying them: what the launcher counts as a run's progress, not what a resume trusts."""
    trainer = posixpath.join(run_dir, TRAINER_DIR)
    try:
        # find, not glob: a store path may hold glob characters ("out[1]") and mean them literally
        found = fs.find(trainer, maxdepth=2)
    except FileNotFoundError:
        return []
    names = {posixpath.basename(posixpath.dirname(str(path).rstrip("/"))) for path in found
             if posixpath.basename(str(path)) == SEAL}
    return sorted(name for name in names if step_of(name) is not None)
