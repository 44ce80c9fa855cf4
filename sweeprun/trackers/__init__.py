"""Trackers that resume with the run: one tracker run per sweeprun run, for its whole life.

``sweeprun.init(tracker="mlflow" | "wandb" | "tensorboard")`` sends every metrics line the
run writes (``run.end_step``, ``run.log``) to a tracker as well. What every tracker here
keeps, whatever its own API:

- **One tracker run per sweeprun run**, found again by each attempt: its id derived from the
  run id (W&B), or kept in the run's folder (``tracker.json``: MLflow, whose ids the server
  picks; found by the run id's tag when an attempt died between creating the run and
  recording it), or the run's folder itself (TensorBoard).
- **Each step once** after a resume from step S: the attempt gives the tracker the run's
  history up to S, and what the lost attempt logged after S is hidden (TensorBoard's
  ``purge_step``) or not logged again (MLflow and W&B keep every value logged, per key and
  step: a step they hold is passed over; an exact resume logs the same values there anyway).
- **Its final status follows the ledger**: the launcher sets it at each attempt's end
  (:func:`follow`): finished when the run is done, failed when it failed for good or
  diverged, killed when it was interrupted, lost with its machine, or will be retried; the
  next attempt sets it running again.

Each tracker is imported only when asked for: the launcher imports one only to set the
status of a run that recorded one. A tracker that cannot be reached never fails training: one
line on stderr, and its history is filled in by a later attempt where it can be.
"""

from __future__ import annotations

import atexit
import importlib.util
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import SpecError, SweeprunError
from ..numbers import finite
from ..redact import redact, redact_tree
from ..store import backend_for, read_json, read_regular, store_errors
from ..training.metrics import parse_entries

if TYPE_CHECKING:
    from ..ledger.base import RunState
    from ..store import RunPaths

#: The trackers ``init(tracker=...)`` knows.
KINDS = ("mlflow", "wandb", "tensorboard")
#: Seconds the launcher waits for a tracker to take a run's status before it goes on.
FOLLOW_TIMEOUT_S = 10.0
#: Seconds a closing run waits for its tracker to take what is queued (its checkpoint is durable).
CLOSE_TIMEOUT_S = 30.0
#: Calls queued for a tracker at most (a server away for long: the rest waits for a later attempt).
SENDER_QUEUE = 100_000
#: Seconds between tries of a send that failed.
RETRY_S = 5.0


class Tracker(Protocol):
    """What a tracker does for a run (one per process; rank 0's in a multi-rank run)."""

    def open(self, resume_step: int) -> None:
        """Start or continue the run's tracker run; this attempt goes on from ``resume_step``."""

    def log(self, step: int, values: dict[str, float]) -> None:
        """One metrics line: the finite numbers of an entry, at its step."""

    def flush(self) -> None:
        """Send what is buffered (before each checkpoint, and at the end)."""

    def close(self, status: str) -> None:
        """Flush and let go, the tracker run ending ``status`` (``FINISHED``, ``KILLED``, ``FAILED``)."""


def warn(message: str) -> None:
    print(f"[sweeprun] tracker: {redact(message)}", file=sys.stderr, flush=True)


def check(kind: str, paths: RunPaths) -> None:
    """Refuse, on every rank and before anything is written, a tracker that cannot work here
    (an unknown kind, its package missing, TensorBoard's files on an object store): one
    :class:`SpecError` line, never a rank left waiting for rank 0."""
    if kind not in KINDS:
        raise SpecError(f"init(tracker={kind!r}): unknown tracker; choose one of {', '.join(KINDS)}")
    if importlib.util.find_spec(kind) is None:       # each tracker's package has its name
        raise SpecError(f"init(tracker={kind!r}) needs {kind}: pip install 'sweeprun[{kind}]' (or {kind})")
    if kind == "tensorboard" and backend_for(paths.fs).native_path(paths.tensorboard) is None:
        raise SpecError(f"init(tracker='tensorboard') writes event files into the run's folder, "
                        f"which is in an object store ({paths.url}); use a store on local disk, "
                        "or tracker='mlflow' or 'wandb'")


