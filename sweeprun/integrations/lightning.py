"""PyTorch Lightning: a callback that makes ``Trainer.fit`` a sweeprun run, resumable exactly.

Lightning resumes from ``ckpt_path`` but leaves out what makes a resumed run equal to
one never interrupted: the global RNG states (dropout, augmentations that draw from
``random`` or ``numpy``), the position inside the epoch (it restarts the training
DataLoader, so a run killed mid-epoch trains batches twice), the running sums of the
epoch-level logged metrics and what callbacks monitor. And it picks a checkpoint by
name (``last``), not by whether it is complete. :class:`SweeprunCallback` hands all of
that to sweeprun's own training API (:mod:`sweeprun.training.run`):

- Lightning's full checkpoint (module, optimizers, LR schedulers, loops, callbacks,
  precision plugin), the state of every stateful sampler of the training DataLoader
  (:class:`~sweeprun.training.ResumableSampler`), the logged metrics
  (:mod:`._lightning_state`) and the global RNGs go into one sweeprun checkpoint in the
  run directory, written by sweeprun's writer (atomic, verified, asynchronous, on its
  time or step cadence, last K plus best kept);
- :attr:`SweeprunCallback.ckpt_path` is the newest checkpoint that verifies, for
  ``trainer.fit(..., ckpt_path=...)``; Lightning reads it from memory through a
  wrapper around the strategy's CheckpointIO, so there is no second file format;
- one sweeprun step is one optimizer step (``trainer.global_step`` advanced): under
  gradient accumulation nothing is saved between the batches of one step;
- SIGTERM, SIGINT and the time budget (SWEEPRUN_TIME_LIMIT) save at the end of the
  current step and exit with 75 (resumable); Lightning's own SIGTERM handling, which
  stops between batches without saving, is switched off for the fit; the end of ``fit``
  is the run's :meth:`~sweeprun.training.run.Run.finish`, also when a relaunch finds
  the fit already done.

Where a step ends is chosen so that Lightning's own resume logic continues exactly:
after the batch's whole loop iteration (its validation, plateau scheduler, counters);
when validation follows the batch, right after that validation, which is the point
Lightning resumes "as if it had run"; and for an epoch's last step, after the epoch's
end (``on_train_epoch_end`` hooks, ReduceLROnPlateau, epoch metrics), which Lightning
would skip when resuming a checkpoint of the epoch's last batch. There are no hooks at
those points, so the callback wraps three loop methods of its own Trainer for the fit.

Under ``strategy="ddp"`` on several ranks (torchrun, ``nproc:``) the callback initialises
the process group when it is made (Lightning would only inside ``fit``), so every rank is
one rank of the run from the start; each rank's part of the sharded checkpoint holds
Lightning's checkpoint with that rank's RNG states and sampler position, and the saves and
stops are agreed at each step (:mod:`sweeprun.training.ranks`).

``lightning`` is imported here only (``pip install 'sweeprun[lightning]'``); the older
``pytorch_lightning`` package name is used when ``lightning`` is not installed.
"""

from __future__ import annotations

import posixpath
import signal
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

from ..errors import CheckpointError, SweeprunError
from ..redact import redact
from ..runenv import PREEMPTED_EXIT
from ..store import native_path
from ..training.checkpoints import say, warn, warn_once
from ..training.ranks import join_from_env
from ..training.run import Run
from ..training.sampler import ResumableSampler
from ..training.spikes import Positions
from ..training.start import init
from ..training.state import capture_rng, restore_rng

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.loops.loop import _Loop
    from lightning.pytorch.utilities.exceptions import SIGTERMException
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[no-redef]
        from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef]
        from pytorch_lightning.loops.loop import _Loop  # type: ignore[no-redef]
        from pytorch_lightning.utilities.exceptions import SIGTERMException  # type: ignore[no-redef]
    except ImportError:
        raise SweeprunError("sweeprun.integrations.lightning needs PyTorch Lightning: "
                            "pip install 'sweeprun[lightning]'") from None

