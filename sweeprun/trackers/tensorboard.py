"""``tracker="tensorboard"``: the run's event files in its own folder (``tensorboard/``).

Each attempt writes its own event file there, and it holds the run's whole history: the
writer opens with ``purge_step=0`` (TensorBoard then hides what earlier files hold) and is
given again every line the run's metrics keep up to the checkpoint it goes on from. So each
step shows once, the lost attempt's steps past the checkpoint are gone, and what it logged
but never flushed (TensorBoard writes every two minutes) is there all the same. The writer is torch's
``SummaryWriter`` (it needs the ``tensorboard`` package), which writes local files only: the
run's folder must be on this machine's disk (or NFS, a mounted Drive).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..store import backend_for

if TYPE_CHECKING:
    from ..store import RunPaths


class TensorBoardTracker:
    def __init__(self, paths: RunPaths) -> None:
        from torch.utils.tensorboard import SummaryWriter  # checked: tensorboard is installed

        folder = backend_for(paths.fs).native_path(paths.tensorboard)
        assert folder is not None                           # checked: on local disk
        self._make = SummaryWriter
        self.folder = folder
        self._writer: Any = None

    def open(self, resume_step: int) -> None:
        # what earlier attempts' files hold is hidden; the history up to resume_step comes again
        self._writer = self._make(log_dir=self.folder, purge_step=0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
