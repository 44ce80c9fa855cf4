"""The training-side API: parameters, run directory, checkpoint/resume, metrics, preemption.

A script calls :func:`~.start.init` once, registers what makes up its state with
:meth:`Run.track`, calls :meth:`Run.restore`, then :meth:`Run.end_step` after each
optimizer step. Everything else (cadence, retention, SIGTERM, time budget, the
metrics file) follows from that, so the promise holds without the script's help:
a run resumed after any interruption ends with the same parameters, bit for bit on
CPU, as the same run never interrupted.

Saves are asynchronous by default: the training thread waits only for a copy of the
state in host memory, and a background thread writes it (:class:`.writer.BackgroundSave`).
Every exit path (a stop request, :meth:`Run.finish`, :meth:`Run.close`, the end of the
interpreter) waits for that write, and its error is raised on the training thread.

The :class:`Run` lives here; :mod:`.start` makes one from the launcher's environment or a
standalone folder, and :mod:`.load` reads a run's checkpoints from outside it.

This module does not import torch at import time (:mod:`.state` and :mod:`.writer`
load it when a save or restore needs it).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any, Literal

from ..errors import CheckpointError, LeaseLost
from ..faults import crash_point
from ..runenv import PREEMPTED_EXIT
from ..store import RunPaths
from .cadence import AutoInterval
from .checkpoints import FORMAT, CheckpointDir, Manifest, Owner, Retention, say
from .metrics import MetricsLog, NoMetrics, plain
from .ranks import Ranks, check_reduce
from .spikes import Guard, Spikes, combined
from .state import (
    HostBuffers,
    Stateful,
    capture_rng,
    from_safe,
    restore_rng,
    stateful,
    sync_copies,
    to_safe,
)
from .writer import BackgroundSave, CheckpointWriter, Snapshot


class Run:
    """One run of a training script, under the launcher or standalone. Create with :func:`init`."""

    def __init__(self, *, params: dict[str, Any], paths: RunPaths, owner: Owner, attempt: int,
                 every_s: float | Literal["auto"] | None, every_steps: int | None,
                 retention: Retention, time_limit_s: float | None, stop_signals: Iterable[int],
                 rng: bool, clock: Callable[[], float], under_launcher: bool = False,
                 async_save: bool = True, auto: AutoInterval | None = None,
                 fence_attempts: bool = False, ranks: Ranks | None = None,
                 on_world_size_change: str = "reshard", spikes: Spikes | None = None,
                 oom_retry: int = 0) -> None:
        self.params = params
        self.paths = paths
        self.run_id = owner.run_id
        self.sweep = owner.sweep
        self.attempt = attempt
        self.step = 0
        """Optimizer steps completed; :meth:`end_step` advances it."""
        self.epoch = 0
        """Yours to advance; saved and restored with the rest."""
        self.extras: dict[str, Any] = {}
        """Values saved with the state: numbers, strings, bools, None, tensors, numpy arrays,
        and lists, tuples, dicts (also OrderedDict, Counter, defaultdict of a builtin factory)
        and sets of those. State carried between steps, such as an RNN's hidden state, goes here."""
        self.every_s = every_s
        self.every_steps = every_steps
        self.async_save = async_save
        """Cadence saves overlap training (the default); ``False`` writes them before returning."""
        self._auto = auto if every_s == "auto" else None
        self.time_limit_s = time_limit_s
        self.capture_rng = rng
        self._clock = clock
        self._objects: dict[str, Stateful] = {}
        self._dir = CheckpointDir(paths.fs, paths.checkpoints)
        self._writer = CheckpointWriter(self._dir, owner, attempt, retention,
                                        attempts=paths.attempts if fence_attempts else None)
        self._background = BackgroundSave()
        self._buffers = HostBuffers()
        self._under_launcher = under_launcher
        self._resume_bytes: int | None = 0         # metrics.jsonl bytes to keep: none when fresh
        self._metrics: MetricsLog | NoMetrics = (
            NoMetrics() if ranks is not None and not ranks.leader else MetricsLog(paths, attempt))
        self._ranks = ranks
        """With several ranks (torchrun): what they decide together (:mod:`.ranks`, :mod:`.sharded`)."""
        self._on_world_size_change = on_world_size_change
        self._last_metrics: dict[str, float] = {}
        self._started = self._step_started = self._saved_at = clock()
        self._saved_step: int | None = None
        self._step_s = self._save_s = 0.0
        self._stop_reason: str | None = None
        self._due_pending = False                  # a cadence save fell inside an accumulation
        self._optimizer_steps = 0                  # steps of tracked optimizers (their post hooks)
        self._steps_seen = 0                       # ... as of the last end_step
        self._hooked = 0                           # tracked optimizers that report their steps
        self._unhooked = 0                         # ... and those that cannot
        self._window = 1                           # end_step calls per optimizer step, last seen
        self._since_boundary = 0                   # end_step calls since the last optimizer step
        #: A rollback moves :attr:`step` with the data (a loop taking its batch from the step skips
        #: the batches too); ``False`` where the framework counts its own steps (Lightning).
        self.steps_follow_data = True
        #: Earlier attempts of this run that ran out of memory (SWEEPRUN_OOM_RETRY, ``on_oom:``).
        self.oom_retry = oom_retry
        self.guard = Guard(spikes, lambda: self.step, every_steps, self._writer)  # loss spikes
        self._previous_handlers: dict[int, Any] = {}
        self._install_handlers({signal.SIGTERM, signal.SIGINT, *stop_signals})

    @property
    def dir(self) -> str:
        """The run directory as a path (local) or fsspec URL."""
        return self.paths.url

    # -- registering and restoring state ------------------------------------------------

    def track(self, **objects: Any) -> Run:
        """Register state to save under these names: models, optimizers, LR schedulers, a
        GradScaler, samplers or StatefulDataLoaders, numpy/torch Generators, any object with
        ``state_dict()``/``load_state_dict()``. Global RNGs are always captured."""
        for name, obj in objects.items():
            if obj is not None:
                self._objects[name] = stateful(name, obj)
                self._watch_optimizer(obj)
        return self

    def _watch_optimizer(self, obj: Any) -> None:
        """Count the steps of a tracked optimizer, so that :meth:`end_step` knows whether the
        batch it ends stepped one (see there). An optimizer-like object that cannot report
        its steps turns that detection off: every call is then a boundary, as before."""
        if not (hasattr(obj, "param_groups") and callable(getattr(obj, "step", None))):
            return
        register = getattr(obj, "register_step_post_hook", None)

        def stepped(*_: Any) -> None:
            self._optimizer_steps += 1

        try:
            if not callable(register):
                raise TypeError("no register_step_post_hook")
            register(stepped)
        except (AttributeError, TypeError, RuntimeError):
            # a wrapper (accelerate's AcceleratedOptimizer) that forwards the name but not the
            # hook's storage: its steps cannot be seen, so every end_step counts as one
            self._unhooked += 1
            return
        self._hooked += 1

    def restore(self) -> bool:
        """Load the newest checkpoint that verifies into every tracked object; ``False`` when
        the run starts fresh. Also cuts metrics.jsonl back to its length at that checkpoint."""
        from . import rollback
        from .restore import load_objects, load_one, reshard_note, same_on_every_rank

        records, set_aside = rollback.restore_records(self)
        loaded = self._dir.load_latest(Owner(self.run_id, self.sweep),
                                       load=lambda m: load_one(self._dir, m, self._ranks), skip=set_aside)
        same_on_every_rank(loaded, self._ranks)
        record = rollback.applies(records, loaded.manifest.attempt if loaded else None)
        if loaded is None and record is None:
            self._open_metrics()
            return False
        if loaded is not None:
            state = loaded.state
            note = reshard_note(loaded.manifest, self._ranks, self._on_world_size_change,
                                self.paths if self._under_launcher else None, self.attempt)
            load_objects(self._dir, loaded, self._objects, self._ranks)
            if self.capture_rng and state.get("rng") is not None:
                restore_rng(state["rng"])
            self.epoch = int(state["epoch"])
            self.extras = from_safe(state["extras"])
            self.guard.load_state_dict(state.get("guard"))
        if record is not None:                      # data position, step and metrics as it left them
            rollback.apply(self, record, loaded)
        elif loaded is not None:
            self._resume(int(loaded.state["step"]), loaded.state.get("metrics_bytes"), loaded.manifest.attempt)
            say(f"resumed from {loaded.manifest.data} (step {self.step}, epoch {self.epoch}){note}")
        self._saved_step, self._saved_at = (None if record else self.step), self._clock()
        self._step_started = self._saved_at
        return True

    def _open_metrics(self, resume_attempt: int | None = None) -> None:
        if not self._metrics.opened:
            self._metrics.open(resume_step=self.step, resume_bytes=self._resume_bytes,
                               resume_attempt=resume_attempt)

    # -- for integrations: a framework that saves and restores its own checkpoints ------
    #
    # The Hugging Face Trainer and Lightning decide when a step ends and (the Trainer)
    # write their own files. What they still need from the run is below: where the
    # resumed checkpoint left the metrics, the fence before writing, the metrics'
    # length to record with a checkpoint, the stop request, and the end of training.

    def resume_at(self, step: int, metrics_bytes: int | None, attempt: int | None = None) -> None:
        """Continue from a checkpoint that the framework restores itself: :attr:`step`
        becomes ``step`` and metrics.jsonl is cut back to ``metrics_bytes``, the
        :meth:`flush_metrics` value recorded with that checkpoint (``None``, or a value
        that does not fit the file: keep the whole entries up to ``step``). ``attempt``
        is the attempt that wrote the checkpoint: on an object store each attempt keeps
        its own metrics object, and the recorded length is a length of that one.

        Call it before the first :meth:`log` or save (which open the file for a fresh
        start); :meth:`restore` calls it for sweeprun's own checkpoints."""
        if self._metrics.opened:
            raise RuntimeError("resume_at() must come before the run's first log or save: "
                               "metrics.jsonl is already open")
        self._resume(step, metrics_bytes, attempt)

    def _resume(self, step: int, metrics_bytes: Any, attempt: int | None) -> None:
        self.step = int(step)
        usable = isinstance(metrics_bytes, int) and not isinstance(metrics_bytes, bool) and metrics_bytes >= 0
        self._resume_bytes = metrics_bytes if usable else None
        self._open_metrics(attempt)

    def flush_metrics(self) -> int:
        """Make every metrics entry so far durable; the length of the run's metrics in bytes,
        to record with the checkpoint about to be written (give it back to :meth:`resume_at`).
        Flushed first, so the file is never shorter than a checkpoint says it was."""
        self._open_metrics()
        self._metrics.flush()
        return self._metrics.size

    def fence(self) -> None:
        """Raise :class:`~sweeprun.errors.LeaseLost` if a newer attempt of this run has started
        or saved elsewhere (a frozen machine that woke up after its run was given to
        another worker). Call it right before the framework writes checkpoint files, and
        again before sealing them: the process that lost the run must write nothing, and
        from then on this run writes no metrics either."""
        try:
            self._writer.fence()
        except LeaseLost:
            self._metrics.abandon()        # the run's metrics are the new owner's now
            raise

    @property
    def stop_reason(self) -> str | None:
        """Why a stop was requested (``"SIGTERM received"``, the time budget), or ``None``.
        A framework whose loop this run does not drive reads it after each step to save,
        stop and exit with 75 (:data:`~sweeprun.runenv.PREEMPTED_EXIT`) itself."""
        return self._stop_reason

    @property
    def ranks(self) -> Ranks | None:
        """This process's place among the run's ranks (``None`` without a process group): an
        integration whose framework drives the loop takes its decisions together on it."""
        return self._ranks

    @property
    def under_launcher(self) -> bool:
        """Started by ``sweeprun launch`` (SWEEPRUN_RUN_DIR was set), not standalone."""
        return self._under_launcher

    def mark_finished(self, step: int | None = None) -> None:
        """Record that the script reached the end of training (``attempts/<n>.finished``), once
        its final checkpoint is durable: under the launcher, exit 0 without it (a script
        that caught SIGTERM and returned) does not make the run done. Standalone it does
        nothing. :meth:`finish` calls it for sweeprun's own checkpoints."""
        if self._under_launcher and (self._ranks is None or self._ranks.leader):
            crash_point("training.before_finished")
            self.paths.write_marker(self.paths.api_finished(self.attempt), self.attempt,
                          self.step if step is None else step)

    # -- the training loop --------------------------------------------------------------

    def log(self, *, reduce: str | dict[str, str] | None = None, **metrics: Any) -> None:
        """Append ``{"step": run.step, **metrics}`` to metrics.jsonl (e.g. an evaluation).

        In a multi-rank run rank 0 writes the file: without ``reduce`` its values are the
        ones logged; ``reduce="mean"`` (``"sum"``, ``"min"``, ``"max"``, or a dict naming one
        per metric) logs the reduction across ranks instead, and then every rank must call
        ``log`` with the same names (it is a collective). With one process it changes nothing."""
        if reduce is not None and self._ranks is not None:
            metrics = self._ranks.agree(False, False, metrics, reduce)[2]  # a collective
        elif reduce is not None:
            check_reduce(metrics, reduce)      # one process: nothing to reduce, but the same rules
        self._open_metrics()
        values = {k: plain(v) for k, v in metrics.items()}
        self._last_metrics.update({k: v for k, v in values.items() if isinstance(v, (int, float))})
        self._metrics.append({"step": self.step, **values})

    def end_step(self, *, optimizer_stepped: bool | None = None,
                 reduce: str | dict[str, str] | None = None, **metrics: Any) -> None:
        """Call after each optimizer step (or each batch): counts it, logs its metrics, saves
        when due, and on a stop request (signal or time budget) saves and exits with
        PREEMPTED_EXIT (75).

        Under gradient accumulation a checkpoint must not fall between the batches of one
        optimizer step: the gradients summed so far are in no checkpoint, so the resumed
        run's next step would see fewer batches. A call after a batch that did not step
        the optimizer is counted and logged, but a save or a stop that falls due there
        waits for the next call that ends an optimizer step. Say which it is with
        ``optimizer_stepped``; left ``None``, it is whether any tracked optimizer stepped
        since the previous call (every call counts as a step when no tracked optimizer
        can report its steps).

        In a multi-rank run every rank calls it at every step: a stop or a save that any rank
        wants happens on all of them at this same step, and ``reduce`` (see :meth:`log`)
        reduces the named metrics across ranks before rank 0 logs them."""
        now = self._clock()
        if self._ranks is None:
            self._collect(block=False)         # a failed background save surfaces here
        self.step += 1
        self._step_s, self._step_started = now - self._step_started, now
        boundary = self._boundary(optimizer_stepped)
        if self._stop_reason is None and self.time_limit_s is not None:
            # inside an accumulation, the rest of it must fit too before the save
            steps = self._window if boundary else max(1, self._window - self._since_boundary)
            if now - self._started + steps * self._step_s + self._save_s >= self.time_limit_s:
                self._stop_reason = f"time limit of {self.time_limit_s:g} s reached"
        stop, due = self._stop_reason is not None, self._due(now)
        spike = self.guard.observe(self.step, metrics, self._objects)
        if self._ranks is not None:            # what one rank wants, all do, at this step
            agreed = self._ranks.agree(stop, due, metrics, reduce, self._background.failed,
                                       spike and spike.start, self.guard.suspected)
            stop, due, metrics, self.guard.suspected_elsewhere = (*agreed[:3], agreed.suspected)
            if agreed.failed:
                self._collect(block=True)      # its error, on every rank at this same step
            if stop and self._stop_reason is None:
                self._stop_reason = "another rank was asked to stop"
            spike = combined(spike, agreed.spike, self.step, self._ranks)
        elif reduce is not None:
            check_reduce(metrics, reduce)
        if metrics:
            self.log(**metrics)
        if spike is not None:
            from .rollback import roll_back
            roll_back(self, spike)
        if not boundary:
            self._due_pending = self._due_pending or due
            return
        if stop:
            manifest = self._save_durably()
            self.close()
            say(f"{self._stop_reason}; saved {manifest.data} at step {self.step}; "
                f"exiting with {PREEMPTED_EXIT} (resumable)")
            raise SystemExit(PREEMPTED_EXIT)
        if due or self._due_pending:
            self._due_pending = False
            start = self._clock()
            self.save(wait=not self.async_save)
            if self._auto is not None:
                line = self._auto.observe(self._clock() - start)
                if line is not None:
                    say(line)

    def _boundary(self, optimizer_stepped: bool | None) -> bool:
        """Whether this end_step closes an optimizer step (a point a checkpoint may fall on)."""
        if optimizer_stepped is None:
            stepped = self._optimizer_steps != self._steps_seen
            optimizer_stepped = stepped or not self._hooked or bool(self._unhooked)
        self._steps_seen = self._optimizer_steps
        self._since_boundary += 1
        if optimizer_stepped:
            self._window, self._since_boundary = self._since_boundary, 0
        return optimizer_stepped

    @property
    def saved_step(self) -> int | None:
        """The step of the newest save started by this process, durable or still being written
        (the restored step after :meth:`restore`); ``None`` before any. An integration that
        waits for a checkpoint newer than some event lists :meth:`checkpoints` only once this
        has moved, not at every step."""
        return self._saved_step

    @property
    def auto_interval(self) -> AutoInterval | None:
        """With ``every_s="auto"``, what picks the interval between saves. An integration
        whose framework writes its own checkpoints (the Trainer) feeds it each save's cost
        with ``observe(seconds)`` and asks ``interval_s`` when the next save is due."""
        return self._auto

    @property
    def should_stop(self) -> bool:
        """A stop was requested; the next :meth:`end_step` that ends an optimizer step will
        save and exit."""
        return self._stop_reason is not None

    def _due(self, now: float) -> bool:
        """Step cadence falls on multiples of ``every_steps`` whatever the last save was (a
        SIGTERM save at step 7 does not move the every-5 saves to 12, 17...)."""
        if self.step == self._saved_step:
            return False
        every_s = self._auto.interval_s if self._auto is not None else self.every_s
        return ((self.every_steps is not None and self.step % self.every_steps == 0)
                or (isinstance(every_s, (int, float)) and now - self._saved_at >= every_s))

    # -- saving -------------------------------------------------------------------------

    def snapshot(self, copy: bool = True) -> Snapshot:
        """The state as of now in host memory: the part of a save that must block training.
        ``copy=False`` shares CPU tensors instead of cloning them, for a save written
        before training goes on. The copies reuse the previous snapshot's buffers, so a
        snapshot is only valid until the next one."""
        into: bool | HostBuffers = False
        if copy:
            self._background.wait()  # the buffers are about to be overwritten: no write may read them
            into = self._buffers
        try:
            state = {"format": FORMAT, "step": self.step, "epoch": self.epoch,
                     "metrics_bytes": self._metrics.size,
                     "extras": to_safe(self.extras, "run.extras", into),
                     "objects": {name: to_safe(obj.state_dict(), f"the state of {name!r}", into)
                                 for name, obj in self._own_objects().items()},
                     "rng": capture_rng() if self.capture_rng else None,
                     "guard": self.guard.state_dict()}
        except TypeError as exc:
            raise CheckpointError(f"cannot save step {self.step}: {exc}") from None
        if copy:
            sync_copies()
            self._buffers.cycle()
        return Snapshot(step=self.step, state=state, metrics=dict(self._last_metrics))

    def save(self, wait: bool = True) -> Manifest | None:
        """Save now; the checkpoint's manifest once it is durable.

        First the fence (a process whose run was taken over writes nothing, not even
        metrics), then metrics, made durable, then the checkpoint that records their
        length: a crash in between leaves extra entries, which the next restore cuts.

        ``wait=False`` (what the cadence does unless ``async_save=False``) returns
        ``None`` as soon as the state is copied to host memory; the same steps then run
        on a background thread. :meth:`wait` gives its manifest; its error is raised by
        the next :meth:`end_step`, :meth:`save`, :meth:`wait`, :meth:`finish` or
        :meth:`close`. A save waits for the one in flight first: at most one snapshot
        exists at a time.
        """
        if wait or not self.async_save:
            return self._save_durably()
        self._open_metrics()
        start = self._clock()
        self._collect(block=True)
        self._write_in_background()
        self._saved_step, self._saved_at = self.step, self._clock()
        self._save_s = self._saved_at - start + self._background.write_s
        return None

    def _save_durably(self) -> Manifest:
        self._open_metrics()
        start = self._clock()
        self._collect(block=True)
        manifest = self._write_now()
        self._saved_step, self._saved_at = self.step, self._clock()
        self._save_s = self._saved_at - start
        return manifest

    def _write_now(self) -> Manifest:
        """The whole save on this thread, from the live tensors: nothing is copied."""
        try:
            if self._ranks is not None:
                return self._write_sharded()
            folder = self._writer.fence()
            self._metrics.flush()
            return self._writer.write(self.snapshot(copy=False), folder)
        except LeaseLost:
            self._metrics.abandon()            # the run's metrics are the new owner's now
            raise

    def _own_objects(self) -> dict[str, Stateful]:
        """What this process saves itself: everything but, with several ranks, the models
        and optimizers (DCP saves those, sharded: :mod:`.sharded`)."""
        if self._ranks is None:
            return self._objects
        from .sharded import is_sharded_object

        return {n: o for n, o in self._objects.items() if not is_sharded_object(o)}

    def _write_sharded(self, background: bool = False) -> Manifest | None:
        """Every rank's part of one checkpoint, committed by rank 0 once all are durable; in
        the background, from host copies, each rank's thread on the save group."""
        from .sharded import ShardedWriter, dcp_state, staged

        tensors = dcp_state({n: o for n, o in self._objects.items() if n not in self._own_objects()})
        own = self.snapshot(copy=background)
        writer = ShardedWriter(self._writer, self._ranks, background)  # type: ignore[arg-type]
        if not background:
            return writer.write(self.step, own.state, tensors, own.metrics, flush=self._metrics.flush)
        tensors, flush = staged(tensors), self._metrics.flusher()
        self._background.start(lambda: writer.write(own.step, own.state, tensors, own.metrics, flush=flush),
                               self._clock)
        return None

    def _write_in_background(self) -> None:
        if self._ranks is not None:
            self._write_sharded(background=True)
            return
        snapshot = self.snapshot()
        flush_metrics, writer = self._metrics.flusher(), self._writer

        def job() -> Manifest:
            crash_point("checkpoint.snapshot_taken")
            folder = writer.fence()            # here, right before the write: a late save is fenced too
            flush_metrics()
            return writer.write(snapshot, folder)

        self._background.start(job, self._clock)

    def _collect(self, block: bool) -> None:
        """Raise the error of a finished background save (with ``block``, wait for it first)."""
        try:
            if block:
                self._background.wait()
            else:
                self._background.poll()
        except LeaseLost:
            self._metrics.abandon()
            raise

    def wait(self) -> Manifest | None:
        """Block until the save in flight is durable: its manifest (``None`` if none was in
        flight), or its error."""
        self._open_metrics()
        try:
            return self._background.wait()
        except LeaseLost:
            self._metrics.abandon()
            raise

    def checkpoints(self) -> list[Manifest]:
        """The manifests in the run's checkpoints folder, oldest first."""
        self._writer.settle()
        return self._dir.manifests()

    def finish(self) -> Manifest:
        """The final save (always written, even right after a cadence save), then :meth:`close`.

        Under the launcher, once that checkpoint is durable, ``attempts/<n>.finished`` says
        the script reached its end: exit 0 without it (a script that caught SIGTERM and
        returned) does not make the run done.

        After a stop request (SIGTERM, the time budget) the run did not end, it was
        stopped: a loop that breaks on :attr:`should_stop` and falls through to here saves
        and exits with 75 (resumable) instead of claiming the end of training. A loop
        that was already done resumes, finds nothing left, and finishes then.

        In a multi-rank run every rank calls it: rank 0 marks the run finished only once every
        rank's part of the final checkpoint is durable, and a stop seen by any rank stops all."""
        if self._ranks is not None:
            reasons = self._ranks.gather(self._stop_reason)
            self._stop_reason = self._stop_reason or next((r for r in reasons if r), None)
        manifest = self._save_durably()
        self.close()
        if self._stop_reason is not None:
            say(f"{self._stop_reason}; saved {manifest.data} at step {self.step}; "
                f"exiting with {PREEMPTED_EXIT} (resumable)")
            raise SystemExit(PREEMPTED_EXIT)
        self.mark_finished()
        return manifest

    def close(self) -> None:
        """Wait for the save in flight, flush metrics, give the signal handlers back.
        Idempotent. The error of a failed background save is raised last, once the rest
        is closed."""
        error = self._close()
        if error is not None:
            raise error

    def _close(self) -> BaseException | None:
        error = self._background.drain()
        self._writer.settle(unlinks=True)   # retention and the unlinks left to helper threads
        if isinstance(error, LeaseLost):
            self._metrics.abandon()
        self._metrics.close()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        return error

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.finish()
            return
        error = self._close()  # mid-step state is not worth saving; the last checkpoint is
        if error is not None and error is not exc:
            say(f"error: the last background checkpoint write failed too: {' '.join(str(error).split())}")

    # -- preemption -----------------------------------------------------------------------

    def _install_handlers(self, signals: set[int]) -> None:
        """Only the main thread may install handlers; elsewhere stops come from the time budget."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in signals:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
        self._stop_reason = f"{signal.Signals(signum).name} received"
