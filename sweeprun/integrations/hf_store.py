"""The Trainer's checkpoint folders on an object store (``s3://``, ``gs://``...).

The Trainer writes its folders with plain file I/O, so on an object store it writes into
a local *staging* folder (under ``$SWEEPRUN_HOME``, keyed by the run) and sweeprun
mirrors each folder into ``<run dir>/trainer/checkpoint-<step>/`` once it is sealed:

- upload: any leftover of an earlier try at the same step is removed, then every file,
  then the seal LAST, so a folder cut short by a kill is never sealed in the store;
- resume: the store is the truth (the staging folder may be stale, or on another
  machine): the newest store folder with a seal is downloaded, only the files its seal
  lists, and verified after the download; one that does not verify is set aside in
  ``trainer/.sweeprun-rejected/`` in the store, as on local disk, and the next older one
  is tried; the folder of the best model (``load_best_model_at_end``) comes along, so the
  Trainer can reload it at the end;
- retention: the Trainer's ``save_total_limit`` (and its best checkpoint) applies in the
  store too: older folders are removed there, each one's seal first, so a folder
  half removed is never taken for a checkpoint.

Each operation is a few requests per folder (one listing, one request per file), not a
sync of the whole tree. transformers is not imported here.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CheckpointError
from ..faults import crash_point
from ..redact import redact_url
from ..store import RunPaths, remove, store_errors
from ..store.layout import checkpoint_folder, set_aside_name
from ..training.checkpoints import warn
from ..training.sealed import (
    REJECTED,
    SEAL,
    Sealed,
    checkpoint_folders,
    inside,
    read_seal,
    recorded_best,
    step_of,
    verify,
)

STAGING_DIR = "hf-staging"


def staging_root(paths: RunPaths, run_id: str | None, base: str | None = None) -> str:
    """The local folder that stands in for the run directory: one per run and store, so two
    runs (or the same run id in two stores) never share it, even under one ``base`` given
    by the script (a resume empties its staging folder first)."""
    key = hashlib.sha256(paths.url.encode()).hexdigest()[:12]
    name = f"{run_id or paths.run_id or 'run'}-{key}"
    if base is not None:
        return os.path.join(base, name)
    from ..ledger import state_home

    return os.path.join(state_home(), STAGING_DIR, name)


@dataclass
class Pulled:
    """What :meth:`StoreFolders.pull` found: the folder now in staging, and what it skipped."""

    chosen: Sealed | None = None
    rejected: list[str] = field(default_factory=list)   # "name (why)", newest first
    sealed_seen: bool = False


class StoreFolders:
    """``<run dir>/trainer`` in the store, mirrored from and into a local ``output_dir``."""

    def __init__(self, paths: RunPaths, output_dir: str, attempt: int) -> None:
        self.fs = paths.fs
        self.remote = paths.trainer
        self.output_dir = output_dir
        self.attempt = attempt  # the attempt that sets folders aside, in their new names
        self.url = redact_url(paths.fs.unstrip_protocol(self.remote))

    def _folders(self) -> dict[int, set[str]]:
        """``step -> relative paths of its files`` for every ``checkpoint-<step>`` in the store,
        from one recursive listing."""
        with store_errors("list", self.remote):
            try:
                found = self.fs.find(self.remote, detail=False)
            except FileNotFoundError:
                found = []
        folders: dict[int, set[str]] = {}
        prefix = self.remote.rstrip("/") + "/"
        for path in found:
            rel = str(path)[len(prefix):] if str(path).startswith(prefix) else None
            if rel is None or "/" not in rel:
                continue
            name, rest = rel.split("/", 1)
            step = step_of(name)
            if step is not None:
                folders.setdefault(step, set()).add(rest)
        return folders

    # -- resume -----------------------------------------------------------------------

    def release(self) -> None:
        """The run is done and every folder it needs is sealed in the store: its local copies
        go. A resume never reads them (:meth:`pull` empties the staging folder first), and on
        a notebook's disk one run's checkpoints after another would fill it in a long sweep."""
        for _, path in checkpoint_folders(self.output_dir):
            shutil.rmtree(path, ignore_errors=True)

    def pull(self) -> Pulled:
        """Empty the staging folder, then download the newest store folder whose seal verifies
        into it. Folders newer than that one which do not verify are set aside in the store,
        unless none verifies: then they stay, and a second try meets the same error."""
        shutil.rmtree(self.output_dir, ignore_errors=True)
        os.makedirs(self.output_dir, exist_ok=True)
        pulled = Pulled()
        rejected: list[str] = []
        folders = self._folders()
        for step, files in sorted(folders.items(), reverse=True):
            name = checkpoint_folder(step)
            local = os.path.join(self.output_dir, name)
            try:
                if SEAL not in files:
                    raise ValueError("it was never sealed in the store: the upload was cut short")
                pulled.sealed_seen = True
                self._download(name, local)
                record = verify(local)
            except ValueError as exc:
                shutil.rmtree(local, ignore_errors=True)
                pulled.rejected.append(f"{name} ({exc})")
                rejected.append(name)
                continue
            pulled.chosen = Sealed(local, step, record)
            break
        if pulled.chosen is None and pulled.sealed_seen:
            raise CheckpointError(f"no checkpoint folder in {self.url} verifies: "
                                  f"{'; '.join(pulled.rejected)}; delete the folder to start the run over")
        for name in rejected:
            self._set_aside(name)
        if pulled.chosen is not None:
            self._pull_best(pulled.chosen.path, folders)
        return pulled

    def _pull_best(self, chosen: str, folders: dict[int, set[str]]) -> None:
        """Download the best model's folder that ``chosen``'s trainer state names, if it is
        another one; a best folder that is gone or does not verify is warned about and left out
        (the Trainer then forgets its best model, as it does when the folder is missing)."""
        name = recorded_best(chosen)
        if name is None:
            return
        step = step_of(name)
        if step is None or name == os.path.basename(chosen):
            return
        local = os.path.join(self.output_dir, name)
        try:
            if SEAL not in folders.get(step, set()):
                raise ValueError("it is not sealed in the store")
            self._download(name, local)
            verify(local)
        except ValueError as exc:
            shutil.rmtree(local, ignore_errors=True)
            warn(f"the best model's folder {name} cannot be used ({exc}): the Trainer will not "
                 "reload the best model at the end")

    def _download(self, name: str, local: str) -> None:
        """The seal, then only the files it lists (a leftover of an earlier upload is not part
        of the folder). Staging is emptied before each pull, so a download cut short by a
        kill is never resumed from; :func:`.sealed.verify` checks the result."""
        remote = posixpath.join(self.remote, name)
        os.makedirs(local, exist_ok=True)
        with store_errors("download", remote):
            self.fs.get_file(posixpath.join(remote, SEAL), os.path.join(local, SEAL))
        for rel in sorted(read_seal(local)["files"]):
            target = inside(local, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with store_errors("download", posixpath.join(remote, rel)):
                try:
                    self.fs.get_file(posixpath.join(remote, rel), target)
                except FileNotFoundError:
                    raise ValueError(f"{rel} is missing") from None

    def _set_aside(self, name: str) -> None:
        """Moved, not deleted: a damaged folder may be all that is left of a run."""
        source = posixpath.join(self.remote, name)
        aside = posixpath.join(self.remote, REJECTED)
        with store_errors("move", source):
            n = 0
            while self.fs.exists(posixpath.join(aside, set_aside_name(name, self.attempt, n))):
                n += 1
            target = posixpath.join(aside, set_aside_name(name, self.attempt, n))
            for path in self.fs.find(source, detail=False):   # an object store has no rename
                self.fs.cp_file(path, target + str(path)[len(source.rstrip("/")):])
        self._remove(source)

    # -- upload and retention ---------------------------------------------------------

    def push(self, folder: str, fence: Callable[[], None]) -> None:
        """Upload a sealed local folder: a leftover at its name removed, every file, then
        (after ``fence``: the upload may have taken minutes) the seal."""
        name = os.path.basename(folder.rstrip(os.sep))
        remote = posixpath.join(self.remote, name)
        record = read_seal(folder)
        with store_errors("upload", remote):
            if self.fs.exists(remote):
                self._remove(remote)
            for n, rel in enumerate(sorted(record["files"])):
                if n == 1:
                    crash_point("checkpoint.mid_write")   # some files in the store, no seal
                self.fs.put_file(os.path.join(folder, rel), posixpath.join(remote, rel))
        fence()
        with store_errors("upload", remote):
            self.fs.put_file(os.path.join(folder, SEAL), posixpath.join(remote, SEAL))

    def retain(self, keep: int | None, best: str | None) -> list[str]:
        """Apply the Trainer's ``save_total_limit`` in the store: keep the newest ``keep``
        sealed folders and the best one (by name), remove older ones; the names removed."""
        if keep is None or keep <= 0:
            return []
        folders = self._folders()
        sealed = sorted((s for s, files in folders.items() if SEAL in files), reverse=True)
        if not sealed:
            return []
        kept = {checkpoint_folder(s) for s in sealed[:keep]}
        if best:
            kept.add(os.path.basename(best.rstrip("/" + os.sep)))
        oldest_kept = min(s for s in sealed[:keep])
        removed = []
        for step in sorted(folders):
            name = checkpoint_folder(step)
            if step < oldest_kept and name not in kept:
                self._remove(posixpath.join(self.remote, name))
                removed.append(name)
        return removed

    def _remove(self, remote: str) -> None:
        """The seal first: a folder half removed must not still look sealed."""
        with store_errors("remove", remote):
            try:
                self.fs.rm_file(posixpath.join(remote, SEAL))
            except FileNotFoundError:
                pass
            try:
                remove(self.fs, [remote], recursive=True)
            except FileNotFoundError:
                pass
