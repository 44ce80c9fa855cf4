"""``tracker="mlflow"``: one MLflow run per sweeprun run, through MLflow's own client (which
knows its authentication: ``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_TOKEN``, ...).

MLflow picks its run ids, so the id is kept in the run's folder (``tracker.json``) once the run
is created; an attempt that died between creating it and recording it left a run tagged with
the sweeprun run id, which the next attempt finds and adopts instead of creating a second one.
MLflow appends every value logged (it never overwrites a step), so a resumed attempt passes
over each step that a key's history already holds. The experiment is the sweep's name
(``MLFLOW_EXPERIMENT_NAME`` overrides it).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from ..redact import redact_url
from ..store import read_json, store_errors, write_json

if TYPE_CHECKING:
    from ..store import RunPaths

#: The tags that find a sweeprun run's MLflow run again.
RUN_TAG, SWEEP_TAG = "sweeprun.run_id", "sweeprun.sweep"
#: Lines buffered before a send (and at most this many seconds between sends).
BATCH, BATCH_S = 500, 5.0
#: MLflow's limits: 1,000 metrics per request, 100 params, 6,000 characters a value.
MAX_METRICS, MAX_PARAMS, MAX_VALUE = 1000, 100, 6000


def _client(uri: str | None = None) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        from ..errors import SpecError
        raise SpecError("init(tracker='mlflow') needs mlflow: pip install 'sweeprun[mlflow]' (or mlflow)") from None
    return MlflowClient(tracking_uri=uri)


class MlflowTracker:
    def __init__(self, paths: RunPaths, run_id: str, sweep: str | None, params: dict[str, Any]) -> None:
        self.paths, self.run_id, self.params = paths, run_id, params
        self.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or sweep or "sweeprun"
        self.client = _client()
        self.mlflow_run: str | None = None
        self._high: dict[str, int] = {}     # per key: the last step MLflow holds
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

    def _recorded(self) -> str | None:
        with store_errors("read", self.paths.tracker):
            present = self.paths.fs.exists(self.paths.tracker)
        if not present:
            return None
        record = read_json(self.paths.fs, self.paths.tracker)
        run = record.get("run") if isinstance(record, dict) and record.get("kind") == "mlflow" else None
        return run if isinstance(run, str) and run else None

    def _find_or_create(self) -> str:
        recorded = self._recorded()
        if recorded is not None:
            try:
                if self.client.get_run(recorded).info.lifecycle_stage == "active":
                    return recorded
            except Exception:  # noqa: BLE001 - deleted on the server, or another server: start anew
                pass
        experiment = self._experiment_id()
        tagged = self.client.search_runs(
            [experiment], filter_string=f"tags.`{RUN_TAG}` = '{self.run_id}'",
            order_by=["attributes.start_time ASC"], max_results=5)
        if tagged:
            run = tagged[0].info.run_id       # an attempt created it and died before recording it
        else:
            created = self.client.create_run(experiment, run_name=self.run_id,
                                             tags={RUN_TAG: self.run_id, SWEEP_TAG: self.experiment})
            run = created.info.run_id
            self._log_params(run)
        write_json(self.paths.fs, self.paths.tracker, {
            "kind": "mlflow", "run": run, "experiment": experiment,
            "uri": redact_url(str(self.client.tracking_uri))})
        return run

    def _log_params(self, run: str) -> None:
        from mlflow.entities import Param

        flat = [Param(str(k)[:250], str(v)[:MAX_VALUE]) for k, v in sorted(self.params.items())]
        for i in range(0, len(flat), MAX_PARAMS):
            self.client.log_batch(run, params=flat[i:i + MAX_PARAMS])

    # -- the Tracker protocol -------------------------------------------------------------

    def open(self, resume_step: int) -> None:
        run = self.mlflow_run = self._find_or_create()
        self.client.update_run(run, status="RUNNING")
        for key in self.client.get_run(run).data.metrics:
            steps = [m.step for m in self.client.get_metric_history(run, key)]
            if steps:
                self._high[key] = max(steps)

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
        if self.mlflow_run is None:
            return
        buffer, self._buffer = self._buffer, []
        self._sent_at = time.monotonic()
        for i in range(0, len(buffer), MAX_METRICS):
            self.client.log_batch(self.mlflow_run, metrics=buffer[i:i + MAX_METRICS])

    def close(self, status: str) -> None:
        self.flush()
        if self.mlflow_run is not None:
            self.client.set_terminated(self.mlflow_run, status=status)


def set_status(record: dict[str, Any], status: str) -> None:
    """The launcher's side (:func:`sweeprun.trackers.follow`): the run's MLflow run takes
    ``status``. The tracking URI is this process's (``MLFLOW_TRACKING_URI``), else the
    recorded one where it held no credential to star."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or record.get("uri")
    if not isinstance(uri, str) or "***" in uri:
        uri = None
    run = record.get("run")
    if isinstance(run, str) and run:
        _client(uri).set_terminated(run, status=status)
