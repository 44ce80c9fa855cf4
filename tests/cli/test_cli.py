"""The CLI surface: help for every command, status as a table and as JSON, read-only status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sweeprun import Sweep, load_spec
from sweeprun.cli import app
from sweeprun.ledger import RunState
from sweeprun.render import LiveEvents, sparkline, status_table
from sweeprun.sweep import TREND_POINTS, StatusRow

from conftest import STEPS_SCRIPT, Sandbox, wait_for


@pytest.mark.parametrize("command", ["launch", "worker", "status", "show", "reset", "gc"])
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
    assert "1/1 failed" in text
    done = [r for r in rows if r.state.value == "done"]
    assert all(r.step == 3 and r.metric == ("loss", pytest.approx(1 / 3)) for r in done)


def test_status_json_is_for_scripts(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 2, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (row,) = sandbox.status(sweep).values()
    assert row == {"run_id": row["run_id"], "params": {"a": 1}, "state": "done", "attempts": 1,
                   "failures": 0, "max_attempts": 3, "step": 2, "metric": {"loss": 0.5}, "checkpoint_age_s": None,
                   "worker": None, "contested": False, "nproc": 1, "approximate_resume": None, "job": None,
                   "trend": [1.0, 0.5], "rollbacks": None}


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


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ctrl_c_while_loading_a_big_sweep_exits_130_quietly(sandbox: Sandbox) -> None:
    """SIGINT before the launcher's handlers exist: exit 130, no traceback, nothing written.

    The sweep file (near the 1 MiB limit) takes about 3 s of CPU to parse and the imports
    under half a second, so waiting for 1 s of the process's CPU time puts the signal inside
    the parse, with seconds to spare for a test process a loaded machine lets poll late.
    """
    sweep = sandbox.root / "big.yaml"
    sweep.write_text(f"name: t\ncommand: python x.py {{a}}\nstore: {sandbox.store}\ngrid:\n  a: [1]\n"
                     "params:\n  big: [" + ", ".join(str(i) for i in range(130_000)) + "]\n")
    proc = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: proc.poll() is not None or _cpu_s(proc.pid) >= 1.0, timeout=120, what="parsing")
    assert proc.poll() is None, "the sweep loaded before the signal; make the file bigger"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not sandbox.store.exists()


def test_relative_store_is_relative_to_the_sweep_file(sandbox: Sandbox) -> None:
    """Launch from one folder, ask for status from another: the same runs, all done."""
    project = sandbox.root / "project"
    elsewhere = sandbox.root / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    sweep = project / "s.yaml"
    sweep.write_text(f"name: t\ncommand: python {STEPS_SCRIPT} {{a}}\nstore: out\ngrid:\n  a: [1, 2]\n"
                     "params:\n  steps: 1\n  sleep: 0\n")

    def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sweeprun", *args, "--ledger", str(sandbox.ledger)],
                              cwd=cwd, env=sandbox.env(), capture_output=True, text=True, timeout=120)

    assert cli("launch", str(sweep), cwd=sandbox.root).returncode == 0
    assert len(list((project / "out" / "t" / "runs").glob("*/DONE"))) == 2
    status = cli("status", str(sweep), "--json", cwd=elsewhere)
    assert [r["state"] for r in json.loads(status.stdout)] == ["done", "done"], status.stderr
    # A relative --store is typed in a shell, so it is relative to the current folder.
    status = cli("status", "project/s.yaml", "--json", "--store", "project/out", cwd=sandbox.root)
    assert [r["state"] for r in json.loads(status.stdout)] == ["done", "done"], status.stderr


def test_status_shows_a_store_with_brackets_and_hides_credentials(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1, "sleep": 0})
    odd = sandbox.root / "st[bold]ore [x]"
    odd.mkdir()
    shown = sandbox.run("status", str(sweep), "--store", str(odd), env={"COLUMNS": "400"})
    assert shown.returncode == 0, shown.stderr
    squeeze = "".join  # the title wraps to the table's width; compare without the line breaks
    assert squeeze(f"sweep t · {odd}".split()) in squeeze(shown.stdout.split())
    secret = sandbox.run("status", str(sweep), "--store", "memory://key:hunter2@bucket/x?token=abc&x=1",
                         env={"COLUMNS": "400"})
    # options in the URL would become part of every object's name: refused, secrets unprinted
    assert secret.returncode == 2, secret.stdout + secret.stderr
    assert "takes no query string" in secret.stderr and len(secret.stderr.strip().splitlines()) == 1
    assert "hunter2" not in secret.stdout + secret.stderr and "abc" not in secret.stdout + secret.stderr


def test_error_messages_hide_credentials(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]})
    result = sandbox.run("launch", str(sweep), "--store", "nosuch://key:hunter2@bucket/x?sig=s3cr3t")
    assert result.returncode == 2
    assert result.stderr.startswith("error: store nosuch://...") and "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr and "s3cr3t" not in result.stderr
    plain = sandbox.run("launch", str(sweep), "--store", "nosuch://key:hunter2@bucket/x")
    assert plain.returncode == 2 and "hunter2" not in plain.stderr, plain.stderr


def test_status_json_has_no_nan(sandbox: Sandbox) -> None:
    """A run that logged a NaN loss: ``--json`` says null, which every JSON parser reads."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (metrics,) = (sandbox.store / "t" / "runs").glob("*/metrics.jsonl")
    metrics.write_text('{"step": 1, "loss": NaN}\n')
    result = sandbox.run("status", str(sweep), "--json")
    assert result.returncode == 0, result.stderr
    assert "NaN" not in result.stdout
    (row,) = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert row["metric"] == {"loss": None}


