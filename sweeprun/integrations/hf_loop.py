"""The Trainer's loss bookkeeping, carried across a resume; its rotation, held until the seal.

What the Trainer logs as ``loss`` is a running sum over the steps since its last log,
divided by their number, and its final ``train_loss`` is the sum of every logged sum over
the steps trained. None of that is in its checkpoint: a resumed Trainer starts the running
sum at zero, counts the steps since the resume, and divides the final sum by the steps of
its own process, so a run resumed between two logs logs an average over fewer batches, and
its ``train_loss`` covers only its last attempt (or is 0.0 when there was nothing left).

:class:`LoopCarry` records the three (the running-loss tensor, the step last logged, the
sum of logged losses) at each save, in sweeprun's own file of the folder (:mod:`.hf_rng`),
and puts them back on resume so that every float comes out bit for bit. The saved running
sum ``S`` is added to the first resumed micro-batch's loss ``c``: the Trainer's
``0 + (c + S)`` equals the uninterrupted ``S + c`` (IEEE addition commutes, ``0 + x`` is
``x``), and it works where the running loss is a local variable of the training loop
(older transformers) as well as where it is an attribute. Adding ``S`` anywhere later in
the window would round differently.

The names reached are private to transformers: where one is missing (another version), a
warning says which figure may differ and training goes on.
"""

from __future__ import annotations

from typing import Any

from ..training.checkpoints import warn


class LoopCarry:
    """Saves and restores the Trainer's loss bookkeeping. The callback drives it: :meth:`hook`
    once per Trainer, :meth:`snapshot` at each save, :meth:`restore` when training begins."""

    def __init__(self) -> None:
        self._trainer: Any = None
        self._tr_loss: Any = None       # the Trainer's running-loss tensor, as last passed to its log
        self._pending: Any = None       # the saved running sum, for the first resumed micro-batch
        self.carried = False            # the sum of logged losses was carried over from a folder
        #: Each micro-batch's loss since the last optimizer step, kept only when a loss-spike
        #: policy watches it (:meth:`step_loss`).
        self.losses: list[Any] | None = None
        self._warned: set[str] = set()

    def _warn(self, name: str, what: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warn(f"this transformers version has no Trainer.{name}: {what} may differ between a "
                 "resumed run and one never interrupted")

    def hook(self, trainer: Any) -> None:
        """See the running-loss tensor as the Trainer hands it to its log-and-save (it is updated
        in place, so the one seen there is current at the save), and add the saved sum to the
        first resumed micro-batch's loss."""
        self._trainer = trainer
        log_save = getattr(trainer, "_maybe_log_save_evaluate", None)
        if log_save is None:
            self._warn("_maybe_log_save_evaluate", "the logged loss after a resume")
        elif not getattr(log_save, "_sweeprun", False):
            def log_save_evaluate(tr_loss: Any, *args: Any, **kwargs: Any) -> Any:
                self._tr_loss = tr_loss
                return log_save(tr_loss, *args, **kwargs)

            log_save_evaluate._sweeprun = True  # type: ignore[attr-defined]
            trainer._maybe_log_save_evaluate = log_save_evaluate
        step = trainer.training_step
        if not getattr(step, "_sweeprun", False):
            def training_step(*args: Any, **kwargs: Any) -> Any:
                loss = step(*args, **kwargs)
                if self.losses is not None:     # as trained, before any carried sum is added
                    self.losses.append(loss.detach())
                if self._pending is not None:
                    pending, self._pending = self._pending, None
                    loss = loss + pending.to(loss.device)
                return loss

            training_step._sweeprun = True  # type: ignore[attr-defined]
            trainer.training_step = training_step
        log = trainer.log
        if not getattr(log, "_sweeprun", False):
            def whole_run_log(logs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
                if self.carried and "train_loss" in logs and "train_runtime" in logs:
                    # the end-of-training summary: the Trainer divided the carried sum by the
                    # steps of this process only; over every step it is the uninterrupted run's
                    logs["train_loss"] = self.whole_run_train_loss(trainer.state.global_step)
                return log(logs, *args, **kwargs)

            whole_run_log._sweeprun = True  # type: ignore[attr-defined]
            trainer.log = whole_run_log

    def step_loss(self) -> float | None:
        """The loss of the optimizer step just ended (its micro-batches' sum, as the Trainer
        sums them), then forgotten; ``None`` when no batch was seen."""
        if not self.losses:
            return None
        total = float(sum(loss.float().sum() for loss in self.losses))
        self.losses.clear()
        return total

    def snapshot(self) -> dict[str, Any]:
        """The bookkeeping now (at a save, between optimizer steps), for the folder's file."""
        import torch

        trainer = self._trainer
        tr_loss = getattr(trainer, "_tr_loss", self._tr_loss)
        out: dict[str, Any] = {}
        if isinstance(tr_loss, torch.Tensor):
            out["tr_loss"] = tr_loss.detach().to("cpu", copy=True)
        for key, name in (("last_logged", "_globalstep_last_logged"), ("total_loss", "_total_loss_scalar")):
            if hasattr(trainer, name):
                out[key] = getattr(trainer, name)
        return out

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Training begins from a folder whose file held ``saved`` (``None``: a fresh start, or a
        folder written before sweeprun kept these). Called from ``on_train_begin``, after the
        Trainer has reset them."""
        self._pending = None
        self.carried = False
        if not saved:
            return
        trainer = self._trainer
        for key, name, what in (("last_logged", "_globalstep_last_logged", "the logged loss"),
                                ("total_loss", "_total_loss_scalar", "train_loss")):
            if key not in saved:
                continue
            if hasattr(trainer, name):
                setattr(trainer, name, saved[key])
                self.carried = self.carried or key == "total_loss"
            else:
                self._warn(name, what)
        if "tr_loss" in saved and bool(saved["tr_loss"] != 0):
            self._pending = saved["tr_loss"]

    @staticmethod
    def train_loss(saved: dict[str, Any] | None, global_step: int) -> float | None:
        """``train_loss`` of a run that ended at the folder whose file held ``saved``, as the
        Trainer computes it at the end: the logged sums plus what is left, over every step."""
        if not saved or "total_loss" not in saved:
            return None
        left = float(saved["tr_loss"].item()) if "tr_loss" in saved else 0.0
        return (saved["total_loss"] + left) / max(global_step, 0.001)

    def whole_run_train_loss(self, global_step: int) -> float:
        """At the end of a resumed run: the carried sum (with what its last steps added) over
        every step, as the uninterrupted run divides it."""
        return self._trainer._total_loss_scalar / max(global_step, 0.001)
