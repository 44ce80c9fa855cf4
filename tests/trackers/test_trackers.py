"""Trackers that resume with the run: after kills and resumes, one tracker run per sweeprun
run, each step of each metric exactly once (what the run's metrics.jsonl holds), and the
tracker run's status as the ledger ends the run. Real parts: an MLflow tracking server on
loopback (``mlflow server``), TensorBoard's event files read back with its own reader."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from _trackers import logged, same_series, tensorboard
from conftest import Sandbox, wait_for
from servers import MlflowServer


def killed_and_resumed(sandbox: Sandbox, grid: dict[str, list[Any]], params: dict[str, Any],
                       env: dict[str, str] | None = None, **extra: Any) -> Path:
    """A sweep whose launcher is SIGKILLed (its runs with it, the machine dying) once every run
    has passed a checkpoint, then launched again until it settles."""
    sweep = sandbox.write_sweep(grid, {"api": True, "sleep": 0.05, **params}, **extra)
    first = sandbox.sweeprun("launch", str(sweep), "--workers", "4", env=env)
    runs = len(next(iter(grid.values()))) if len(grid) == 1 else None

    def past_a_checkpoint() -> bool:
        metrics = list((sandbox.store / "t" / "runs").glob("*/metrics.jsonl"))
        return len(metrics) == runs and all(len(m.read_text().splitlines()) >= 5 for m in metrics)

    wait_for(past_a_checkpoint, what="every run past a checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    again = sandbox.run("launch", str(sweep), "--workers", "4", env=env, timeout=300)
    assert again.returncode in (0, 1), again.stderr
    return sweep


@pytest.mark.slow
def test_mlflow_holds_one_run_per_run_each_step_once_and_the_ledgers_status(
        sandbox: Sandbox, mlflow_server: MlflowServer) -> None:
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_NAME": f"exp-{sandbox.root.name}"}
    killed_and_resumed(sandbox, {"seed": [1, 2]}, {"steps": 30, "tracker": "mlflow"}, env=env,
                       max_attempts=2)
    failing = sandbox.write_sweep({"seed": [4]}, {"api": True, "steps": 10, "sleep": 0, "tracker": "mlflow",
                                                  "fail_at": 3}, name="t", max_attempts=2)
    assert sandbox.run("launch", str(failing), env=env).returncode == 1
    status = sandbox.status(failing)

    client: Any = mlflow_server.client()
    experiment = client.get_experiment_by_name(env["MLFLOW_EXPERIMENT_NAME"])
    found = client.search_runs([experiment.experiment_id], max_results=100)
    by_run = {}
    for run in found:
        by_run.setdefault(run.data.tags["sweeprun.run_id"], []).append(run)
    assert sorted(by_run) == sorted(status), "one MLflow run per sweeprun run"
    assert all(len(runs) == 1 for runs in by_run.values())
    restarted = 0
    for run_id, (run,) in by_run.items():
        expected = {"done": "FINISHED", "failed": "FAILED"}[status[run_id]["state"]]
        assert run.info.status == expected, (run_id, run.info.status)
        assert run.info.run_name == run_id and run.data.params["seed"] in {"1", "2", "4"}
        record = json.loads((sandbox.store / "t" / "runs" / run_id / "tracker.json").read_text())
        assert record == {"life": run.data.tags["sweeprun.life"], "kind": "mlflow", "run": run.info.run_id,
                          "experiment": experiment.experiment_id, "uri": mlflow_server.url}
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(history) == logged(sandbox.store / "t" / "runs" / run_id)["loss"], run_id
        restarted += status[run_id]["attempts"] > 1
    assert restarted >= 3                          # the two killed runs resumed, the failing one retried

    stopped = sandbox.write_sweep({"seed": [5]}, {"api": True, "steps": 10_000, "sleep": 0.05,
                                                  "tracker": "mlflow"}, name="s")
    launch = sandbox.sweeprun("launch", str(stopped), env=env)
    wait_for(lambda: any(e["event"] == "first_step" and e["run"].startswith("seed=5") for e in sandbox.events()),
             what="the run under way")
    assert sandbox.run("stop", str(stopped)).returncode == 0
    launch.communicate(timeout=120)
    (run_id, row), = sandbox.status(stopped).items()
    assert row["state"] == "interrupted"
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`sweeprun.run_id` = '{run_id}'")
    assert run.info.status == "KILLED"


@pytest.mark.slow  # a run killed twice and finished: the full suite's
def test_tensorboard_shows_each_step_once_after_kills(sandbox: Sandbox) -> None:
    sweep = killed_and_resumed(sandbox, {"seed": [1, 2]}, {"steps": 40, "tracker": "tensorboard"})
    status = sandbox.status(sweep)
    assert all(row["state"] == "done" for row in status.values())
    for run_id in status:
        run_dir = sandbox.store / "t" / "runs" / run_id
        assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == status[run_id]["attempts"]
        assert same_series(tensorboard(run_dir / "tensorboard"), logged(run_dir)) == [], run_id


def test_a_tracker_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = f"import sweeprun; sweeprun.init(params={{}}, local_dir={str(tmp_path / 'run')!r}, tracker='neptune')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown tracker" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # the fast subset keeps TensorBoard's and the check's tests
def test_wandb_offline_files_hold_one_run_each_step_once(sandbox: Sandbox) -> None:
    from sweeprun.trackers.wandb import wandb_id
    from sweeprun.trackers.wandb_files import exit_code, history, run_files

    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    sweep = killed_and_resumed(sandbox, {"seed": [1, 2]}, {"steps": 30, "tracker": "wandb"}, env=env)
    status = sandbox.status(sweep)
    for run_id, row in status.items():
        assert row["state"] == "done"
        run_dir = sandbox.store / "t" / "runs" / run_id
        record = json.loads((run_dir / "tracker.json").read_text())
        wid = wandb_id(run_id, record["life"])
        assert record == {"life": record["life"], "kind": "wandb", "run": wid, "project": "t"}
        files = run_files(run_dir / "wandb", wid)
        assert len(files) == row["attempts"] == 2          # one W&B run, resumed by the second attempt
        steps = [(step, values["loss"]) for f in files for step, values in history(f) if "loss" in values]
        assert steps == [(s, pytest.approx(v)) for s, v in logged(run_dir)["loss"]], run_id
        assert exit_code(files[-1]) == 0


@pytest.mark.slow  # the fast subset keeps TensorBoard's and the check's tests
def test_a_reset_run_gets_a_new_tracker_run(sandbox: Sandbox) -> None:
    """A reset starts the run over in a new folder: a new life, a new W&B run (never the old
    one's history, whose steps would make the new ones look logged already)."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    sweep = sandbox.write_sweep({"seed": [1]}, {"api": True, "steps": 4, "sleep": 0, "tracker": "wandb"})
    assert sandbox.run("launch", str(sweep), env=env).returncode == 0
    (run_id,) = sandbox.status(sweep)
    run_dir = sandbox.store / "t" / "runs" / run_id
    before = json.loads((run_dir / "tracker.json").read_text())
    assert sandbox.run("reset", str(sweep), run_id, env=env).returncode == 0
    assert sandbox.run("launch", str(sweep), env=env).returncode == 0
    after = json.loads((run_dir / "tracker.json").read_text())
    assert after["life"] != before["life"] and after["run"] != before["run"]
    from sweeprun.trackers.wandb_files import history, run_files

    (files,) = [run_files(run_dir / "wandb", after["run"])]
    assert [step for f in files for step, _ in history(f)] == [1, 2, 3, 4]


@pytest.mark.slow  # the fast subset keeps TensorBoard's and the check's tests
def test_a_tracker_out_of_reach_never_stops_training(sandbox: Sandbox) -> None:
    """An MLflow server that does not answer: one line on stderr, the run ends done as ever."""
    from servers import free_port

    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    sweep = sandbox.write_sweep({"seed": [1]}, {"api": True, "steps": 6, "sleep": 0, "tracker": "mlflow"})
    result = sandbox.run("launch", str(sweep), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    (run_id, row), = sandbox.status(sweep).items()
    assert row["state"] == "done"
    log = (sandbox.store / "t" / "runs" / run_id / "logs" / "attempt-1.log").read_text()
    assert log.count("[sweeprun] tracker: opening failed (") == 1, log
    assert [step for step, _ in logged(sandbox.store / "t" / "runs" / run_id)["loss"]] == list(range(1, 7))
