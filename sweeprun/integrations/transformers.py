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
- It restores the RNGs only after the first resumed batch has been fetched, so a
  dataset that augments with the global RNGs diverges at once. Here the CPU RNGs are
  recorded right before each training fetch and replayed from there on resume
  (:mod:`.hf_rng`, ``sweeprun-rng.pt`` in each folder).
- It saves on a step cadence only and knows nothing of preemption. Here a save is also
  due every ``every_s`` seconds, at the last step, and on SIGTERM/SIGINT or before the
  time budget (``SWEEPRUN_TIME_LIMIT``) runs out; then training stops and the process
  exits with 75, which the launcher resumes.
- Its logs go to ``metrics.jsonl`` (cut back to the sealed step on resume), so
  ``sweeprun status`` shows progress. It keeps its running loss and its ``train_loss``
  sum out of its checkpoints; here they are saved and put back (:mod:`.hf_loop`), so the
  logged ``loss`` and the final ``train_loss`` of a resumed run are those of a run never
  interrupted.
- It rotates (``save_total_limit``) inside its save, before the new folder is sealed: a
  kill in between would leave the run an older folder than the previous one. Here
  rotation waits for the seal, and never removes the best model's folder.
- Resumed at its last step it would train one step too many; here its final state is
  loaded instead, with the best model reloaded (``load_best_model_at_end``) and the same
  ``train_loss`` as the uninterrupted run.

On several ranks (torchrun, ``nproc:``) :func:`init` initialises the process group first;
rank 0 chooses, sets aside, seals, uploads and rotates the folders, each rank writes its own
``sweeprun-rng-<rank>.pt``, and stops and time-cadence saves are agreed at each step, so every
rank saves the same step and exits 75 together.

With ``dataloader_num_workers > 0`` the dataset runs in worker processes that the data
loader seeds itself; only the main process's RNGs are restored (a warning says so).

transformers is imported here only; ``import sweeprun`` and the CLI never load it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

try:
    from transformers import Trainer, TrainerCallback
except ImportError:  # pragma: no cover - depends on the environment
    from ..errors import SpecError

    raise SpecError("sweeprun.integrations.transformers needs transformers: "
                    "pip install 'sweeprun[hf]'") from None

from .. import settings
from ..errors import CheckpointError, SpecError, SweeprunError
from ..faults import crash_point
from ..runenv import PREEMPTED_EXIT
from ..store import fsync_dir, native_path
from ..store.layout import CHECKPOINT_FOLDER_PREFIX as PREFIX
from ..store.layout import checkpoint_folder, set_aside_name
from ..training.checkpoints import say, warn
from ..training.ranks import join_from_env
from ..training.rollback import Candidate, applies, restore_records, roll_back
from ..training.run import Run
from ..training.sealed import (
    REJECTED,
    SEAL,
    TRAINER_DIR,
    Sealed,
    checkpoint_folders,
    newest_sealed,
    recorded_best,
    rotate,
    seal,
    verify,
)
from ..training.spikes import Spikes, combined
from ..training.start import init as init_run
from . import hf_rng
from .hf_loop import LoopCarry
from .hf_rng import RNG_FILE, RngReplay
from .hf_store import StoreFolders, staging_root

__all__ = ["init", "SweeprunCallback", "Sealed", "seal", "verify", "PREFIX", "SEAL", "REJECTED",
           "RNG_FILE"]