@pytest.mark.parametrize("args,fragment", [
    (["--workers", "100000"], "Invalid value for '--workers' / '-w'"),  # the wording after it is typer's
    (["--lease-s", "inf"], "Invalid value for '--lease-s'"),
    (["--lease-s", "nan"], "--lease-s"),  # refused by typer, or by the spec's own check
    (["--grace-s", "inf"], "Invalid value for '--grace-s'"),
    (["--grace-s", "nan"], "--grace-s"),
    (["--max-attempts", "99999999999999999999"], "Invalid value for '--max-attempts'"),
    (["--gpus", "\u00b2"], "--gpus '\u00b2': give GPU indices separated by commas"),
    (["--gpus", "0,\u0661"], "give GPU indices separated by commas"),
])
def test_flags_out_of_range_are_refused_in_one_line(sandbox: Sandbox, args: list[str], fragment: str) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1, "sleep": 0})
    result = sandbox.run("launch", str(sweep), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not sandbox.store.exists()


def test_the_torch_extra_brings_numpy() -> None:
    """Without numpy beside it, torch starts every run's log with "Failed to initialize NumPy"."""
    from importlib.metadata import requires

    torch_extra = [r for r in requires("sweeprun") or [] if 'extra == "torch"' in r]
    assert any(r.startswith("numpy") for r in torch_extra), torch_extra


def test_status_of_a_big_sweep_shows_a_summary_and_the_runs_that_need_attention(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": list(range(22)), "fail": [0, 1]}, {"steps": 1, "sleep": 0},
                                max_attempts=1)
    assert sandbox.run("launch", str(sweep), "--workers", "4", timeout=300).returncode == 1
    out = sandbox.run("status", str(sweep)).stdout
    assert "44 runs: 22 failed, 22 done" in out and "22 runs not listed (22 done)" in out, out
    assert out.count("1/1 failed") == 22 and "0/1 failed" not in out  # only the failed runs have a line
    every = sandbox.run("status", str(sweep), "--all").stdout
    assert every.count("1/1 failed") == 22 and every.count("0/1 failed") == 22 and "not listed" not in every
    assert len(sandbox.status(sweep)) == 44  # --json: every run, for scripts


def test_attention_puts_failed_then_running_then_interrupted_first() -> None:
    from sweeprun.ledger import RunState
    from sweeprun.render import attention
    from sweeprun.sweep import StatusRow

    def row(i: int, state: RunState) -> StatusRow:
        return StatusRow(f"r{i}", {}, state, 1, 0, 3, None, None, None, None)

    rows = [row(0, RunState.DONE), row(1, RunState.INTERRUPTED), row(2, RunState.PENDING),
            row(3, RunState.RUNNING), row(4, RunState.FAILED), row(5, RunState.RUNNING)]
    assert [r.run_id for r in attention(rows)] == ["r4", "r3", "r5", "r1"]
    assert [r.run_id for r in attention(rows, limit=2)] == ["r4", "r3"]


def test_status_draws_the_metric_of_each_run_as_a_sparkline(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its last points, read from the end of the metrics file only."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 30, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (row,) = Sweep(load_spec(sweep), str(sandbox.ledger)).status()
    assert row.trend == tuple(1 / s for s in range(30 - TREND_POINTS + 1, 31))
    console = Console(record=True, width=140)
    console.print(status_table([row], title="sweep t"))
    assert sparkline(row.trend) in console.export_text()
    narrow = Console(record=True, width=80)  # the sparkline gives way, the newest points stay
    narrow.print(status_table([row], title="sweep t"))
    text = narrow.export_text()
    assert sparkline(row.trend) not in text
    assert any(sparkline(row.trend[-k:]) in text for k in range(5, TREND_POINTS))


@pytest.mark.parametrize("values, drawn", [
    ([1, 2, 3, 4, 5, 6, 7, 8], "▁▂▃▄▅▆▇█"),
    ([3, 3, 3], "▄▄▄"),
    ([1.0, float("nan"), 2.0], "▁ █"),
    ([], ""),
])
def test_sparkline(values: list[float], drawn: str) -> None:
    assert sparkline(values) == drawn


def test_live_view_shows_each_running_runs_step_and_metric() -> None:
    console = Console(record=True, width=100, force_terminal=True)
    events = LiveEvents(console, total=3, done=1)
    events.started("lr=0.1-3fa2c1b9", attempt=2, slot=0)
    events.started("lr=0.01-77aa00ee", attempt=1, slot=1)
    events.progress("lr=0.1-3fa2c1b9", 120, ("loss", 0.53125))
    events.progress("lr=0.01-77aa00ee", None, None)  # no step logged yet
    view = Console(record=True, width=100)
    view.print(events.runs_view())
    lines = view.export_text().splitlines()
    assert lines[0].split() == ["lr=0.1-3fa2c1b9", "attempt", "2", "step", "120", "·", "loss", "0.5312"]
    assert lines[1].split() == ["lr=0.01-77aa00ee", "attempt", "1", "-"]
    events.ended("lr=0.1-3fa2c1b9", 2, RunState.DONE, 0, 1.0)
    events.progress("lr=0.1-3fa2c1b9", 121, ("loss", 0.5))  # late: the run has ended
    assert list(events.runs) == ["lr=0.01-77aa00ee"]
    events.close()
    assert "2/3" in console.export_text()


def test_status_json_trend_has_no_nan() -> None:
    row = StatusRow(run_id="r-1", params={}, state=RunState.RUNNING, attempts=1, failures=0, max_attempts=3,
                    step=3, metric=("loss", 1.0), checkpoint_age_s=None, worker=None,
                    trend=(2.0, float("inf"), 1.0))
    assert row.as_json()["trend"] == [2.0, None, 1.0]
