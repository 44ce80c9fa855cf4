"""Starting a run: :func:`init` reads the launcher's environment (or a standalone folder),
checks all of it before anything is written, and returns a :class:`~.run.Run`.

Bad input is one :class:`~sweeprun.errors.SweeprunError` line; an uncaught one ends the
script as the CLI does (:func:`_exit_2_on_sweeprun_errors`).
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal

from .. import settings
from ..errors import CheckpointError, LeaseLost, SpecError, SweeprunError
from ..redact import redact
from ..rollbacks import read_rollbacks
from ..runenv import OOM_EXIT, PREEMPTED_EXIT, RUN_DIR, RUN_ID
from ..store import JSON_MAX_BYTES, RunPaths, open_store, read_regular, store_errors
from .cadence import PRIOR_MTBI_S, AutoInterval
from .checkpoints import CheckpointDir, Owner, Retention, say
from .ranks import detect
from .run import Run
from .spikes import Spikes
from .writer import join_in_flight

#: The cadence when neither ``every_s`` nor ``every_steps`` is given: the interval that
#: wastes least for this run's measured save cost and its sweep's interruption rate. A
#: fixed 5 minutes lost up to 4.6x more at one interruption an hour (benchmarks/lost_work.py).
DEFAULT_EVERY_S: Literal["auto"] = "auto"


def _exit_2_on_sweeprun_errors() -> None:
    """Make an uncaught :class:`SweeprunError` end the script as the CLI does: one line, exit 2.

    A checkpoint from another run or a full disk is the user's to fix, and a traceback
    through the training loop only hides the message. :class:`LeaseLost` exits 75
    instead: the run is alive elsewhere, so this attempt is neither a success nor a
    failure. The script can still catch the error; only an uncaught one is turned into
    the line.
    """
    previous = sys.excepthook
    if getattr(previous, "_sweeprun", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if is_out_of_memory(value):
            previous(kind, value, tb)          # where it ran out: the traceback is the user's clue
            _out_of_memory(value)
        if not issubclass(kind, SweeprunError):
            previous(kind, value, tb)
            return
        # the training side's console exit: the script's stderr goes to the user's terminal
        say(f"error: {redact(' '.join(str(value).split()))}")
        sys.stdout.flush()
        join_in_flight()  # os._exit skips the interpreter's wait for a save in flight
        os._exit(PREEMPTED_EXIT if issubclass(kind, LeaseLost) else 2)

    hook._sweeprun = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def is_out_of_memory(error: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (CUDA, or another accelerator's), or the RuntimeError older
    code paths raise for it; recognised by name, so nothing here imports torch."""
    kind = type(error)
    if kind.__name__ == "OutOfMemoryError" and kind.__module__.split(".")[0] == "torch":
        return True
    return isinstance(error, RuntimeError) and (str(error).startswith("CUDA out of memory")
                                                or "CUDA error: out of memory" in str(error))


#: The run this process started last (:func:`init`): what an out-of-memory exit reports.
_CURRENT: list[weakref.ref[Run]] = []


def _out_of_memory(error: BaseException) -> None:
    """End the attempt as ``oom`` (:data:`~sweeprun.runenv.OOM_EXIT`): under the launcher,
    ``attempts/<n>.oom`` with the step first, so the launcher records it as such and, with
    ``on_oom:`` retries, starts it again with ``SWEEPRUN_OOM_RETRY`` set."""
    run = _CURRENT[0]() if _CURRENT else None
    first = redact((str(error).strip().splitlines() or [type(error).__name__])[0])[:300]
    step = run.step if run is not None else None
    if run is not None and run.under_launcher:
        try:
            run.paths.write_marker(run.paths.api_oom(run.attempt), run.attempt, step or 0, error=first)
        except (SweeprunError, OSError) as exc:
            say(f"warning: could not record the out-of-memory end in the run folder: {exc}")
    where = f" at step {step}" if step is not None else ""
    say(f"out of memory{where}: {first}; exiting with {OOM_EXIT} (its last checkpoint stays; the "
        "sweep file's `on_oom: {retries: N, halve: [batch_size]}` retries it with a smaller batch)")
    sys.stdout.flush()
    join_in_flight()
    os._exit(OOM_EXIT)