def make(kind: str, paths: RunPaths, run_id: str | None, params: dict[str, Any]) -> Tracker:
    """The tracker ``kind`` for the run in ``paths`` (:func:`check` first); it is sent the
    parameters with their secrets starred, as everything sweeprun shows."""
    check(kind, paths)
    params = redact_tree(params)
    if kind == "tensorboard":
        from .tensorboard import TensorBoardTracker
        return TensorBoardTracker(paths)
    if kind == "mlflow":
        from .mlflow import MlflowTracker
        return MlflowTracker(paths, run_id or paths.run_id, params)
    from .wandb import WandbTracker
    return WandbTracker(paths, run_id or paths.run_id, params)


class _Sender:
    """One thread that makes a tracker's network calls in order, so training never waits on
    a tracker server: a call that fails is retried (after :data:`RETRY_S`) before any later
    one, so the tracker's history has no hole; :meth:`drain` waits a bounded time."""

    def __init__(self, failed: Callable[[str, BaseException], None]) -> None:
        self._calls: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue(SENDER_QUEUE)
        self._failed = failed
        self._thread = threading.Thread(target=self._run, name="sweeprun-tracker", daemon=True)
        self._thread.start()
        self.dropped = 0

    def put(self, what: str, call: Callable[[], None]) -> None:
        try:
            self._calls.put_nowait((what, call))
        except queue.Full:          # the server has been away long: a later attempt sends it
            self.dropped += 1

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            what, call = item
            while True:
                try:
                    call()
                    break
                except Exception as exc:  # noqa: BLE001 - any client library's error
                    self._failed(what, exc)
                    if what != "sending":
                        break               # an open or a close is not retried
                    time.sleep(RETRY_S)

    def drain(self, timeout_s: float) -> bool:
        """Stop after what is queued; whether it all went within ``timeout_s``."""
        try:
            self._calls.put(None, timeout=timeout_s)
        except queue.Full:
            return False
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class TrackedMetrics:
    """A run's metrics log that also feeds a tracker: every line appended goes to both, the
    tracker is opened where the log is (with the step the run resumed from, and the history
    up to it), flushed with it and closed with it, with the status ``status()`` gives then
    (:func:`process_status`; the launcher then sets what the ledger says). A tracker whose
    calls go over the network (``threaded``) gets them on its own thread. Anything else is
    the log's own."""

    def __init__(self, inner: Any, tracker: Tracker, status: Callable[[], str]) -> None:
        self._inner, self._tracker, self._status = inner, tracker, status
        self._warned, self._open = False, False
        self._sender = _Sender(self._failed) if getattr(tracker, "threaded", False) else None

    def __getattr__(self, name: str) -> Any:   # size, opened, path, flusher, ...
        return getattr(self._inner, name)

    def _failed(self, what: str, exc: BaseException) -> None:
        """A tracker out of reach never stops training: one line, the first time."""
        if not self._warned:
            warn(f"{what} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
                 "training goes on, and what it logs is sent when the tracker answers (or by a later attempt)")
        self._warned = True

    def _call(self, what: str, call: Callable[[], None]) -> None:
        if self._sender is not None:
            self._sender.put(what, call)
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            self._failed(what, exc)

    def open(self, resume_step: int, resume_bytes: int | None, resume_attempt: int | None = None) -> None:
        """Open the log, then the tracker, and give the tracker the whole history the run goes
        on from: what a lost attempt logged but never sent (killed with it in a buffer) is
        sent now, and a tracker passes over the steps it holds."""
        self._inner.open(resume_step, resume_bytes, resume_attempt)
        kept = self._kept()

        def opened() -> None:
            self._tracker.open(resume_step)
            self._open = True
            for entry in kept:
                self._feed(entry, now=True)

        self._call("opening", opened)
        # a script that dies of an exception never closes its run: what it logged is sent anyway
        atexit.register(self._end, None)

    def _kept(self) -> list[dict[str, Any]]:
        """The entries the log holds now (those up to the checkpoint the run goes on from)."""
        inner = self._inner
        if not inner.size:
            return []
        try:
            blob = read_regular(inner.fs, inner.path, inner.size)
        except (SweeprunError, FileNotFoundError):
            return []
        return parse_entries(blob[:inner.size], inner.path)

    def append(self, entry: dict[str, Any]) -> None:
        self._inner.append(entry)
        self._feed(entry)

    def _feed(self, entry: dict[str, Any], now: bool = False) -> None:
        step = finite(entry.get("step"))
        values = {k: v for k, raw in entry.items()
                  if k != "step" and isinstance(k, str) and (v := finite(raw)) is not None}
        if step is None or not values:
            return
        if now:                                          # on the sender's thread already
            self._tracker.log(int(step), values)
        else:
            self._call("sending", lambda: self._open and self._tracker.log(int(step), values))

    def flush(self) -> None:
        self._inner.flush()
        self._call("sending", lambda: self._open and self._tracker.flush())

    def abandon(self) -> None:
        self._inner.abandon()     # another worker has the run: this process was cut off
        self._end("KILLED")

    def close(self) -> None:
        self._inner.close()
        self._end(self._status())

    def _end(self, status: str | None) -> None:
        """Close the tracker run with ``status`` (``None``, at the interpreter's exit: only send
        what is left), waiting at most :data:`CLOSE_TIMEOUT_S` for a tracker server."""
        if status is None:
            self._call("sending", lambda: self._open and self._tracker.flush())
        else:
            self._call("closing", lambda: self._open and self._tracker.close(status))
        sender, self._sender = self._sender, None     # later calls: on this thread, after it
        if sender is not None and (not sender.drain(CLOSE_TIMEOUT_S) or sender.dropped):
            warn(f"the tracker did not take every line within {CLOSE_TIMEOUT_S:g} s; the next "
                 "attempt of the run sends what it lacks")


