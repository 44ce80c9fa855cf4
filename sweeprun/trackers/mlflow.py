"""``tracker="mlflow"``: one MLflow run per sweeprun run, through MLflow's own client (which
knows its authentication: ``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_TOKEN``, ...).

MLflow picks its run ids, so the id is kept in the run's folder (``tracker.json``) once the run
is created; an attempt that died between creating it and recording it left a run tagged with
the token of this life of the run (a ``reset`` run is a new life, with a new MLflow run), which
the next attempt finds and adopts instead of creating a second one.
MLflow appends every value logged (it never overwrites a step), so a resumed attempt passes
over each step that a key's history already holds. The experiment is the sweep's name
(``MLFLOW_EXPERIMENT_NAME`` overrides it).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .. import settings
from ..redact import redact_url
from .record import life, remember

if TYPE_CHECKING:
    from ..store import RunPaths

#: The tags of a sweeprun run's MLflow run: its run id, its sweep, and this life's token
#: (:func:`~sweeprun.trackers.life`), which finds it again.
RUN_TAG, SWEEP_TAG, LIFE_TAG = "sweeprun.run_id", "sweeprun.sweep", "sweeprun.life"
#: Lines buffered before a send (and at most this many seconds between sends).
BATCH, BATCH_S = 500, 5.0
#: MLflow's limits: 1,000 metrics per request, 100 params, 6,000 characters a value.
MAX_METRICS, MAX_PARAMS, MAX_VALUE = 1000, 100, 6000


def _client(uri: str | None = None) -> Any:
    from mlflow import MlflowClient  # checked (sweeprun.trackers.check)

    return MlflowClient(tracking_uri=uri)


class MlflowTracker:
    #: Its calls go over the network: on :class:`~sweeprun.trackers.TrackedMetrics`' own thread.
    threaded = True

    def __init__(self, paths: RunPaths, run_id: str, params: dict[str, Any]) -> None:
        self.paths, self.run_id, self.params = paths, run_id, params
        self.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or settings.SWEEP.get(os.environ) or "sweeprun"
        self.client = _client()
        self.mlflow_run: str | None = None
        self._high: dict[str, int] = {}     # per key: the last step MLflow holds or was handed
        self._buffer: list[Any] = []
        self._sent_at = time.monotonic()

    # -- finding the run's MLflow run ----------------------------------------------------

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(self.experiment))
        except Exception:                  # another run created it first
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    def _tagged(self, experiment: str, token: str) -> list[Any]:
        """This life's MLflow runs, oldest first (one, unless two starters raced)."""
        return list(self.client.search_runs([experiment], filter_string=f"tags.`{LIFE_TAG}` = '{token}'",
                                            order_by=["attributes.start_time ASC"], max_results=10))

    def _find_or_create(self) -> str:
        """The MLflow run of this life of the run (:func:`~sweeprun.trackers.life`): the recorded
        one; else the one tagged with the life's token (an attempt created it and died before
        recording it); else a new one, and if a racing starter made one too, the older wins."""
        record = life(self.paths)
        recorded = record.get("run")
        if isinstance(recorded, str) and recorded:
            try:
                if self.client.get_run(recorded).info.lifecycle_stage == "active":
                    return recorded
            except Exception:  # noqa: BLE001 - deleted on the server, or another server: start anew
                pass
        experiment = self._experiment_id()
        tagged = self._tagged(experiment, record["life"])
        if tagged:
            run = tagged[0].info.run_id
        else:
            created = self.client.create_run(experiment, run_name=self.run_id, tags={
                RUN_TAG: self.run_id, SWEEP_TAG: self.experiment, LIFE_TAG: record["life"]})
            run = created.info.run_id
            oldest = self._tagged(experiment, record["life"])[0].info.run_id
            if oldest != run:                 # another starter of this life was first
                self.client.delete_run(run)
                run = oldest
        self._log_params(run)                 # again where a start died before it: the same values
        remember(self.paths, record, kind="mlflow", run=run, experiment=experiment,
                 uri=redact_url(str(self.client.tracking_uri)))
        return run

    def _log_params(self, run: str) -> None:
        from mlflow.entities import Param

        flat = [Param(str(k)[:250], str(v)[:MAX_VALUE]) for k, v in sorted(self.params.items())]
        for i in range(0, len(flat), MAX_PARAMS):
            self.client.log_batch(run, params=flat[i:i + MAX_PARAMS])

    # -- the Tracker protocol (on the sender's thread) -------------------------------------

    def open(self, resume_step: int) -> None:
        run = self._find_or_create()
        self.client.update_run(run, status="RUNNING")
        for key in self.client.get_run(run).data.metrics:
            steps = [m.step for m in self.client.get_metric_history(run, key)]
            if steps:
                self._high[key] = max(steps)
        self.mlflow_run = run

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in values.items():
            if step > self._high.get(key, -1):       # a step MLflow holds is not logged again
                self._buffer.append(Metric(key, value, now, step))
                self._high[key] = step
        if len(self._buffer) >= BATCH or time.monotonic() - self._sent_at >= BATCH_S:
            self.flush()

    def flush(self) -> None:
        """Send what is buffered, in order; a batch that fails stays first in line (it is sent
        again before anything later, so MLflow's history never has a hole)."""
        self._sent_at = time.monotonic()
        while self._buffer and self.mlflow_run is not None:
            self.client.log_batch(self.mlflow_run, metrics=self._buffer[:MAX_METRICS])
            del self._buffer[:MAX_METRICS]

    def close(self, status: str) -> None:
        self.flush()
        if self.mlflow_run is not None:
            self.client.set_terminated(self.mlflow_run, status=status)


def set_status(record: dict[str, Any], status: str) -> None:
    """The launcher's side (:func:`sweeprun.trackers.follow`): the run's MLflow run takes
    ``status``. The tracking URI is this process's (``MLFLOW_TRACKING_URI``), else the
    recorded one; one that held a credential (starred in the record) and no URI here: nothing
    is done (MLflow's default would be a local folder, outside the store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or record.get("uri")
    run = record.get("run")
    if not isinstance(uri, str) or not uri or "***" in uri or not isinstance(run, str) or not run:
        return
    _client(uri).set_terminated(run, status=status)