from . import _lightning_state

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

    metrics.jsonl gets one entry per optimizer step: the step-level values logged with
    ``self.log`` (under gradient accumulation, their mean over the step's batches) and
    the loss; the entry of a step that validation follows also holds the validation's
    values, and the entry of an epoch's last step the epoch-level values
    (``self.log(..., on_epoch=True)``, e.g. ``train_loss_epoch``).

    A ModelCheckpoint whose ``dirpath`` lies inside the run directory is kept in step with
    the run's checkpoints: on resume its folder holds exactly the files that the restored
    state names (see :class:`._lightning_state.ModelCheckpointFiles`).
    """

    def __init__(self, params: dict[str, Any] | None = None, local_dir: str | None = None, *,
                 every_s: float | Literal["auto"] | None = None, every_steps: int | None = None,
                 keep_last: int = 3, best: str | None = None, mode: Literal["min", "max"] = "min",
                 time_limit_s: float | None = None, stop_signals: Iterable[int] = (),
                 async_save: bool | None = None, **init_options: Any) -> None:
        super().__init__()
        join_from_env()  # Lightning's DDP strategy makes the group only inside fit()
        self.run: Run = init(params, local_dir, every_s=every_s, every_steps=every_steps,
                             keep_last=keep_last, best=best, mode=mode,
                             time_limit_s=time_limit_s, stop_signals=stop_signals,
                             async_save=async_save, **init_options)
        self.run.steps_follow_data = False    # Lightning counts its own steps (a rollback keeps them)
        self.run.track(lightning=_TrainerState(self))
        self._files = _lightning_state.ModelCheckpointFiles(native_path(self.run.paths.fs, self.run.paths.dir))
        self._trainer: Trainer | None = None
        self._restored = False            # run.restore() was called
        self._path: str | None = None     # the checkpoint Lightning is to resume from
        self._loaded: dict[str, Any] | None = None
        self._rng: Any = None             # the global RNG states at the restored step
        self._samplers: list[Any] = []
        self._io: _FromSweeprun | None = None
        self._wrapped: list[tuple[Any, str]] = []
        self._started = False             # on_train_start ran in this fit
        self._finished = False            # run.finish() was called
        self._flushed_at: int | None = None  # the save after which deferred deletions were last let go
        # the step in progress: its batches' metrics, whether the optimizer stepped, and
        # what validation or the epoch's end logged since the last step ended
        self._global_step: int | None = None
        self._batches: list[dict[str, Any]] = []
        self._stepped = False
        self._step_epoch = 0
        self._carry: dict[str, Any] = {}
        self._boundary = "batch"          # where the step being saved ended
        self._pace = Positions()          # the samplers' indices per step (a rollback's skip=)

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
        if trainer.world_size > 1 and type(trainer.strategy).__name__ != "DDPStrategy":
            warn_once(f"Lightning's {type(trainer.strategy).__name__} on {trainer.world_size} ranks: "
                      "sweeprun's exact resume is shown for strategy='ddp' only (each rank saves "
                      "Lightning's whole checkpoint with its own RNG states and data position)")
        if not self._restored:
            self._restore()
            if self._path is not None:
                raise CheckpointError(
                    f"{redact(self.run.dir)} has a checkpoint to resume from ({self._path}) but "
                    "trainer.fit() was not given it: pass ckpt_path=callback.ckpt_path")
        self._io = _FromSweeprun(trainer.strategy.checkpoint_io, self._path, self._take_loaded, self)
        trainer.strategy.checkpoint_io = self._io
        if self._path is not None:
            # the run never sanity-checks mid-training; Lightning itself skips it when restarting
            trainer.num_sanity_val_steps = 0
        loop = trainer.fit_loop
        self._wrap(loop.epoch_loop, "on_advance_end", self._after_batch, at_sigterm=True)
        self._wrap(loop.epoch_loop.val_loop, "run", self._after_validation,
                   before=self._before_validation)
        self._wrap(loop, "on_advance_end", self._after_epoch, before=self._before_epoch_end,
                   at_sigterm=True)

    def _take_loaded(self) -> dict[str, Any]:
        assert self._loaded is not None  # set by run.restore() whenever _path is
        return self._loaded["trainer"]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = True
        self._quiet_lightning_sigterm(trainer)
        self._global_step = trainer.global_step
        self._samplers = _stateful_samplers(trainer)
        if self._path is None:
            self._remove_stray_files(trainer)
            return
        if trainer.ckpt_path != self._path:
            raise CheckpointError(
                f"trainer.fit() resumed from {trainer.ckpt_path!r}, not from sweeprun's newest "
                f"verified checkpoint {self._path}: pass ckpt_path=callback.ckpt_path")
        self._load_samplers()
        loops = (self._loaded or {}).get("loops")
        if loops is not None:
            _lightning_state.restore(trainer, loops)
        if (self._loaded or {}).get("boundary") == "epoch":
            # saved after the epoch's end: a fresh epoch starts, whatever Lightning's
            # iteration-based training (max_steps) makes of "restarting"
            _Loop.restarting.fset(trainer.fit_loop, False)
        else:
            # Lightning keeps the fit loop "restarting" for the whole resumed epoch and skips
            # that epoch's ReduceLROnPlateau step (the monitored metrics were not in its
            # checkpoint; they are in ours). Only the fit loop's flag: the epoch loop needs
            # its own to continue mid-epoch.
            if not hasattr(trainer.fit_loop, "_restarting"):
                warn_once("this Lightning version's fit loop has no _restarting: "
                          "an epoch-level ReduceLROnPlateau step may be skipped after a mid-epoch resume")
            trainer.fit_loop._restarting = False
        self._remove_stray_files(trainer)
        if self._rng is not None:
            # last: Lightning's setup (the DataLoader's iterator) has drawn by now
            restore_rng(self._rng)

    def _load_samplers(self) -> None:
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

    def _quiet_lightning_sigterm(self, trainer: Trainer) -> None:
        """Give SIGTERM back to the run's handler for the fit. Lightning's own raises
        SIGTERMException between two batches, in the middle of an accumulation or of a
        validation: it exits without saving the step it stopped at (the resumed run then
        starts from an older checkpoint than the step it reported). The run's handler
        stops at the end of the step, with a checkpoint. Lightning's teardown puts the
        handlers back as they were before the fit."""
        connector = trainer._signal_connector
        before = connector._original_handlers.get(signal.SIGTERM)
        if callable(before) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)
            connector.received_sigterm = False  # a SIGTERM already seen is the run's stop request too
        elif not isinstance(getattr(connector, "_original_handlers", None), dict):
            warn_once("this Lightning version's signal connector is not the one "
                      "sweeprun knows: a SIGTERM may end the fit without a save at its step")

    def _remove_stray_files(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return  # rank 0 writes (and removes) ModelCheckpoint's files; every rank knows the same ones
        restored = None
        if self._path is not None:  # the callbacks' states as the resumed checkpoint holds them
            callbacks = ((self._loaded or {}).get("trainer") or {}).get("callbacks")
            restored = callbacks if isinstance(callbacks, dict) else {}
        for path in self._files.remove_strays(trainer, restored):
            say(f"removed {path}: a ModelCheckpoint file of an attempt that did not reach a checkpoint")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._batches.append(_step_scalars(trainer, outputs))
        self._step_epoch = trainer.current_epoch
        if trainer.global_step != self._global_step:  # the optimizer stepped in this batch
            self._global_step = trainer.global_step
            self._stepped = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        results = trainer.fit_loop.epoch_loop.val_loop._results
        self._carry.update(_scalar_items(results.metrics(False)["callback"]))

    def _after_batch(self, _: Any) -> None:
        if self._stepped and not _epoch_ends(self._trainer):
            self._end_step("batch")

    def _before_validation(self) -> Any:
        return self._trainer._logger_connector._first_loop_iter if self._trainer else None

    def _after_validation(self, first_loop_iter: Any) -> None:
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking or not self._stepped or _epoch_ends(trainer):
            return
        # Lightning resumes a checkpoint written right after this validation as if it had run
        # (and then runs the rest of the batch's iteration). What the loop sets back next:
        trainer._logger_connector._first_loop_iter = first_loop_iter
        trainer.training = True
        self._end_step("validation")

    def _before_epoch_end(self) -> Any:
        return dict(self._trainer._logger_connector._callback_metrics) if self._trainer else {}

    def _after_epoch(self, before: dict[str, Any]) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        # the epoch's values are the ones Lightning computed afresh at its end
        after = trainer._logger_connector._callback_metrics
        self._carry.update(_scalar_items({k: v for k, v in after.items() if before.get(k) is not v}))
        if self._stepped:
            self._end_step("epoch")

    def _end_step(self, boundary: str) -> None:
        metrics = _mean(self._batches)
        metrics.update(self._carry)
        metrics["epoch"] = self._step_epoch
        self._batches, self._carry, self._stepped = [], {}, False
        self._boundary = boundary
        self.run.epoch = self._step_epoch
        if self.run.guard.policy is not None and self.run.guard.policy.skip:
            self._pace.observe({str(i): s for i, s in enumerate(self._samplers)})  # for skip=
        try:
            self.run.end_step(**metrics)  # saves when due; on a stop: save and exit 75
        except SystemExit:
            self._files.flush(self.run.step + 1)  # the stop's checkpoint is durable
            raise
        if self._files.pending and self.run.saved_step != self._flushed_at:
            # a save was started since the last look: once durable it lets the deletions go
            durable = [m.step for m in self.run.checkpoints() if m.attempt == self.run.attempt]
            newest = max(durable, default=-1)
            self._files.flush(newest)
            if newest >= (self.run.saved_step or 0):
                self._flushed_at = self.run.saved_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A relaunch that restores the run at its end finds the fit loop done: Lightning
        returns without ``on_train_end``, and the run still has to finish."""
        if not self._finished:
            if not self._started and self._path is not None:
                self._samplers = _stateful_samplers(trainer)
                self._load_samplers()
                loops = (self._loaded or {}).get("loops")
                if loops is not None:  # what the script reads after fit: trainer.callback_metrics
                    _lightning_state.restore(trainer, loops)
            self._finish(trainer)

    def _finish(self, trainer: Trainer) -> None:
        if self._stepped:  # a step whose end no loop reached (the fit stopped inside an epoch)
            self._end_step("batch")
        if self._carry or self._batches:
            self.run.log(**_mean(self._batches), **self._carry)
            self._batches, self._carry = [], {}
        self._boundary = "end"
        self.run.epoch = self._step_epoch
        self._finished = True
        try:
            self.run.finish()
        except SystemExit as stop:
            if stop.code == PREEMPTED_EXIT:  # a stop: its checkpoint is durable
                self._files.flush(self.run.step + 1)
            raise
        # not after a failed final save (the checkpoint that resumes still names those files)
        self._files.flush(self.run.step + 1)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, SystemExit) and exception.code in (None, 0) and self.run.should_stop:
            # Lightning's own SIGTERMException (a SIGTERM before the fit's first batch) exits
            # 0, which would read as "finished"; it is resumable from the last checkpoint.
            say(f"stopped by a signal before training started; the last checkpoint resumes; exiting "
                f"with {PREEMPTED_EXIT} (resumable)")
            exception.code = PREEMPTED_EXIT
        try:
            self.run.close()  # wait for a save in flight; the last checkpoint is what resumes
        except SweeprunError as error:
            say(f"error: {' '.join(str(error).split())}")
        finally:
            # Lightning runs the callbacks' teardown only when fit succeeds: a notebook that
            # catches the error and fits again must not find the loops wrapped twice
            self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._io is not None and trainer.strategy.checkpoint_io is self._io:
            trainer.strategy.checkpoint_io = self._io.inner
        self._io = None
        for owner, name in self._wrapped:
            owner.__dict__.pop(name, None)
        self._wrapped = []

    def _wrap(self, owner: Any, name: str, after: Callable[[Any], None],
              before: Callable[[], Any] | None = None, at_sigterm: bool = False) -> None:
        """Run ``after(before())`` around ``owner.name`` (on this object only, for this fit).
        ``at_sigterm``: also when it ends with Lightning's SIGTERMException, which these
        methods raise only once the iteration's work is done."""
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            token = before() if before is not None else None
            try:
                result = original(*args, **kwargs)
            except SIGTERMException:
                if at_sigterm:
                    after(token)
                raise
            after(token)
            return result

        setattr(owner, name, wrapped)
        self._wrapped.append((owner, name))


