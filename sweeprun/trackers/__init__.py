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
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import SpecError, SweeprunError
from ..numbers import finite
from ..redact import redact
from ..store import read_json, read_regular, store_errors
from ..training.metrics import parse_entries

if TYPE_CHECKING:
    from ..ledger.base import RunState
    from ..store import RunPaths

#: The trackers ``init(tracker=...)`` knows.
KINDS = ("mlflow", "wandb", "tensorboard")
#: Seconds the launcher waits for a tracker to take a run's status before it goes on.
FOLLOW_TIMEOUT_S = 10.0


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


def make(kind: str, paths: RunPaths, run_id: str | None, sweep: str | None,
         params: dict[str, Any]) -> Tracker:
    """The tracker ``kind`` for the run in ``paths``; bad input is a :class:`SpecError` line."""
    if kind == "tensorboard":
        from .tensorboard import TensorBoardTracker
        return TensorBoardTracker(paths)
    if kind == "mlflow":
        from .mlflow import MlflowTracker
        return MlflowTracker(paths, run_id or paths.run_id, sweep, params)
    if kind == "wandb":
        from .wandb import WandbTracker
        return WandbTracker(paths, run_id or paths.run_id, sweep, params)
    raise SpecError(f"init(tracker={kind!r}): unknown tracker; choose one of {', '.join(KINDS)}")


class TrackedMetrics:
    """A run's metrics log that also feeds a tracker: every line appended goes to both, the
    tracker is opened where the log is (with the step the run resumed from), flushed before each
    checkpoint and closed with it, with the status ``status()`` gives then (:func:`process_status`;
    the launcher then sets what the ledger says). Anything else is the log's own."""

    def __init__(self, inner: Any, tracker: Tracker, status: Callable[[], str]) -> None:
        self._inner, self._tracker, self._status = inner, tracker, status
        self._failed = False

    def __getattr__(self, name: str) -> Any:   # size, opened, path, flusher, ...
        return getattr(self._inner, name)

    def _safely(self, what: str, call: Callable[[], None]) -> None:
        """A tracker out of reach never stops training: one line, the first time."""
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any client library's error
            if not self._failed:
                warn(f"{what} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
                     "training goes on, and later lines are tried again")
            self._failed = True

    def open(self, resume_step: int, resume_bytes: int | None, resume_attempt: int | None = None) -> None:
        """Open the log, then the tracker, and give the tracker the whole history the run goes
        on from: what a lost attempt logged but never sent (killed with it in a buffer) is
        sent now, and a tracker passes over the steps it holds."""
        self._inner.open(resume_step, resume_bytes, resume_attempt)
        self._safely("opening", lambda: self._tracker.open(resume_step))
        if not self._failed:
            for entry in self._kept():
                self._feed(entry)
        # a script that dies of an exception never closes its run: what it logged is sent anyway
        atexit.register(self._safely, "sending", self._tracker.flush)

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

    def _feed(self, entry: dict[str, Any]) -> None:
        step = finite(entry.get("step"))
        values = {k: v for k, raw in entry.items()
                  if k != "step" and isinstance(k, str) and (v := finite(raw)) is not None}
        if step is not None and values:
            self._safely("logging", lambda: self._tracker.log(int(step), values))

    def flush(self) -> None:
        self._inner.flush()
        self._safely("sending", self._tracker.flush)

    def abandon(self) -> None:
        self._inner.abandon()     # another worker has the run: this process was cut off
        self._safely("closing", lambda: self._tracker.close("KILLED"))

    def close(self) -> None:
        self._inner.close()
        self._safely("closing", lambda: self._tracker.close(self._status()))


def process_status(stopping: bool) -> str:
    """The status a closing run gives its tracker run, as far as its process knows: ``KILLED``
    after a stop request (it saved and exits 75), ``FAILED`` while an exception (not an exit)
    is on its way out (a ``with`` block's), else ``FINISHED``. Under the launcher,
    :func:`follow` then sets what the ledger says."""
    if stopping:
        return "KILLED"
    kind = sys.exc_info()[0]
    return "FAILED" if kind is not None and not issubclass(kind, SystemExit) else "FINISHED"


def _status_of(state: RunState) -> str:
    value = getattr(state, "value", state)
    if value == "done":
        return "FINISHED"
    if value in ("failed", "diverged"):
        return "FAILED"
    return "KILLED"            # interrupted, lost, to be retried: the next attempt sets RUNNING


def follow(paths: RunPaths, state: RunState) -> None:
    """Set the status of the run's tracker run (if it recorded one) as the ledger now judges
    the run (the launcher, at each attempt's end). Never raises, never waits more than
    :data:`FOLLOW_TIMEOUT_S`: the sweep goes on whatever the tracker does."""
    try:
        with store_errors("read", paths.tracker):
            if not paths.fs.exists(paths.tracker):
                return
        record = read_json(paths.fs, paths.tracker)
    except (SweeprunError, ValueError):
        return
    if not isinstance(record, dict) or record.get("kind") != "mlflow":
        return              # TensorBoard has no status
    from .mlflow import set_status

    done = threading.Thread(target=_quietly, args=(set_status, record, _status_of(state)), daemon=True)
    done.start()
    done.join(FOLLOW_TIMEOUT_S)


def _quietly(call: Callable[..., None], *args: Any) -> None:
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001
        warn(f"cannot set the run's status ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
