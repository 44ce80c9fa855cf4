"""The CLI surface: help for every command, status as a table and as JSON, read-only status."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sweeprun import Sweep, load_spec
from sweeprun.cli import app
from sweeprun.render import status_table

from conftest import Sandbox


@pytest.mark.parametrize("command", ["launch", "worker", "status"])
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "SWEEP.yaml" in result.output
    assert len(result.output.split("\n\n")[1].strip()) > 20  # a real description, from the docstring


def test_status_before_any_launch_writes_nothing(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2], "b": ["x"]}, {"steps": 1})
    result = sandbox.run("status", str(sweep), "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["state"] for r in rows] == ["pending", "pending"]
    assert [r["params"] for r in rows] == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert not sandbox.store.exists() and not sandbox.ledger.exists()


def test_status_table_after_a_sweep(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2], "fail": [False, True]}, {"steps": 3, "sleep": 0}, max_attempts=1)
    assert sandbox.run("launch", str(sweep), "--workers", "2").returncode == 1
    monkeypatch.setenv("SWEEPRUN_HOME", str(sandbox.root / "state"))
    rows = Sweep(load_spec(sweep), str(sandbox.ledger)).status()
    console = Console(record=True, width=140)
    console.print(status_table(rows, title="sweep t"))
    text = console.export_text()
    assert "4 runs: 2 failed, 2 done" in text
    assert "step 3 · loss 0.3333" in text
    assert "1 (1 failed)" in text
    done = [r for r in rows if r.state.value == "done"]
    assert all(r.step == 3 and r.metric == ("loss", pytest.approx(1 / 3)) for r in done)


def test_status_json_is_for_scripts(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 2, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (row,) = sandbox.status(sweep).values()
    assert row == {"run_id": row["run_id"], "params": {"a": 1}, "state": "done", "attempts": 1,
                   "failures": 0, "step": 2, "metric": {"loss": 0.5}, "checkpoint_age_s": None,
                   "worker": None}


def test_launch_output_is_plain_lines_when_not_a_terminal(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 2, "sleep": 0})
    out = sandbox.run("launch", str(sweep)).stdout
    lines = out.splitlines()
    assert lines[0].startswith("[sweeprun] start a=1-")
    assert any(line.endswith("] step 2") for line in lines)
    assert "[1/1 done]" in out and lines[-1].endswith("exit 0")


def test_worker_joins_a_sweep(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2, 3]}, {"steps": 1, "sleep": 0})
    assert sandbox.run("worker", str(sweep)).returncode == 0
    assert {r["state"] for r in sandbox.status(sweep).values()} == {"done"}


def test_gpus_give_each_slot_its_own_device(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep(
        {"a": [1, 2, 3, 4]},
        command="python -c \"import os; print('cvd=' + os.environ['CUDA_VISIBLE_DEVICES'])\" {a}")
    result = sandbox.run("launch", str(sweep), "--gpus", "3,5")
    assert result.returncode == 0, result.stderr
    logs = sorted((sandbox.store / "t" / "runs").glob("*/logs/attempt-1.log"))
    assert len(logs) == 4
    assert {log.read_text().strip() for log in logs} <= {"cvd=3", "cvd=5"}
    assert "slot 1" in result.stdout or "slot 0" in result.stdout


def test_live_view_on_a_terminal() -> None:
    from sweeprun.ledger import RunState
    from sweeprun.render import LiveEvents, make_events

    console = Console(record=True, width=100, force_terminal=True)
    events = make_events(console, total=3, done=1)
    assert isinstance(events, LiveEvents)
    events.started("a=1-0000", 1, 0)
    events.output("a=1-0000", "epoch 1 loss 0.5")
    events.ended("a=1-0000", 1, RunState.DONE, 0, 1.5)
    events.close()
    text = console.export_text()
    assert "[a=1-0000] epoch 1 loss 0.5" in text
    assert "2/3" in text and "0 running · 0 failed" in text


def test_the_cli_never_imports_torch() -> None:
    import subprocess
    import sys

    code = "import sys, sweeprun, sweeprun.cli, sweeprun.runner; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
