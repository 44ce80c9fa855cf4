"""The Hugging Face ``Trainer`` as a sweeprun run: four added lines.

::

    from sweeprun.integrations import transformers as sweeprun_hf

    run = sweeprun_hf.init(params=defaults, local_dir="out")   # parameters, run directory
    args = TrainingArguments(output_dir=run.output_dir, ...)   # checkpoints in the run directory
    trainer = Trainer(..., callbacks=[run])
    run.train(trainer)                                          # instead of trainer.train()

The Trainer checkpoints well but resumes badly, and this module closes its gaps:

- It writes ``checkpoint-<step>/`` in place and resumes from the highest number without
  looking inside, so a kill during a save leaves a run that cannot resume. Here, once the
  Trainer has finished a folder (``on_save``), sweeprun *seals* it: ``sweeprun-seal.json``,
  written atomically and last, lists the size and SHA-256 of every file in it. A resume
  takes the newest folder whose seal still verifies; unsealed or damaged folders are set
  aside in ``.sweeprun-rejected/`` with a warning, so the Trainer never writes into them.
- It restores the RNGs only after the first resumed batch has been fetched (and, with
  accelerate's look-ahead, the second), so a dataset that augments with the global RNGs
  diverges at once. Here the CPU RNGs (Python, NumPy, torch) are recorded right before
  each training fetch (a hook on the train dataset's ``__getitem__``/``__getitems__``)
  and the record for the first untrained batch is saved in the folder as
  ``sweeprun-rng.pt``, with torch's state at the save. A resume sets the first from
  inside the first fetch (after the new loader iterator has drawn its seed, as the
  uninterrupted run's did long before), torch's state at the save right after that fetch
  (the uninterrupted run trained its last step there), and leaves the Trainer's late
  restore to the CUDA RNGs. A save at the end of an epoch fetched nothing ahead: there
  the Trainer's own restore, before the loader's iterator, is already right.
- It saves on a step cadence only and knows nothing of preemption. Here a save is also
  due every ``every_s`` seconds, at the last step, and on SIGTERM/SIGINT or before the
  time budget (``SWEEPRUN_TIME_LIMIT``) runs out; then training stops and the process
  exits with 75, which the launcher resumes.
- Its logs go to ``metrics.jsonl`` (cut back to the sealed step on resume), so
  ``sweeprun status`` shows progress.

With ``dataloader_num_workers > 0`` the dataset runs in worker processes that the data
loader seeds itself; only the main process's RNGs are restored (a warning says so).

transformers is imported here only; ``import sweeprun`` and the CLI never load it.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

try:
    from transformers import Trainer, TrainerCallback
except ImportError:  # pragma: no cover - depends on the environment
    from ..errors import SpecError

    raise SpecError("sweeprun.integrations.transformers needs transformers: "
                    "pip install 'sweeprun[hf]'") from None

from ..errors import CheckpointError, SpecError
from ..faults import crash_point
from ..runenv import PREEMPTED_EXIT
from ..store import atomic_write, fsync_dir, is_local
from ..training.checkpoints import warn
from ..training.run import Run, _write_marker
from ..training.run import init as init_run
from .sealed import PREFIX, REJECTED, SEAL, Sealed, newest_sealed, seal, verify

__all__ = ["init", "SweeprunCallback", "Sealed", "seal", "verify", "PREFIX", "SEAL", "REJECTED"]

RNG_FILE = "sweeprun-rng.pt"


def init(params: Mapping[str, Any] | None = None, local_dir: str | os.PathLike[str] | None = None,
         *, every_s: float | None = 300.0, time_limit_s: float | None = None,
         stop_signals: Iterable[int] = (), clock: Callable[[], float] = time.monotonic,
         env: Mapping[str, str] | None = None) -> SweeprunCallback:
    """Start (or continue) this process's run and return the callback to give the Trainer.

    Parameters and directory come from the launcher's environment, or standalone from
    ``params`` and ``local_dir`` (as :func:`sweeprun.init`). ``every_s``: a save is due
    this often besides the Trainer's own ``save_steps`` (``None``: only those).
    ``time_limit_s`` (or SWEEPRUN_TIME_LIMIT, the smaller wins): save and exit 75 before
    that many seconds have passed.
    """
    run = init_run(params, local_dir, every_s=every_s, time_limit_s=time_limit_s,
                   stop_signals=stop_signals, clock=clock, env=env)
    if not is_local(run.paths.fs):
        run.close()
        raise SpecError(f"run directory {run.dir} is not on local disk; the Trainer writes its "
                        "checkpoints with plain file I/O: use a local store (a mounted drive works)")
    return SweeprunCallback(run, every_s=every_s, clock=clock)


class SweeprunCallback(TrainerCallback):
    """A Trainer callback that makes its training a sweeprun run. Create with :func:`init`."""

    def __init__(self, run: Run, *, every_s: float | None, clock: Callable[[], float]) -> None:
        self.run = run
        self.every_s = every_s
        self._clock = clock
        self._started = self._saved_at = self._step_started = clock()
        self._step_s = self._save_s = 0.0
        self._trainer: Trainer | None = None
        self._resumed: Sealed | None = None
        self._trained = 0                      # micro-batches trained by this process
        self._fetched = 0                      # micro-batches fetched (collated) by this process
        self._before_fetch: deque[tuple[int, tuple[Any, Any, Any]]] = deque(maxlen=256)
        self._in_fetch = False                 # a training batch is being fetched
        self._training = False
        self._pending_restore: tuple[Any, Any, Any] | None = None
        self._torch_after_first_fetch: Any = None
        self._restored_early = False
        self._stop_reason: str | None = None
        self._warned_rng = False

    @property
    def params(self) -> dict[str, Any]:
        return self.run.params

    @property
    def output_dir(self) -> str:
        """Give this to ``TrainingArguments(output_dir=...)``: ``<run dir>/trainer``."""
        return os.path.join(self.run.paths.dir, "trainer")

    # -- which checkpoint to resume from --------------------------------------------------

    def latest_sealed(self) -> Sealed | None:
        """The newest checkpoint folder that verifies. Newer folders that do not (cut short,
        damaged) are moved to ``.sweeprun-rejected/`` with a warning, so the Trainer never
        writes into them nor rotates the good one away in their favour."""
        scan = newest_sealed(self.output_dir)
        chosen, rejected = scan.chosen, scan.rejected
        reasons = "; ".join(reason for _, reason in rejected)
        if chosen is None and scan.sealed_seen:
            # left in place: a second attempt must meet the same error, not a fresh start
            raise CheckpointError(f"no checkpoint folder in {self.output_dir} verifies: {reasons}; "
                                  "delete the folder to start the run over")
        for path, _ in rejected:
            self._set_aside(path)
        if rejected:
            where = f"resuming from {os.path.basename(chosen.path)}" if chosen else "starting over"
            warn(f"checkpoint folder(s) skipped: {reasons}; {where} "
                 f"(set aside in {os.path.join(self.output_dir, REJECTED)})")
        return chosen

    def _set_aside(self, path: str) -> None:
        aside = os.path.join(self.output_dir, REJECTED)
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, f"{os.path.basename(path)}-a{self.run.attempt}")
        n = 0
        while os.path.exists(target + (f".{n}" if n else "")):
            n += 1
        os.replace(path, target + (f".{n}" if n else ""))
        fsync_dir(self.output_dir)

    # -- the entry point ------------------------------------------------------------------

    def train(self, trainer: Trainer, **kwargs: Any) -> Any:
        """``trainer.train()`` resumed from the newest sealed checkpoint; on a stop request
        (signal, time budget) the state is saved and sealed and the process exits with 75."""
        if "resume_from_checkpoint" in kwargs:
            raise SpecError("run.train() chooses resume_from_checkpoint itself (the newest sealed "
                            "checkpoint); call it without that argument")
        if os.path.abspath(trainer.args.output_dir) != os.path.abspath(self.output_dir):
            raise SpecError(f"TrainingArguments(output_dir={trainer.args.output_dir!r}) is not the "
                            f"run's folder {self.output_dir!r}: give output_dir=run.output_dir")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        if trainer.args.save_total_limit == 1:
            warn("save_total_limit=1 deletes the last sealed checkpoint before the new one is "
                 "sealed: a kill in between starts the run over; use 2 or more")
        self._trainer = trainer
        self._hook(trainer)
        self._resumed = self.latest_sealed()
        run = self.run
        if self._resumed is not None:
            run.step = self._resumed.step
            recorded = self._resumed.seal.get("metrics_bytes")
            run._resume_bytes = recorded if isinstance(recorded, int) and recorded >= 0 else None
            print(f"sweeprun: resuming from {self._resumed.path} (step {self._resumed.step})",
                  file=sys.stderr, flush=True)
        run._open_metrics(self._resumed.seal.get("attempt") if self._resumed else None)
        try:
            if self._resumed is not None and self._resumed.seal.get("final"):
                result = self._load_final(trainer, self._resumed)
            else:
                result = trainer.train(
                    resume_from_checkpoint=self._resumed.path if self._resumed else None, **kwargs)
        except BaseException:
            run.close()
            raise
        run.close()
        if self._stop_reason is not None:
            print(f"sweeprun: {self._stop_reason}; saved and sealed checkpoint-"
                  f"{trainer.state.global_step}; exiting with {PREEMPTED_EXIT} (resumable)",
                  file=sys.stderr, flush=True)
            raise SystemExit(PREEMPTED_EXIT)
        if run._under_launcher:
            _write_marker(run.paths, run.paths.api_finished(run.attempt), run.attempt,
                          trainer.state.global_step)
        return result

    @staticmethod
    def _load_final(trainer: Trainer, final: Sealed) -> Any:
        """The run had trained to its last step and sealed it, then died before it could exit.
        Resumed there, the Trainer would train one step past ``max_steps`` (it checks the limit
        only after a step), so its weights and state are loaded instead of training."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        trainer._load_from_checkpoint(final.path)
        trainer.state = TrainerState.load_from_json(os.path.join(final.path, "trainer_state.json"))
        print(f"sweeprun: {final.path} is the last step ({final.step}); nothing left to train",
              file=sys.stderr, flush=True)
        return TrainOutput(trainer.state.global_step, 0.0, {})

    def _hook(self, trainer: Trainer) -> None:
        """Mark the moment right before each training batch is fetched (the train dataset's
        ``__getitem__``/``__getitems__``) and right after (the collator), and keep the Trainer's
        late RNG restore from rewinding the CPU RNGs that the first fetches already used."""
        dataset = trainer.train_dataset
        cls = type(dataset)
        if trainer.args.dataloader_num_workers > 0:
            warn("dataloader_num_workers > 0: the dataset runs in worker processes, which the "
                 "data loader seeds itself; a resumed run's augmentation may differ (use 0 for an "
                 "exact resume)")
        elif dataset is not None and not getattr(cls, "_sweeprun", False):
            methods = {name: getattr(cls, name) for name in ("__getitem__", "__getitems__")
                       if callable(getattr(cls, name, None))}
            if methods:
                hooked: dict[str, Any] = {"_sweeprun": True, "__module__": cls.__module__}
                for name, method in methods.items():
                    hooked[name] = self._before_item(method)
                try:
                    dataset.__class__ = type(cls.__name__, (cls,), hooked)
                except TypeError:
                    pass
        collate = trainer.data_collator
        if not getattr(collate, "_sweeprun", False):
            def marked(features: Any) -> Any:
                batch = collate(features)
                if self._in_fetch:
                    self._in_fetch = False
                    if self._torch_after_first_fetch is not None:
                        import torch

                        torch.set_rng_state(self._torch_after_first_fetch)
                        self._torch_after_first_fetch = None
                return batch

            marked._sweeprun = True  # type: ignore[attr-defined]
            trainer.data_collator = marked
        load = trainer._load_rng_state

        def load_keeping_cpu(checkpoint: Any) -> None:
            if self._restored_early:
                kept = _cpu_rng_state()
                load(checkpoint)            # CUDA and other devices: their state at the save
                _set_cpu_rng_state(kept)
            else:
                load(checkpoint)

        trainer._load_rng_state = load_keeping_cpu  # type: ignore[method-assign]

    def _before_item(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def hooked(dataset: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._in_fetch and self._training:
                self._in_fetch = True
                if self._pending_restore is not None:
                    _set_cpu_rng_state(self._pending_restore)
                    self._pending_restore = None
                self._fetched += 1
                self._before_fetch.append((self._fetched, _cpu_rng_state()))
            return method(dataset, *args, **kwargs)

        return hooked

    # -- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Arm the restore of the CPU RNGs at the first fetch: after the data loader's new
        iterator has drawn its seed, as in the uninterrupted run, and before the dataset
        draws. The Trainer's own restore comes after that fetch and would rewind them."""
        self._trained = self._fetched = 0
        self._before_fetch.clear()
        self._training = True
        if self._trainer is None:
            warn("trainer.train() was called directly: call run.train(trainer) instead, which "
                 "resumes from the newest sealed checkpoint and replays the RNGs exactly")
        if self._resumed is None:
            return
        path = os.path.join(self._resumed.path, RNG_FILE)
        if not os.path.exists(path):
            warn(f"{path} is missing: the CPU RNGs are restored by the Trainer, after the first "
                 "batches were fetched")
            return
        import torch

        from ..training.state import from_safe

        saved = from_safe(torch.load(path, weights_only=True))
        if saved.get("before_fetch") is None:
            return  # saved at the end of an epoch: nothing fetched ahead, the Trainer's restore is right
        before = saved["before_fetch"]
        self._pending_restore = (before["python"], before.get("numpy"), before["torch"])
        self._torch_after_first_fetch = saved["torch_at_save"]
        self._restored_early = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = False

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trained += 1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trained += 1
        now = self._clock()
        self._step_s, self._step_started = now - self._step_started, now
        run = self.run
        limit = run.time_limit_s
        if self._stop_reason is None and run.should_stop:
            self._stop_reason = run._stop_reason
        if (self._stop_reason is None and limit is not None
                and now - self._started + self._step_s + self._save_s >= limit):
            self._stop_reason = f"time limit of {limit:g} s reached"
        if self._stop_reason is not None:
            control.should_save = True
            control.should_training_stop = True
        elif state.global_step >= state.max_steps > 0:
            control.should_save = True   # the end is always sealed: a rerun finds nothing to do
        elif self.every_s is not None and now - self._saved_at >= self.every_s:
            control.should_save = True
        if control.should_save:
            # before the Trainer writes in place: a process whose run was taken over (a frozen
            # machine that woke up) must not rewrite folders the live attempt relies on
            run._writer.fence()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return  # one process seals the (shared) folder
        start = self._clock()
        folder = os.path.join(args.output_dir, f"{PREFIX}{state.global_step}")
        if not os.path.isdir(folder):
            return  # another process (rank) wrote it, or the Trainer saved nowhere
        self._write_rng(folder)
        run = self.run
        run._metrics.flush()
        crash_point("checkpoint.before_manifest")   # the Trainer's files complete, no seal yet
        run._writer.fence()                         # again: the save may have taken minutes
        seal(folder, state.global_step, {
            "attempt": run.attempt, "run_id": run.run_id, "sweep": run.sweep,
            "metrics_bytes": run._metrics.size, "created": time.time(),
            "final": state.global_step >= state.max_steps > 0})
        self._saved_at = self._clock()
        self._save_s = self._saved_at - start

    def _write_rng(self, folder: str) -> None:
        """The CPU RNGs right before the first untrained batch was fetched (the data loader
        fetches one ahead), and torch's now, which the next fetch and step continue from."""
        import io

        import fsspec
        import torch

        from ..training.state import to_safe

        before = None
        if self._fetched > self._trained:
            state = next((s for n, s in self._before_fetch if n == self._trained + 1), None)
            if state is None:
                if not self._warned_rng:
                    self._warned_rng = True
                    warn("no record of the training fetches (an IterableDataset, or the dataset "
                         "or collator replaced after run.train() began?): a resumed run's "
                         "augmentation RNG will differ")
                return
            before = {"python": state[0], "numpy": state[1], "torch": state[2]}
        buffer = io.BytesIO()
        torch.save(to_safe({"before_fetch": before, "torch_at_save": torch.get_rng_state()}), buffer)
        atomic_write(fsspec.filesystem("file"), os.path.join(folder, RNG_FILE), buffer.getvalue())

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if logs and "train_runtime" in logs:
            return  # the end-of-training summary: wall-time figures, not a step's metrics
        values = {k: v for k, v in (logs or {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.run.step = state.global_step
            self.run.log(**values)


def _cpu_rng_state() -> tuple[Any, Any, Any]:
    import torch

    try:
        import numpy as np
    except ImportError:
        return random.getstate(), None, torch.get_rng_state()
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_cpu_rng_state(state: tuple[Any, Any, Any]) -> None:
    import torch

    random.setstate(state[0])
    if state[1] is not None:
        import numpy as np

        np.random.set_state(state[1])
    torch.set_rng_state(state[2])


__all__ = ["Sealed", "SweeprunCallback", "init", "seal", "verify"]
