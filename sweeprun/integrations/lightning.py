"""PyTorch Lightning: a callback that makes ``Trainer.fit`` a sweeprun run, resumable exactly.

Lightning resumes from ``ckpt_path`` but leaves out what makes a resumed run equal to
one never interrupted: the global RNG states (dropout, augmentations that draw from
``random`` or ``numpy``) and the position inside the epoch (it restarts the training
DataLoader, so a run killed mid-epoch trains batches twice). And it picks a checkpoint
by name (``last``), not by whether it is complete. :class:`SweeprunCallback` hands all
of that to sweeprun's own training API (:mod:`sweeprun.training.run`):

- Lightning's full checkpoint (module, optimizers, LR schedulers, loops, callbacks,
  precision plugin), the state of every stateful sampler of the training DataLoader
  (:class:`~sweeprun.training.ResumableSampler`) and the global RNGs go into one
  sweeprun checkpoint in the run directory, written by sweeprun's writer (atomic,
  verified, asynchronous, on its time or step cadence, last K plus best kept);
- :attr:`SweeprunCallback.ckpt_path` is the newest checkpoint that verifies, for
  ``trainer.fit(..., ckpt_path=...)``; Lightning reads it from memory through a
  wrapper around the strategy's CheckpointIO, so there is no second file format;
- the RNG states are put back right before the first batch is drawn, after
  Lightning's setup (sanity check, DataLoader iterator) has drawn from them;
- SIGTERM, SIGINT and the time budget (SWEEPRUN_TIME_LIMIT) save at the end of the
  current batch and exit with 75 (resumable); the end of ``fit`` is the run's
  :meth:`~sweeprun.training.run.Run.finish`;
- every training batch is one sweeprun step: its logged scalars go to metrics.jsonl.

``lightning`` is imported here only (``pip install 'sweeprun[lightning]'``); the older
``pytorch_lightning`` package name is used when ``lightning`` is not installed.
"""

from __future__ import annotations

import posixpath
import sys
import warnings
from collections.abc import Iterable
from typing import Any, Literal

from ..errors import CheckpointError, SweeprunError
from ..redact import redact
from ..runenv import PREEMPTED_EXIT
from ..training.run import Run, init
from ..training.state import capture_rng, restore_rng

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[no-redef]
        from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef]
    except ImportError:
        raise SweeprunError("sweeprun.integrations.lightning needs PyTorch Lightning: "
                            "pip install 'sweeprun[lightning]'") from None

__all__ = ["SweeprunCallback"]