def init(params: Mapping[str, Any] | None = None, local_dir: str | os.PathLike[str] | None = None,
         *, every_s: float | Literal["auto"] | None = None, every_steps: int | None = None,
         min_every_s: float = 30.0, max_every_s: float = 3600.0, keep_last: int = 3,
         best: str | None = None, mode: Literal["min", "max"] = "min",
         time_limit_s: float | None = None, stop_signals: Iterable[int] = (), rng: bool = True,
         async_save: bool | None = None, spikes: bool | Spikes | Mapping[str, Any] | None = None,
         tracker: str | None = None,
         clock: Callable[[], float] = time.monotonic, env: Mapping[str, str] | None = None) -> Run:
    """Start (or continue) this process's run.

    Under ``sweeprun launch`` the parameters and directory come from the environment
    (SWEEPRUN_PARAMS, or the run's params.json when the launcher left a large one out;
    SWEEPRUN_RUN_DIR); standalone, from ``params`` and ``local_dir`` (a path or fsspec
    URL). Saves happen every ``every_s`` seconds and/or at every multiple of
    ``every_steps`` steps, keeping the last ``keep_last`` plus the best by metric
    ``best``. ``every_s="auto"`` (the default when neither is given) picks the interval
    from the measured cost of a save and the interruption rate (SWEEPRUN_MTBI_S, else a
    6 h prior), between ``min_every_s`` and ``max_every_s`` (:mod:`.cadence`).
    Cadence saves overlap training unless ``async_save=False`` (or
    SWEEPRUN_ASYNC_SAVE=0). ``time_limit_s`` (or
    SWEEPRUN_TIME_LIMIT, the smaller wins) makes the run save and exit with 75 before
    that many seconds have passed. ``rng=False`` leaves RNG states out: only to show
    why they matter. ``spikes=True`` (or a :class:`~.spikes.Spikes`) watches the loss of
    each ``end_step``: a NaN, an Inf or a spike rolls the run back to a checkpoint from
    before it and past its batches, at most ``max_rollbacks`` times, then ends it
    ``diverged`` (:mod:`.rollback`). ``tracker="mlflow"`` or ``"tensorboard"`` sends every
    metrics line to that tracker too, one tracker run for the run's whole life, each step
    once across resumes (:mod:`sweeprun.trackers`). ``clock`` and ``env`` are for tests.

    Nothing is written before the environment and the folder have been checked: bad
    input is one :class:`SweeprunError` line (exit 2 when uncaught).
    """
    env = os.environ if env is None else env
    _exit_2_on_sweeprun_errors()
    policy_spikes = Spikes.of(spikes)
    run_dir = settings.RUN_DIR.get(env)
    policy = settings.ON_WORLD_SIZE_CHANGE.value(env)
    ranks = detect(env)                # several ranks: every one of them calls init()
    env_limit = settings.TIME_LIMIT.get(env)
    if every_steps is not None and (isinstance(every_steps, bool) or every_steps < 1):
        raise ValueError(f"every_steps must be a positive number of steps, got {every_steps!r}")
    if every_s is None and every_steps is None:
        every_s = DEFAULT_EVERY_S
    auto = None
    if isinstance(every_s, str):
        if every_s != "auto":
            raise ValueError(f"every_s must be a number of seconds or 'auto', got {every_s!r}")
        mtbi_s = settings.MTBI_S.get(env)
        auto = AutoInterval(min_s=min_every_s, max_s=max_every_s,
                            mtbi_s=PRIOR_MTBI_S if mtbi_s is None else mtbi_s,
                            mtbi_measured=mtbi_s is not None)
    if async_save is None:
        async_save = bool(settings.ASYNC_SAVE.get(env))
    attempt: int | None
    fence_attempts = False
    if run_dir:
        attempt = settings.ATTEMPT.get(env)  # None: counted as standalone
        fence_attempts = attempt is not None   # numbered by the launcher, in attempts/
        store = open_store(run_dir)
        paths = RunPaths(store.fs, store.root)
        params = _launcher_params(env, paths, params)
        owner = Owner(settings.RUN_ID.get(env), settings.SWEEP.get(env))
        folder = paths.run_id
        if owner.run_id is not None and folder != owner.run_id:
            # the launcher names every run's folder by its id: anything else is another run's
            raise CheckpointError(f"{RUN_DIR}={paths.url} is the folder of run {folder}, not of "
                                  f"{RUN_ID}={owner.run_id}; they are set together by sweeprun "
                                  "launch: unset both to run standalone")
    elif local_dir is not None:
        attempt = None
        store = open_store(os.fspath(local_dir))
        paths = RunPaths(store.fs, store.root)
        params, owner = dict(params or {}), Owner(None, None)
        _refuse_sweep_run_dir(paths)
    else:
        raise CheckpointError(f"no run directory: {RUN_DIR} is not set (the script is not under "
                              "sweeprun launch) and init() got no local_dir; pass local_dir=...")
    directory = CheckpointDir(paths.fs, paths.checkpoints)
    names = directory.names()                        # also refuses a symlinked folder
    if attempt is None:  # standalone: newer than anything here, so "newest attempt wins" holds
        # (a rollback's record too: what the Trainer seals after it must be newer than it)
        attempt = 1 + max([n.attempt for n in names] + [r.attempt for r in read_rollbacks(paths.fs, paths.rollbacks)],
                          default=0)
        if ranks is not None:          # one attempt for all ranks: rank 0's count
            attempt = ranks.gather(attempt)[0]
    feed = None
    if tracker is not None:       # checked on every rank before any write; rank 0 logs
        from ..trackers import check, make
        check(tracker, paths)
        feed = make(tracker, paths, owner.run_id, dict(params)) if ranks is None or ranks.leader else None
    if run_dir and (ranks is None or ranks.leader):
        paths.write_marker(paths.api_started(attempt), attempt, 0,
                     **({"world_size": ranks.world_size} if ranks else {}))
    limits = [t for t in (time_limit_s, env_limit) if t is not None]
    run = Run(params=dict(params), paths=paths, owner=owner,
               attempt=attempt, every_s=every_s, every_steps=every_steps,
               retention=Retention(keep_last=keep_last, best=best, mode=mode),
               time_limit_s=min(limits) if limits else None, stop_signals=stop_signals, rng=rng,
               clock=clock, under_launcher=bool(run_dir), async_save=async_save, auto=auto,
               fence_attempts=fence_attempts, ranks=ranks, on_world_size_change=policy,
               spikes=policy_spikes, oom_retry=settings.OOM_RETRY.value(env))
    if feed is not None:
        from ..trackers import TrackedMetrics, process_status
        run._metrics = TrackedMetrics(run._metrics, feed, lambda: process_status(run.should_stop))
    _CURRENT[:] = [weakref.ref(run)]
    return run


