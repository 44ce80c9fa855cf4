"""What a Lightning resume needs besides Lightning's own checkpoint, and the ModelCheckpoint
files that must agree with the checkpoint that resumes.

Lightning leaves out of its checkpoint what it calls "metrics": the training epoch
loop's ResultCollection (the running sums behind every ``self.log(..., on_epoch=True)``),
the logger connector's callback metrics (what ReduceLROnPlateau, EarlyStopping and
ModelCheckpoint read) and ``trainer.should_stop``. A run resumed mid-epoch would average
its epoch metrics over the batches after the resume only, and a plateau scheduler would
step on a different value (Lightning skips that step outright after a mid-epoch resume,
for this very reason). :func:`capture` writes them as plain tensors, numbers and strings
(the checkpoint is read with ``torch.load(weights_only=True)``) and :func:`restore` builds
them back. Values logged as ``torchmetrics.Metric`` objects keep their state in the
metric, not here: they are left out, with a warning.

ModelCheckpoint writes and deletes its ``.ckpt`` files as training goes, outside any
sweeprun checkpoint: :class:`ModelCheckpointFiles` keeps the folder consistent with the
checkpoint that resumes (deletions wait until a checkpoint that no longer names the file
is durable; files that the restored state does not name were written by a lost attempt).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..training.checkpoints import warn_once

try:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer.connectors.logger_connector.result import (
        _Metadata,
        _ResultMetric,
        _Sync,
    )
except ImportError:  # pragma: no cover - the older package name
    from pytorch_lightning.callbacks import ModelCheckpoint  # type: ignore[no-redef]
    from pytorch_lightning.trainer.connectors.logger_connector.result import (  # type: ignore[no-redef]
        _Metadata,
        _ResultMetric,
        _Sync,
    )

#: The reductions ``self.log(reduce_fx=...)`` accepts for tensors, by a name a checkpoint can hold.
_REDUCTIONS: dict[str, Any] = {"mean": torch.mean, "max": torch.max, "min": torch.min, "sum": torch.sum,
                               "builtins.max": max, "builtins.min": min, "builtins.sum": sum}


def capture(trainer: Any) -> dict[str, Any]:
    """The metric state of the training loop and ``trainer.should_stop``, as plain data."""
    connector = trainer._logger_connector
    results = trainer.fit_loop.epoch_loop._results
    saved, skipped = [], []
    for key, metric in results.items():
        state = _metric_state(key, metric)
        (saved if state is not None else skipped).append(state if state is not None else key)
    if skipped:
        warn_once(f"the logged value(s) {', '.join(sorted(skipped))} (a "
                   "torchmetrics.Metric, a custom reduction or a process group) cannot be saved: "
                   "after a resume mid-epoch their epoch value covers only the batches since")
    return {"should_stop": bool(trainer.should_stop),
            "first_loop_iter": connector._first_loop_iter, "current_fx": connector._current_fx,
            "callback_metrics": _tensors(connector._callback_metrics),
            "logged_metrics": _tensors(connector._logged_metrics),
            "progress_bar_metrics": {k: v for k, v in connector._progress_bar_metrics.items()
                                     if isinstance(v, (int, float, torch.Tensor))},
            "results": saved}


def restore(trainer: Any, state: dict[str, Any]) -> None:
    """Put :func:`capture`'s state back, after Lightning's own restore and reset of its metrics."""
    trainer.should_stop = bool(state["should_stop"])
    connector = trainer._logger_connector
    connector._first_loop_iter = state["first_loop_iter"]
    connector._current_fx = state["current_fx"]
    connector._callback_metrics = dict(state["callback_metrics"])
    connector._logged_metrics = dict(state["logged_metrics"])
    connector._progress_bar_metrics = dict(state["progress_bar_metrics"])
    results = trainer.fit_loop.epoch_loop._results
    for saved in state["results"]:
        results[saved["key"]] = _metric(trainer, saved)


def _metric_state(key: str, metric: Any) -> dict[str, Any] | None:
    meta = metric.meta
    reduction = next((name for name, fn in _REDUCTIONS.items() if fn is meta.reduce_fx), None)
    if not metric.is_tensor or reduction is None or meta.sync.group is not None:
        return None
    return {"key": key, "fx": meta.fx, "name": meta.name, "prog_bar": meta.prog_bar,
            "logger": meta.logger, "on_step": meta.on_step, "on_epoch": meta.on_epoch,
            "reduce_fx": reduction, "enable_graph": meta.enable_graph,
            "add_dataloader_idx": meta.add_dataloader_idx, "dataloader_idx": meta.dataloader_idx,
            "metric_attribute": meta.metric_attribute, "sync": meta.sync.should,
            "rank_zero_only": meta.sync.rank_zero_only, "value": metric.value,
            "cumulated_batch_size": getattr(metric, "cumulated_batch_size", None),
            "forward_cache": metric._forward_cache, "has_reset": metric.has_reset,
            "update_count": metric._update_count}


def _metric(trainer: Any, saved: dict[str, Any]) -> Any:
    """A ResultMetric equal to the saved one, down to the metadata that ``self.log`` compares
    (a mismatch there makes Lightning refuse the next log call of that name)."""
    meta = _Metadata(fx=saved["fx"], name=saved["name"], prog_bar=saved["prog_bar"],
                     logger=saved["logger"], on_step=saved["on_step"], on_epoch=saved["on_epoch"],
                     reduce_fx=_REDUCTIONS[saved["reduce_fx"]], enable_graph=saved["enable_graph"],
                     add_dataloader_idx=saved["add_dataloader_idx"],
                     dataloader_idx=saved["dataloader_idx"], metric_attribute=saved["metric_attribute"])
    meta.sync = _Sync(_should=saved["sync"], fn=trainer.strategy.reduce, _group=None,
                      rank_zero_only=saved["rank_zero_only"])
    metric = _ResultMetric(meta, is_tensor=True)
    metric.value = saved["value"]
    if saved["cumulated_batch_size"] is not None:
        metric.cumulated_batch_size = saved["cumulated_batch_size"]
    metric._forward_cache = saved["forward_cache"]
    metric.has_reset = saved["has_reset"]
    metric._update_count = saved["update_count"]
    metric._computed = None
    return metric


def _tensors(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}


class ModelCheckpointFiles:
    """ModelCheckpoint's files in folders inside the run directory, kept in step with the
    sweeprun checkpoints: a file ModelCheckpoint deletes stays until a checkpoint written
    after the deletion is durable (until then the checkpoint that resumes still names it
    as a best model), and on resume the files that the restored ModelCheckpoint state does
    not name are removed (a lost attempt wrote them; left there they would also bump the
    version suffix of the names the resumed run writes). Folders outside the run
    directory are the user's and are never touched, nor is anything through a symlink."""

    def __init__(self, run_dir: str | None) -> None:
        # ModelCheckpoint keeps its folder as a realpath; the run directory is compared likewise
        self.run_dir = os.path.realpath(run_dir) if run_dir is not None else None
        self.pending: list[tuple[int, str]] = []   # (steps done when deleted, path)

    def inside(self, path: Any) -> bool:
        """Whether ``path`` lies in the run directory, with no symlink on the way."""
        if self.run_dir is None or path is None or "://" in str(path):
            return False
        full = os.path.abspath(os.fspath(path))
        if os.path.commonpath([full, self.run_dir]) != self.run_dir or full == self.run_dir:
            return False
        relative = os.path.relpath(full, self.run_dir).split(os.sep)
        here = self.run_dir
        for part in relative[:-1]:
            here = os.path.join(here, part)
            if os.path.islink(here):
                return False
        return True

    def defer(self, step: int, path: Any) -> None:
        self.pending.append((step, os.path.abspath(os.fspath(path))))

    def rewritten(self, path: Any) -> None:
        """A file written again under a name whose deletion waits: it is not to be deleted."""
        full = os.path.abspath(os.fspath(path))
        self.pending = [(s, p) for s, p in self.pending if p != full]

    def flush(self, durable_step: int) -> None:
        """Delete the files whose deletion came before the durable checkpoint at ``durable_step``."""
        keep = []
        for step, path in self.pending:
            if step < durable_step:
                _remove_file(path)
            else:
                keep.append((step, path))
        self.pending = keep

    def remove_strays(self, trainer: Any, restored: dict[str, Any] | None) -> list[str]:
        """Remove the checkpoint files that no restored ModelCheckpoint names; the paths removed.

        ``restored``: the callbacks' states in the checkpoint the run resumed from (``None``
        on a fresh start: then every file in the folder is a lost attempt's). A folder is
        pruned only when its callback's state was restored for that very folder: Lightning
        restores the list of kept files only then, and a run directory that moved (another
        mount) or a callback whose settings changed would otherwise lose every kept file."""
        named: dict[str, set[str]] = {}
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not self.inside(callback.dirpath):
                continue
            if restored is not None:
                saved = restored.get(callback.state_key)
                if not isinstance(saved, dict) or saved.get("dirpath") != callback.dirpath:
                    continue
            paths = {*callback.best_k_models, callback.best_model_path, callback.last_model_path,
                     callback.kth_best_model_path}
            folder = os.path.abspath(os.fspath(callback.dirpath))
            named.setdefault(folder, set()).update(os.path.abspath(p) for p in paths if p)
        removed = []
        for folder, keep in named.items():
            if not os.path.isdir(folder) or os.path.islink(folder):
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    path = os.path.abspath(entry.path)
                    if (entry.is_symlink() or not entry.is_file(follow_symlinks=False)
                            or not entry.name.endswith(ModelCheckpoint.FILE_EXTENSION) or path in keep):
                        continue
                    _remove_file(path)
                    removed.append(path)
        return removed


def _remove_file(path: str) -> None:
    try:
        if not os.path.islink(path):
            os.remove(path)
    except FileNotFoundError:
        pass