def init(params: Mapping[str, Any] | None = None, local_dir: str | os.PathLike[str] | None = None,
         *, every_s: float | Literal["auto"] | None = "auto", time_limit_s: float | None = None,
         stop_signals: Iterable[int] = (), staging_dir: str | os.PathLike[str] | None = None,
         spikes: bool | Spikes | Mapping[str, Any] | None = None, tracker: str | None = None,
         clock: Callable[[], float] = time.monotonic, env: Mapping[str, str] | None = None) -> SweeprunCallback:
    """Start (or continue) this process's run and return the callback to give the Trainer.

    Parameters and directory come from the launcher's environment, or standalone from
    ``params`` and ``local_dir`` (as :func:`sweeprun.init`). ``every_s``: a save is due
    this often besides the Trainer's own ``save_steps`` (``None``: only those); ``"auto"``
    (the default) spaces them by Young/Daly from the measured cost of the Trainer's saves
    and the sweep's interruption rate, as :func:`sweeprun.init` does.
    ``time_limit_s`` (or SWEEPRUN_TIME_LIMIT, the smaller wins): save and exit 75 before
    that many seconds have passed.

    A run directory on an object store (``s3://...``) works too: the Trainer writes into
    a local staging folder (one per run, under ``staging_dir`` or else ``$SWEEPRUN_HOME``)
    and each sealed folder is uploaded to the store, the seal last; a resume downloads the
    newest folder that verifies (:mod:`.hf_store`).

    ``spikes`` (as :func:`sweeprun.init`'s) watches each optimizer step's loss: a NaN, an Inf
    or a spike rolls the run back to the newest sealed folder from before it (on
    ``save_steps``), sets the newer ones aside, and resumes past the bad batches with the
    Trainer's own step count (for now with a run directory on local disk). ``tracker``
    (as :func:`sweeprun.init`'s): what the Trainer logs goes to MLflow, W&B or TensorBoard too.
    """
    join_from_env()   # under torchrun: the Trainer's accelerate state makes the group only later
    run = init_run(params, local_dir, every_s=every_s, time_limit_s=time_limit_s,
                   stop_signals=stop_signals, spikes=spikes, tracker=tracker, clock=clock, env=env)
    staging = None
    if native_path(run.paths.fs, run.paths.dir) is None:  # the Trainer writes OS files: stage them
        if run.guard.policy is not None:
            run.close()
            raise SpecError(f"spikes= with the Trainer needs a run directory on local disk for now; "
                            f"{run.dir} is on an object store")
        try:
            staging = staging_root(run.paths, run.run_id,
                                   os.fspath(staging_dir) if staging_dir is not None else None)
        except BaseException:
            run.close()
            raise
    return SweeprunCallback(run, every_s=every_s, clock=clock, staging_dir=staging,
                            on_world_size_change=settings.ON_WORLD_SIZE_CHANGE.value(
                                os.environ if env is None else env))


