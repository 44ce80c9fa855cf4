"""``tracker="wandb"``: one W&B run per sweeprun run, resumed by every attempt.

Its id is derived from the run id and the token of this life of the run (``sr-`` and 20 hex
digits of their hash; the token is in ``tracker.json``, made by the run's first start), so
every attempt, on any machine, resumes the same W&B run (``resume="allow"``), and a ``reset``
run starts a new one. W&B refuses a step lower than one it holds ("Step must
only increase"), so a resumed attempt passes over the steps the run holds: online, below the
step W&B resumed at; offline (``WANDB_MODE=offline``), those in the run's earlier offline
files, read back (:mod:`.wandb_files`). The project is the sweep's name (``WANDB_PROJECT``
overrides it); the files go into the run's folder when it is on local disk.

W&B's status comes from the process (the launcher cannot set it): finished (exit code 0) at the
run's end, failed (1) on an exception, and after a stop request marked preempting and ended
with 75, which W&B shows as preempted.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

from .. import settings
from ..runenv import PREEMPTED_EXIT
from ..store import backend_for
from ..store.layout import WANDB
from .record import life, remember
from .wandb_files import history, run_files

if TYPE_CHECKING:
    from ..store import RunPaths


def wandb_id(run_id: str, life: str) -> str:
    """The W&B run id of a life of a sweeprun run (:func:`~sweeprun.trackers.record.life`): the
    same on every attempt and every machine, a new one after a ``reset``."""
    return "sr-" + hashlib.sha256(f"{run_id}/{life}".encode()).hexdigest()[:20]


class WandbTracker:
    def __init__(self, paths: RunPaths, run_id: str, params: dict[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        self.paths, self.run_id, self.params = paths, run_id, params
        self.id: str | None = None
        self.project = os.environ.get("WANDB_PROJECT") or settings.SWEEP.get(os.environ) or "sweeprun"
        self.folder = os.environ.get("WANDB_DIR") or backend_for(paths.fs).native_path(paths.dir)
        self.run: Any = None
        self._held: dict[str, int] = {}    # per key: the last step W&B holds
        self._floor = -1                   # online: every step below where W&B resumed

    def open(self, resume_step: int) -> None:
        record = life(self.paths)
        self.id = wandb_id(self.run_id, record["life"])
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
        if offline and self.folder:
            for path in run_files(os.path.join(self.folder, WANDB), self.id):
                for step, values in history(path):
                    for key in values:
                        self._held[key] = max(step, self._held.get(key, -1))
        self.run = self._wandb.init(project=self.project, id=self.id, name=self.run_id, resume="allow",
                                    config=self.params, dir=self.folder)
        if not offline:
            self._floor = int(self.run.step) - 1
        if record.get("run") != self.id:
            remember(self.paths, record, kind="wandb", run=self.id, project=self.project)

    def log(self, step: int, values: dict[str, float]) -> None:
        fresh = {k: v for k, v in values.items() if step > max(self._floor, self._held.get(k, -1))}
        if fresh:
            self.run.log(fresh, step=step)
            for key in fresh:
                self._held[key] = step

    def flush(self) -> None:
        pass                                # W&B streams each line itself

    def close(self, status: str) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        if status == "KILLED":
            run.mark_preempting()
            run.finish(exit_code=PREEMPTED_EXIT)
        else:
            run.finish(exit_code=1 if status == "FAILED" else 0)