def _launcher_params(env: Mapping[str, str], paths: RunPaths,
                     fallback: Mapping[str, Any] | None) -> dict[str, Any]:
    """SWEEPRUN_PARAMS, else the run's params.json (the launcher leaves a parameter too large
    for the environment out of it), else what the script passed."""
    params = settings.PARAMS.get(env)
    if params is not None:
        return params
    with store_errors("read", paths.params):
        present = paths.fs.exists(paths.params)
    if not present:
        return dict(fallback or {})
    try:
        return settings.parse_json_object(read_regular(paths.fs, paths.params, JSON_MAX_BYTES).decode())
    except UnicodeDecodeError as exc:
        raise SpecError(f"{paths.params} is not UTF-8 JSON ({exc}); it is written by sweeprun launch") from None
    except ValueError as exc:
        raise SpecError(f"{paths.params} {exc}; it is written by sweeprun launch") from None


def _refuse_sweep_run_dir(paths: RunPaths) -> None:
    """A standalone run must not take over a sweep's run: its saves would prune that run's
    checkpoints. A launcher's run directory has params.json and attempts/, and its
    checkpoints name their run id."""
    with store_errors("read", paths.dir):
        for marker in (paths.params, paths.attempts):
            if paths.fs.exists(marker):
                raise CheckpointError(
                    f"{paths.url} is the directory of a sweep's run (it has "
                    f"{marker.rsplit('/', 1)[-1]}); it is run by `sweeprun launch`: use that, or "
                    "give init() another local_dir")
    for manifest in CheckpointDir(paths.fs, paths.checkpoints).manifests():
        if manifest.run_id is not None:
            raise CheckpointError(
                f"{paths.url} holds checkpoints of run {manifest.run_id} of sweep {manifest.sweep}; "
                "it is run by `sweeprun launch`: use that, or give init() another local_dir")