class SweeprunCallback(TrainerCallback):
    """A Trainer callback that makes its training a sweeprun run. Create with :func:`init`."""

    def __init__(self, run: Run, *, every_s: float | Literal["auto"] | None, clock: Callable[[], float],
                 staging_dir: str | None = None, on_world_size_change: str = "reshard") -> None:
        self.run = run
        self._on_world_size_change = on_world_size_change
        self._root = run.paths.dir if staging_dir is None else staging_dir
        self._store = (None if staging_dir is None else
                       StoreFolders(run.paths, self.output_dir, run.attempt))
        self.every_s = every_s
        self._clock = clock
        self._started = self._saved_at = self._step_started = clock()
        self._step_s = self._save_s = 0.0
        self._step_ended = 0.0
        self._trainer: Trainer | None = None
        self._resumed: Sealed | None = None
        self._rng = RngReplay()
        self._loop = LoopCarry()
        self._data_offset = 0                # steps of batches passed over by rollbacks
        run.steps_follow_data = False        # a rollback keeps the Trainer's own step count
        if run.guard.policy is not None:
            self._loop.losses = []
        self._saved: dict[str, Any] | None = None    # sweeprun's file of the resumed folder
        self._stop_reason: str | None = None
        ranks = run.ranks
        #: whose ``sweeprun-rng-<rank>.pt`` this process writes and reads (``None``: one process)
        self._rank = ranks.rank if ranks is not None and ranks.world_size > 1 else None

    @property
    def params(self) -> dict[str, Any]:
        return self.run.params

    @property
    def output_dir(self) -> str:
        """Give this to ``TrainingArguments(output_dir=...)``: ``<run dir>/trainer``, or on an
        object store its local staging folder."""
        return os.path.join(self._root, TRAINER_DIR)

    # -- which checkpoint to resume from --------------------------------------------------

    def latest_sealed(self) -> Sealed | None:
        """The newest checkpoint folder that verifies. Newer folders that do not (cut short,
        damaged) are moved to ``.sweeprun-rejected/`` with a warning, so the Trainer never
        writes into them nor rotates the good one away in their favour. On an object store,
        the store's folders are the ones that count (:meth:`.StoreFolders.pull`).

        With several ranks, rank 0 chooses (and moves folders aside) while the others wait,
        and every rank resumes from its choice, or raises its error."""
        return _on_leader(self.run, self._latest_sealed)

    def _latest_sealed(self) -> Sealed | None:
        if self._store is not None:
            pulled = self._store.pull()
            if pulled.rejected:
                where = f"resuming from {os.path.basename(pulled.chosen.path)}" if pulled.chosen else "starting over"
                warn(f"checkpoint folder(s) skipped: {'; '.join(pulled.rejected)}; {where} "
                     f"(set aside in {self._store.url}/{REJECTED})")
            return pulled.chosen
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
        name, n = os.path.basename(path), 0
        while os.path.exists(os.path.join(aside, set_aside_name(name, self.run.attempt, n))):
            n += 1
        os.replace(path, os.path.join(aside, set_aside_name(name, self.run.attempt, n)))
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
        if trainer.args.save_total_limit == 1 and trainer.args.load_best_model_at_end:
            warn("save_total_limit=1 with load_best_model_at_end: at the end the Trainer deletes "
                 "every folder but the best, the last one too; a rerun then trains again from the "
                 "best; use 2 or more")
        self._trainer = trainer
        self._rng.hook(trainer)
        self._loop.hook(trainer)
        _rotate_after_the_seal(trainer)
        records, set_aside = restore_records(self.run)     # a diverged run stops here (exit 76)
        if set_aside:
            _on_leader(self.run, lambda: _SealedFolders(self).discard(set_aside))  # what a kill left
        self._resumed = self.latest_sealed()
        self._saved = hf_rng.load(self._resumed.path, self._rank) if self._resumed is not None else None
        run = self.run
        if self._resumed is not None:
            note = self._world_size_note(self._resumed)
            run.resume_at(self._resumed.step, metrics_bytes=self._resumed.seal.get("metrics_bytes"),
                          attempt=self._resumed.seal.get("attempt"))
            say(f"resuming from {self._resumed.path} (step {self._resumed.step}){note}")
        else:
            run.resume_at(0, metrics_bytes=0)      # a fresh start: no metrics of an earlier try
        rolled = applies(records, self._resumed.seal.get("attempt") if self._resumed else None)
        offset = self._resumed.seal.get("data_offset") if self._resumed else 0
        self._data_offset = offset if isinstance(offset, int) and offset > 0 else 0
        if rolled is not None:                     # a rollback's first start: past the bad batches
            self._data_offset = rolled.data_offset + rolled.skipped
            say(f"rolled back: {rolled.text()}; going on from step {run.step}, "
                f"{rolled.skipped} step(s) of batches passed over")
        if self._resumed is not None:
            run.guard.load_state_dict(self._resumed.seal.get("guard"))
        _skip_more(trainer, self._data_offset)     # each rollback's batches stay passed over
        try:
            if self._resumed is not None and self._resumed.seal.get("final"):
                result = self._load_final(trainer, self._resumed)
            else:
                result = trainer.train(
                    resume_from_checkpoint=self._resumed.path if self._resumed else None, **kwargs)
                result = self._whole_run_train_loss(result)
        except BaseException:
            run.close()
            raise
        run.close()
        if self._stop_reason is not None:
            say(f"{self._stop_reason}; saved and sealed {checkpoint_folder(trainer.state.global_step)}; "
                f"exiting with {PREEMPTED_EXIT} (resumable)")
            raise SystemExit(PREEMPTED_EXIT)
        run.mark_finished(trainer.state.global_step)
        if self._store is not None and (run.ranks is None or run.ranks.leader):
            self._store.release()
        return result

    def _world_size_note(self, resumed: Sealed) -> str:
        """A folder sealed by another number of ranks: the Trainer loads its whole model and
        optimizer, but each rank's RNG states and the data order per rank cannot be the
        same, so the resume is approximate (recorded as sweeprun's own checkpoints record
        it), or refused under ``on_world_size_change: refuse``."""
        from types import SimpleNamespace

        from ..training.restore import reshard_note

        saved = resumed.seal.get("world_size", 1)
        written = SimpleNamespace(world_size=saved if isinstance(saved, int) else 1,
                                  data=os.path.basename(resumed.path), step=resumed.step)
        run = self.run
        return reshard_note(written, run.ranks, self._on_world_size_change,  # type: ignore[arg-type]
                            run.paths if run.under_launcher else None, run.attempt)

    def _load_final(self, trainer: Trainer, final: Sealed) -> Any:
        """The run had trained to its last step and sealed it, then died before it could exit.
        Resumed there, the Trainer would train one step past ``max_steps`` (it checks the limit
        only after a step), so it is brought where the uninterrupted run's ``train()`` ended
        instead: the last weights and state, then the best model if it reloads that at the
        end, and the end-of-training summary with the same ``train_loss``."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput, speed_metrics

        start = time.time()
        trainer._load_from_checkpoint(final.path)
        trainer.state = TrainerState.load_from_json(os.path.join(final.path, "trainer_state.json"))
        self._find_best(trainer.state, final.path)
        state = trainer.state
        say(f"{final.path} is the last step ({final.step}); nothing left to train")
        loss = LoopCarry.train_loss((self._saved or {}).get("extra"), state.global_step)
        if loss is None:
            warn(f"{final.path} holds no record of the Trainer's loss sums (sealed by an older "
                 "sweeprun): train_loss is reported as 0.0")
            loss = 0.0
        metrics = speed_metrics("train", start, num_samples=0, num_steps=0)
        metrics["total_flos"] = state.total_flos
        metrics["train_loss"] = loss
        trainer.log(metrics)            # as the Trainer's end does: into log_history, to the callbacks
        if trainer.args.load_best_model_at_end and state.best_model_checkpoint is not None:
            if hasattr(trainer, "_load_best_model"):
                trainer._load_best_model()
            else:
                warn("this transformers version has no Trainer._load_best_model: the model is "
                     "the last step's, not the best")
        return TrainOutput(state.global_step, loss, metrics)

    def _find_best(self, state: Any, resumed: str) -> None:
        """Point the state's best model at its folder in this ``output_dir``. The Trainer keeps it
        as the path it had when it was saved: a run directory that moved (another mount, a
        bucket's staging folder on another machine) makes it forget the best model."""
        name = recorded_best(resumed)
        if name is None:
            return
        here = os.path.join(self.output_dir, name)
        if os.path.isdir(here):
            state.best_model_checkpoint = here
        elif state.best_model_checkpoint is not None and not os.path.isdir(state.best_model_checkpoint):
            state.best_model_checkpoint = None

    def _whole_run_train_loss(self, result: Any) -> Any:
        """``train()``'s own ``training_loss`` is that of this process's steps; the summary it
        logged (its ``metrics``) was corrected to the whole run's (:mod:`.hf_loop`)."""
        metrics = getattr(result, "metrics", None)
        if not self._loop.carried or not isinstance(metrics, dict) or "train_loss" not in metrics:
            return result
        return result._replace(training_loss=metrics["train_loss"])

    # -- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trainer is None:
            warn("trainer.train() was called directly: call run.train(trainer) instead, which "
                 "resumes from the newest sealed checkpoint and replays the RNGs exactly")
        self._rng.start(self._resumed.path if self._resumed else None, self._saved, self._rank)
        self._loop.restore((self._saved or {}).get("extra"))
        if self._resumed is not None:
            self._find_best(state, self._resumed.path)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._rng.stop()

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._rng.trained()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._rng.trained()
        now = self._clock()
        self._step_s, self._step_started = now - self._step_started, now
        run = self.run
        limit = run.time_limit_s
        if self._stop_reason is None and run.should_stop:
            self._stop_reason = run.stop_reason
        if (self._stop_reason is None and limit is not None
                and now - self._started + self._step_s + self._save_s >= limit):
            self._stop_reason = f"time limit of {limit:g} s reached"
        stop = self._stop_reason is not None
        due = (every_s := self._every_s()) is not None and now - self._saved_at >= every_s
        loss = self._loop.step_loss()
        spike = run.guard.observe(state.global_step, {} if loss is None else {"loss": loss}, {})
        if run.ranks is not None:
            # what one rank wants, every rank does at this same step: the Trainer's saves and
            # its end are collective. A stop from any rank (its SIGTERM, its time budget); the
            # time cadence from rank 0, which seals, so it alone knows the last save and its cost
            agreed = run.ranks.agree(stop, due and run.ranks.leader, {}, None, spike=spike and spike.start)
            stop, due = agreed.stop, agreed.due
            spike = combined(spike, agreed.spike, state.global_step, run.ranks)
            if stop and self._stop_reason is None:
                self._stop_reason = "another rank was asked to stop"
        if spike is not None:            # back to a sealed folder from before it; exits 75 (or 76)
            roll_back(run, spike, _SealedFolders(self), _save_grid(args))
        if stop:
            control.should_save = True
            control.should_training_stop = True
        elif state.global_step >= state.max_steps > 0:
            control.should_save = True   # the end is always sealed: a rerun finds nothing to do
        elif due:
            control.should_save = True
        self._step_ended = now
        if control.should_save:
            # before the Trainer writes in place: a process whose run was taken over (a frozen
            # machine that woke up) must not rewrite folders the live attempt relies on
            run.fence()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        start = self._clock()
        folder = os.path.join(args.output_dir, checkpoint_folder(state.global_step))
        ranks = self.run.ranks
        if ranks is None or self._rank is None:
            if os.path.isdir(folder):   # else the Trainer saved nowhere
                self._rng.save(folder, self._loop.snapshot())
                self._seal(args, state, folder, start)
            return
        # every rank writes its own file into the folder (the Trainer wrote its
        # rng_state_<rank>.pth there), then rank 0 seals it once all have: the seal lists them
        error = None
        try:
            if os.path.isdir(folder):
                self._rng.save(folder, self._loop.snapshot(), self._rank)
        except (OSError, SweeprunError) as exc:
            error = f"rank {self._rank}: {exc}"
        errors = [e for e in ranks.gather(error) if e]
        if errors:
            raise CheckpointError(f"{folder} was not completed by every rank: {'; '.join(errors)}; it "
                                  "is not sealed (the previous sealed folder still resumes)")
        _on_leader(self.run, lambda: self._seal(args, state, folder, start) if os.path.isdir(folder) else None)

    def _seal(self, args: Any, state: Any, folder: str, start: float) -> None:
        """Seal the Trainer's finished folder (one process: rank 0), upload it to an object
        store, then rotate the older ones."""
        run = self.run
        metrics_bytes = run.flush_metrics()
        crash_point("checkpoint.before_manifest")   # the Trainer's files complete, no seal yet
        run.fence()                                 # again: the save may have taken minutes
        seal(folder, state.global_step, {
            "attempt": run.attempt, "run_id": run.run_id, "sweep": run.sweep,
            "metrics_bytes": metrics_bytes, "created": time.time(),
            "final": state.global_step >= state.max_steps > 0,
            "world_size": run.ranks.world_size if run.ranks is not None else 1,
            # loss spikes: the steps of batches passed over so far, and rank 0's detector
            "data_offset": self._data_offset, "guard": run.guard.state_dict()})
        if self._store is not None:
            self._store.push(folder, run.fence)
            self._store.retain(args.save_total_limit, state.best_model_checkpoint)
        rotate(args.output_dir, args.save_total_limit, state.best_model_checkpoint, self._may_need(args, state))
        self._saved_at = self._clock()
        self._save_s = self._saved_at - start
        auto = run.auto_interval
        if auto is not None:
            # what training waited for: the Trainer's own writing (after the step ended) and the seal
            line = auto.observe(self._saved_at - max(self._step_ended, self._started))
            if line is not None:
                say(line)

    def _may_need(self, args: Any, state: Any) -> list[str]:
        """The folders a loss-spike rollback may go back to (as :meth:`~sweeprun.training.spikes.
        Guard.protect` chooses for sweeprun's checkpoints), kept by the rotation too."""
        if self.run.guard.policy is None:
            return []                    # no spikes watched: the rotation is the Trainer's own
        sealed = dict(_SealedFolders(self)._sealed())
        needed = self.run.guard.needed(list(sealed), state.global_step, _save_grid(args))
        return [os.path.basename(sealed[c]) for c in needed]

    def _every_s(self) -> float | None:
        if self.every_s is None:
            return None  # only the Trainer's own save_steps (the run has an interval it never uses)
        auto = self.run.auto_interval
        return auto.interval_s if auto is not None else self.every_s  # type: ignore[return-value]

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



class _SealedFolders:
    """The Trainer's sealed folders as a loss-spike rollback sees them
    (:class:`~sweeprun.training.rollback.Checkpoints`). The Trainer names a folder by its step
    and writes the same name again after a rollback, so a folder is named with the attempt
    that sealed it (``checkpoint-20@a3``); those set aside go to ``.sweeprun-rejected/``."""

    def __init__(self, callback: SweeprunCallback) -> None:
        self.callback = callback

    def _sealed(self) -> list[tuple[Candidate, str]]:
        found = []
        for step, path in reversed(checkpoint_folders(self.callback.output_dir)):   # oldest first
            try:
                attempt = verify(path).get("attempt")
            except ValueError:
                continue
            found.append((Candidate(f"{os.path.basename(path)}@a{attempt}", step), path))
        return found

    def candidates(self, set_aside: set[str]) -> list[Candidate]:
        return [c for c, _ in self._sealed() if c.name not in set_aside]

    def discard(self, names: set[str]) -> None:
        for candidate, path in self._sealed():
            if candidate.name in names:
                try:
                    self.callback._set_aside(path)
                except OSError as exc:
                    raise CheckpointError(f"cannot set {path} aside ({exc}); a rollback took it out "
                                          "of use: move it away by hand and run again") from None

    @property
    def data_offset(self) -> int:
        return self.callback._data_offset


def _save_grid(args: Any) -> int | None:
    """``save_steps`` when the Trainer saves on a step cadence (a rollback's targets lie on it)."""
    return args.save_steps if getattr(args.save_strategy, "value", args.save_strategy) == "steps" else None


def _skip_more(trainer: Trainer, steps: int) -> None:
    """Make the Trainer's resume pass over ``steps`` more optimizer steps of batches than its
    checkpoint's step says (a rollback's: the bad ones), into later epochs if need be."""
    own = getattr(trainer, "_init_training_state", None)
    if own is None or steps <= 0:
        if own is None:
            warn("this transformers version has no Trainer._init_training_state: after the rollback "
                 "the batches from the checkpoint on are trained again")
        return

    def init_training_state(max_steps: int, per_epoch: int, *args: Any, **kwargs: Any) -> tuple[int, int]:
        epochs, batches = own(max_steps, per_epoch, *args, **kwargs)
        per_epoch_batches = max(1, per_epoch * trainer.args.gradient_accumulation_steps)
        total = batches + steps * trainer.args.gradient_accumulation_steps
        return epochs + total // per_epoch_batches, total % per_epoch_batches

    trainer._init_training_state = init_training_state  # type: ignore[method-assign]


def _on_leader(run: Run, work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0 alone (in a process without ranks, here), its result or its error
    given to every rank: folders are chosen, set aside and sealed once, and no rank goes on
    while another raised (it would wait in the next collective until the group's timeout)."""
    ranks = run.ranks
    if ranks is None:
        return work()
    outcome: Any = None
    if ranks.leader:
        try:
            outcome = work()
        except Exception as exc:   # raised below, on every rank
            outcome = exc
    outcome = ranks.gather(outcome)[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _rotate_after_the_seal(trainer: Trainer) -> None:
    """Keep the Trainer from rotating inside its save (``save_total_limit`` is read there);
    :func:`.sealed.rotate` applies the same rule once the new folder is sealed."""
    save = getattr(trainer, "_save_checkpoint", None)
    if save is None or getattr(save, "_sweeprun", False):
        if save is None:
            warn("this transformers version has no Trainer._save_checkpoint: it rotates its "
                 "folders before sweeprun seals the new one; a kill in between resumes from an "
                 "older folder")
        return

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        training_args = trainer.args
        limit = training_args.save_total_limit
        try:
            training_args.save_total_limit = None
        except Exception:   # frozen arguments: the Trainer rotates as it always did
            return save(*args, **kwargs)
        try:
            return save(*args, **kwargs)
        finally:
            training_args.save_total_limit = limit

    save_checkpoint._sweeprun = True  # type: ignore[attr-defined]
    trainer._save_checkpoint = save_checkpoint