class SweeprunCallback(Callback):
    """Add to ``Trainer(callbacks=[...])`` and pass :attr:`ckpt_path` to ``trainer.fit``.

    The arguments are :func:`sweeprun.training.init`'s: under ``sweeprun launch`` the
    run directory and parameters come from the environment, standalone from
    ``local_dir`` and ``params``. Create it before building the model: a script that
    picks its configuration from :attr:`params` gets the launcher's.

    For an exact resume the training DataLoader needs a sampler with a state, such as
    :class:`~sweeprun.training.ResumableSampler` (a plain ``shuffle=True`` loader cannot
    say where it was: a warning says so), ``num_workers=0`` or a stateful loader, and
    its own ``generator=`` (else creating its iterator draws from the global torch RNG
    once per epoch, at a different moment in a resumed run).
    """

    def __init__(self, params: dict[str, Any] | None = None, local_dir: str | None = None, *,
                 every_s: float | Literal["auto"] | None = None, every_steps: int | None = None,
                 keep_last: int = 3, best: str | None = None, mode: Literal["min", "max"] = "min",
                 time_limit_s: float | None = None, stop_signals: Iterable[int] = (),
                 async_save: bool | None = None, **init_options: Any) -> None:
        super().__init__()
        self.run: Run = init(params, local_dir, every_s=every_s, every_steps=every_steps,
                             keep_last=keep_last, best=best, mode=mode,
                             time_limit_s=time_limit_s, stop_signals=stop_signals,
                             async_save=async_save, **init_options)
        self.run.track(lightning=_TrainerState(self))
        self._trainer: Trainer | None = None
        self._restored = False            # run.restore() was called
        self._path: str | None = None     # the checkpoint Lightning is to resume from
        self._loaded: dict[str, Any] | None = None
        self._rng: Any = None             # the global RNG states at the restored step
        self._samplers: list[Any] = []
        self._io: _FromSweeprun | None = None
        self._pending: dict[str, Any] | None = None  # a step that ends after its validation
        self._val_keys: set[str] = set()             # metrics that validation logs
        self._train_keys: set[str] = set()           # and those training steps log

    @property
    def params(self) -> dict[str, Any]:
        """The run's parameters (the launcher's under ``sweeprun launch``)."""
        return self.run.params

    @property
    def ckpt_path(self) -> str | None:
        """The newest sweeprun checkpoint that verifies (a path for Lightning's log; the state
        itself is served from memory), or ``None`` for a fresh start."""
        self._restore()
        return self._path

    def _restore(self) -> None:
        if self._restored:
            return
        self._restored = True
        if not self.run.restore():
            return
        # the same choice restore() made: the newest manifest at the restored step
        chosen = [m for m in self.run.checkpoints() if m.step == self.run.step]
        name = chosen[-1].data if chosen else f"step {self.run.step}"
        self._path = posixpath.join(self.run.paths.checkpoints, name)
        if self.run.capture_rng:  # restore() put them back; they are re-applied at train start
            self._rng = capture_rng()

    # -- Lightning hooks ------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        if not self._restored:
            self._restore()
            if self._path is not None:
                raise CheckpointError(
                    f"{redact(self.run.dir)} has a checkpoint to resume from ({self._path}) but "
                    "trainer.fit() was not given it: pass ckpt_path=callback.ckpt_path")
        if self._path is not None:
            self._io = _FromSweeprun(trainer.strategy.checkpoint_io, self._path, self._take_loaded)
            trainer.strategy.checkpoint_io = self._io

    def _take_loaded(self) -> dict[str, Any]:
        assert self._loaded is not None  # set by run.restore() whenever _path is
        return self._loaded["trainer"]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._samplers = _stateful_samplers(trainer)
        if self._path is None:
            return
        if trainer.ckpt_path != self._path:
            raise CheckpointError(
                f"trainer.fit() resumed from {trainer.ckpt_path!r}, not from sweeprun's newest "
                f"verified checkpoint {self._path}: pass ckpt_path=callback.ckpt_path")
        saved = (self._loaded or {}).get("samplers") or []
        if len(saved) != len(self._samplers):
            raise CheckpointError(
                f"checkpoint {self._path} holds the position of {len(saved)} sampler(s), the "
                f"training DataLoader now has {len(self._samplers)} with a state: the data "
                "pipeline changed since the checkpoint; restore it, or start the run over")
        for sampler, state in zip(self._samplers, saved, strict=True):
            sampler.load_state_dict(state)
        if self._samplers:  # Lightning cannot see that the sampler, not the loader, resumes
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that "
                                    "ended before the epoch ended and your dataloader is not resumable")
        if self._rng is not None:
            # last: Lightning's setup (sanity check, the DataLoader's iterator) has drawn by now
            restore_rng(self._rng)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        metrics = {k: v for k, v in _scalars(trainer, outputs).items() if k not in self._val_keys}
        self._train_keys = set(metrics)
        if _validates_next(trainer):
            # Lightning resumes a checkpoint of the batch that validation follows as if that
            # validation had run (it skips it): so this step ends, and may save, after it.
            self._pending = metrics
            return
        self._end_step(trainer, metrics)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fresh = _scalars(trainer, None)
        self._val_keys.update(set(fresh) - self._train_keys)
        if self._pending is not None:
            self._end_step(trainer, {**self._pending, **{k: fresh[k] for k in self._val_keys
                                                          if k in fresh}})

    def _end_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._pending = None
        self.run.epoch = trainer.current_epoch
        self.run.end_step(**metrics)  # saves when due; on a stop: save and exit 75

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is not None:  # validation was due but did not run
            self._end_step(trainer, self._pending)
        if self.run.should_stop:  # a signal that came after the epoch's last batch
            self.run.finish()     # saves, then exits with 75 (resumable)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is not None:
            self._end_step(trainer, self._pending)
        self.run.epoch = trainer.current_epoch
        self.run.finish()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, SystemExit) and exception.code in (None, 0) and self.run.should_stop:
            # Lightning's own SIGTERMException (a SIGTERM during validation) exits 0, which
            # would read as "finished"; it is resumable from the last checkpoint.
            print("sweeprun: stopped by a signal outside a training batch; the last checkpoint "
                  f"resumes; exiting with {PREEMPTED_EXIT} (resumable)", file=sys.stderr, flush=True)
            exception.code = PREEMPTED_EXIT
        try:
            self.run.close()  # wait for a save in flight; the last checkpoint is what resumes
        except SweeprunError as error:
            print(f"sweeprun: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._io is not None and trainer.strategy.checkpoint_io is self._io:
            trainer.strategy.checkpoint_io = self._io.inner
        self._io = None


class _TrainerState:
    """What the run tracks: Lightning's own checkpoint, plus the samplers' positions."""

    def __init__(self, callback: SweeprunCallback) -> None:
        self.callback = callback

    def state_dict(self) -> dict[str, Any]:
        trainer = self.callback._trainer
        if trainer is None:
            raise CheckpointError("nothing to save before trainer.fit() has started")
        return {"trainer": trainer._checkpoint_connector.dump_checkpoint(weights_only=False),
                "samplers": [s.state_dict() for s in self.callback._samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.callback._loaded = state


class _FromSweeprun(CheckpointIO):
    """The strategy's CheckpointIO, except that the sweeprun checkpoint is read from memory."""

    def __init__(self, inner: CheckpointIO, path: str, take: Any) -> None:
        self.inner, self.path, self.take = inner, path, take

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if str(path) == self.path:
            return self.take()
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def _stateful_samplers(trainer: Trainer) -> list[Any]:
    """The samplers of the training DataLoaders that can say where they are; a warning for a
    loader that cannot (Lightning restarts it from its first batch on resume)."""
    from torch.utils.data import DataLoader

    loaders = trainer.fit_loop._combined_loader.flattened if trainer.fit_loop._combined_loader else []
    found: list[Any] = []
    for loader in loaders:
        if not isinstance(loader, DataLoader) or hasattr(loader, "state_dict"):
            continue  # Lightning saves a stateful loader's position itself
        candidates = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
        stateful = [s for s in dict.fromkeys(candidates) if s is not None
                    and hasattr(s, "state_dict") and hasattr(s, "load_state_dict")]
        if not stateful:
            print(f"sweeprun: warning: the training DataLoader's sampler "
                  f"({type(loader.sampler).__name__}) cannot say where it is in the epoch, so a "
                  "run resumed mid-epoch repeats or skips data; use "
                  "sampler=sweeprun.ResumableSampler(dataset, seed=...)", file=sys.stderr, flush=True)
        found.extend(stateful)
    return found


def _validates_next(trainer: Trainer) -> bool:
    """Whether Lightning runs validation right after this training batch (its own decision,
    taken with the same inputs as in ``_TrainingEpochLoop.on_advance_end``)."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None or loop._skip_next_val:
        return False
    return bool(loop._should_check_val_fx(fetcher))


def _scalars(trainer: Trainer, outputs: Any) -> dict[str, Any]:
    """The batch's logged scalars (``self.log(..., on_step=True)``) and its loss."""
    metrics: dict[str, Any] = {}
    for key, value in trainer.callback_metrics.items():
        if getattr(value, "numel", lambda: 1)() == 1:
            metrics[key] = value
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if "loss" not in metrics and loss is not None and getattr(loss, "numel", lambda: 0)() == 1:
        metrics["loss"] = loss
    metrics["epoch"] = trainer.current_epoch
    return metrics