class _TrainerState:
    """What the run tracks: Lightning's own checkpoint, the samplers' positions, the logged
    metrics Lightning leaves out, and where in the loop the step ended."""

    def __init__(self, callback: SweeprunCallback) -> None:
        self.callback = callback

    def state_dict(self) -> dict[str, Any]:
        trainer = self.callback._trainer
        if trainer is None:
            raise CheckpointError("nothing to save before trainer.fit() has started")
        return {"trainer": trainer._checkpoint_connector.dump_checkpoint(weights_only=False),
                "samplers": [s.state_dict() for s in self.callback._samplers],
                "loops": _lightning_state.capture(trainer),
                "boundary": self.callback._boundary}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.callback._loaded = state

    def data_position(self) -> dict[str, Any]:
        """Where the training DataLoader's samplers are: what a loss-spike rollback keeps
        while everything else goes back to the restored checkpoint."""
        policy = self.callback.run.guard.policy
        skip = policy.skip if policy is not None else 0
        return {"samplers": [self.callback._pace.after(str(i), s, skip)
                             for i, s in enumerate(self.callback._samplers)]}

    def load_data_position(self, position: dict[str, Any]) -> None:
        """After the restored checkpoint's state was loaded: its samplers go where the rollback
        left the data (``on_train_start`` loads them into the new fit's samplers)."""
        if self.callback._loaded is not None:
            self.callback._loaded = {**self.callback._loaded, "samplers": position["samplers"]}