def process_status(stopping: bool) -> str:
    """The status a closing run gives its tracker run, as far as its process knows: ``KILLED``
    after a stop request (it saved and exits 75), ``FAILED`` while an exception (not an exit)
    is on its way out (a ``with`` block's), else ``FINISHED``. Under the launcher,
    :func:`follow` then sets what the ledger says."""
    if stopping:
        return "KILLED"
    kind = sys.exc_info()[0]
    return "FAILED" if kind is not None and not issubclass(kind, SystemExit) else "FINISHED"


def _status_of(state: RunState) -> str | None:
    """The tracker status of a run the ledger now judges ``state``; ``None`` for a run that
    starts again at once (a retry, a rollback, an out-of-memory retry: pending), which its
    next attempt sets running (a ``KILLED`` landing after that would be wrong)."""
    value = getattr(state, "value", state)
    return {"done": "FINISHED", "failed": "FAILED", "diverged": "FAILED", "interrupted": "KILLED"}.get(value)


def follow(paths: RunPaths, state: RunState) -> None:
    """Set the status of the run's tracker run (if it recorded one) as the ledger now judges
    the run (the launcher, at each attempt's end). Never raises, never waits more than
    :data:`FOLLOW_TIMEOUT_S`: the sweep goes on whatever the tracker does."""
    status = _status_of(state)
    if status is None:      # it starts again at once: nothing to read or set
        return
    try:
        with store_errors("read", paths.tracker):
            if not paths.fs.exists(paths.tracker):
                return
        record = read_json(paths.fs, paths.tracker)
    except (SweeprunError, ValueError):
        return
    if not isinstance(record, dict) or record.get("kind") != "mlflow":
        return              # TensorBoard has no status, W&B's is its process's
    from .mlflow import set_status

    done = threading.Thread(target=_quietly, args=(set_status, record, status), daemon=True)
    done.start()
    done.join(FOLLOW_TIMEOUT_S)


def _quietly(call: Callable[..., None], *args: Any) -> None:
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001
        warn(f"cannot set the run's status ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