class _FromSweeprun(CheckpointIO):
    """The strategy's CheckpointIO, except that the sweeprun checkpoint is read from memory
    and that deleting a file inside the run directory waits for the next durable checkpoint."""

    def __init__(self, inner: CheckpointIO, path: str | None, take: Any,
                 callback: SweeprunCallback) -> None:
        self.inner, self.path, self.take, self.callback = inner, path, take, callback

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        self.callback._files.rewritten(path)
        self.inner.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if self.path is not None and str(path) == self.path:
            return self.take()
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        files = self.callback._files
        if files.inside(path):
            files.defer(self.callback.run.step, path)
        else:
            self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def _epoch_ends(trainer: Trainer | None) -> bool:
    """Whether the training epoch loop ends after the current batch (Lightning's own test,
    less the part about a validation interrupted mid-way, which the run never saves)."""
    if trainer is None:
        return False
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._is_training_done or (trainer.should_stop and loop._can_stop_early))


def _stateful_samplers(trainer: Trainer) -> list[Any]:
    """The samplers of the training DataLoaders that can say where they are; a warning for a
    loader that cannot (Lightning restarts it from its first batch on resume)."""
    from torch.utils.data import DataLoader


    combined = trainer.fit_loop._combined_loader
    # "is not None": its truth is its length, which raises before its first iteration (a fit
    # that restored a run at its end never iterates it)
    loaders = combined.flattened if combined is not None else []
    found: list[Any] = []
    for loader in loaders:
        if not isinstance(loader, DataLoader) or hasattr(loader, "state_dict"):
            continue  # Lightning saves a stateful loader's position itself
        wrapped = getattr(getattr(loader.sampler, "dataset", None), "_sampler", None)
        if isinstance(wrapped, ResumableSampler):
            # Lightning's DistributedSamplerWrapper: it lists the whole sampler at each epoch
            # (its position is lost) and shards it again (each rank would see 1/R of its part)
            raise CheckpointError(
                "the training DataLoader's ResumableSampler was wrapped in Lightning's "
                "DistributedSamplerWrapper: it shards by rank itself and keeps its own position; "
                "pass L.Trainer(use_distributed_sampler=False)")
        candidates = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
        stateful = [s for s in dict.fromkeys(candidates) if s is not None
                    and hasattr(s, "state_dict") and hasattr(s, "load_state_dict")]
        if not stateful:
            warn(f"the training DataLoader's sampler ({type(loader.sampler).__name__}) cannot say where "
                 "it is in the epoch, so a run resumed mid-epoch repeats or skips data; use "
                 "sampler=sweeprun.ResumableSampler(dataset, seed=...)")
        found.extend(stateful)
    return found


def _scalar_items(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def _step_scalars(trainer: Trainer, outputs: Any) -> dict[str, Any]:
    """The batch's step-level logged scalars (``self.log(..., on_step=True)``) and its loss."""
    metrics = _scalar_items(trainer.fit_loop.epoch_loop._results.metrics(True)["callback"])
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if "loss" not in metrics and loss is not None and getattr(loss, "numel", lambda: 0)() == 1:
        if trainer.lightning_module.automatic_optimization:
            # Lightning hands over the loss divided by the accumulation (what backward gets)
            loss = loss * trainer.accumulate_grad_batches
        metrics["loss"] = loss
    return metrics


def _mean(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """One value per name for the batches of one optimizer step: the value itself for one
    batch, else the mean over the batches that logged it (the effective batch's value)."""
    if len(batches) == 1:
        return dict(batches[0])
    values: dict[str, list[float]] = {}
    for batch in batches:
        for key, value in batch.items():
            values.setdefault(key, []).append(float(value))
    return {key: sum(seen) / len(seen) for key, seen in values.items()}
