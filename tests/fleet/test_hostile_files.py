"""Files in the store that are damaged or hostile, and flags that are odd (issue 18, the
fleet probe): each is one line and the command carries on, or one line and exit 2, never a
traceback, a hang or a run blocked for good."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from sweeprun.leases import LeaseRecord, StoreLeases
from sweeprun.numbers import ascii_int, finite, worker_pid
from sweeprun.procs import HOST
from sweeprun.render import sparkline
from sweeprun.training.metrics import parse_entries

from conftest import Sandbox


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def finished(sandbox: Sandbox, runs: int = 2) -> Path:
    sweep = sandbox.write_sweep({"a": list(range(1, runs + 1))}, {"steps": 3, "sleep": 0})
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stderr
    return sweep


def run_dirs(sandbox: Sandbox) -> list[Path]:
    return sorted((sandbox.store / "t" / "runs").iterdir())


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


# -- numbers: ASCII, bounded, finite -----------------------------------------------------------

def test_numbers_from_the_store_are_ascii_bounded_and_finite() -> None:
    assert ascii_int("²") is None and ascii_int("١٢") is None and ascii_int("12") == 12
    assert ascii_int("9" * 19) is None
    assert finite(10**400) is None and finite(float("inf")) is None and finite(True) is None
    assert finite(1e308) == 1e308
    assert worker_pid("h:²") == ("h", None) and worker_pid("h:" + "9" * 30) == ("h", None)
    assert worker_pid("h:42") == ("h", 42)
    assert sparkline([1e308, -1e308, 0.0]) == "█▁▅"


def test_a_metrics_value_past_the_float_range_is_left_out_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    raw = (f'{{"step": 1, "loss": {10**400}, "acc": 0.5}}\n{{"step": {10**400}, "loss": 1}}\n'
           '{"step": 2, "loss": 0.25}\n').encode()
    assert parse_entries(raw, "m.jsonl") == [{"step": 1, "acc": 0.5}, {"step": 2, "loss": 0.25}]
    assert "m.jsonl: left out 1 value(s) too large for a float" in capsys.readouterr().err
    assert parse_entries(b"[" * 100_000 + b"\n") == []  # nested past the stack: not an entry


# -- leases: records and names ---------------------------------------------------------------

def record(folder: Path, generation: int, **fields: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"host": HOST, "worker": f"{HOST}:1", "generation": generation, "nonce": "ab", **fields}
    (folder / f"{generation:08d}.json").write_text(json.dumps(doc))


def test_a_lease_holder_whose_pid_is_a_unicode_digit_is_a_holder_of_unknown_liveness(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    record(Path(run) / "lease", 1, worker=f"{HOST}:²")
    clock = Clock()
    leases = StoreLeases(fsspec.filesystem("file"), lease_s=60, worker="me:1", clock=clock)
    assert leases.take(run) is None  # not known to be gone: waited out, no traceback
    clock.now += 61
    took = leases.take(run)
    assert took is not None and took.generation == 2


def test_a_lease_generation_near_2_63_is_passed_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(tmp_path / "run")
    folder = Path(run) / "lease"
    record(folder, 1)
    (folder / "00000001.released").write_text("")
    record(folder, 2**63 - 1)
    (folder / f"{2**63 - 1:08d}.released").write_text("")
    took = StoreLeases(fsspec.filesystem("file"), lease_s=60, worker="me:1", clock=Clock()).take(run)
    assert took is not None and took.generation == 2
    assert "has a generation of more than 12 digits" in capsys.readouterr().err


@pytest.mark.parametrize("fields", [{"generation": 2**63}, {"started": 10**30}, {"lease_s": "inf"},
                                    {"lease_s": -1}, {"host": 5}, {"generation": "²"}])
def test_a_lease_record_with_numbers_sweeprun_never_writes_is_not_a_lease(tmp_path: Path, fields: dict) -> None:
    doc = {"host": "h", "worker": "h:1", "generation": 1, "nonce": "ab", **fields}
    from sweeprun.errors import StoreError

    with pytest.raises(StoreError, match="is not a sweeprun lease"):
        LeaseRecord.from_bytes(json.dumps(doc).encode(), "x.json")


def test_a_lease_record_claiming_a_huge_lease_s_does_not_block_the_run_for_good(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    record(Path(run) / "lease", 1, worker="elsewhere:1", host="elsewhere", lease_s=1e9)
    clock = Clock()
    leases = StoreLeases(fsspec.filesystem("file"), lease_s=60, worker="me:1", clock=clock)
    assert leases.take(run) is None
    clock.now += 10 * 60 + 1  # at most ten times this worker's own lease_s
    took = leases.take(run)
    assert took is not None and took.generation == 2


def test_a_plain_file_where_the_lease_folder_belongs_is_moved_aside(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "lease").write_text("not a folder")
    took = StoreLeases(fsspec.filesystem("file"), lease_s=60, worker="me:1", clock=Clock()).take(str(run))
    assert took is not None and took.generation == 1
    assert (run / "lease").is_dir() and [p.name for p in run.glob("lease.not-a-folder-*")]
    assert "was a file, not the run's lease folder" in capsys.readouterr().err


def test_launch_runs_a_run_whose_lease_path_is_a_file(sandbox: Sandbox) -> None:
    sweep = finished(sandbox, 1)
    (run,) = run_dirs(sandbox)
    (run / "DONE").unlink()
    for p in (sandbox.store / "t").glob("done*"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    subprocess.run(["rm", "-rf", str(run / "lease")], check=True)
    (run / "lease").write_text("")
    result = sandbox.run("launch", str(sweep), timeout=120)
    no_traceback(result)
    assert result.returncode == 0 and (run / "DONE").exists(), result.stderr


# -- status, show, plot on damaged metrics ---------------------------------------------------

def test_status_show_and_plot_carry_on_past_numbers_too_large(sandbox: Sandbox) -> None:
    pytest.importorskip("matplotlib")
    sweep = finished(sandbox)
    one, two = run_dirs(sandbox)
    with open(one / "metrics.jsonl", "a") as f:
        f.write(f'{{"step": 4, "loss": {10**400}}}\n{{"step": {10**400}, "loss": 1}}\n')
    with open(two / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1e308}\n{"step": 5, "loss": -1e308}\n')
    for args in (["status", str(sweep)], ["show", str(sweep), one.name],
                 ["plot", str(sweep), "--metric", "loss", "-o", str(sandbox.root / "p.png")]):
        result = sandbox.run(*args)
        no_traceback(result)
        assert result.returncode == 0, (args, result.stderr)
    assert "beyond ±1e+300" in result.stderr and (sandbox.root / "p.png").exists()
    rows = sandbox.status(sweep)
    assert rows[one.name]["step"] == 4 and rows[two.name]["step"] == 5


def test_status_shows_the_last_good_step_before_a_long_garbage_last_line(sandbox: Sandbox) -> None:
    sweep = finished(sandbox, 1)
    (run,) = run_dirs(sandbox)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"x" * (100 << 20) + b"\n")
    assert sandbox.status(sweep)[run.name]["step"] == 3


def test_plot_never_opens_a_named_pipe(sandbox: Sandbox) -> None:
    pytest.importorskip("matplotlib")
    sweep = finished(sandbox)
    one, _ = run_dirs(sandbox)
    (one / "metrics.jsonl").unlink()
    os.mkfifo(one / "metrics.jsonl")
    result = sandbox.run("plot", str(sweep), "--metric", "loss", "-o", str(sandbox.root / "p.png"), timeout=60)
    no_traceback(result)
    assert result.returncode == 0 and "1 run(s)" in result.stdout, result.stderr


def test_plot_reads_every_run_not_only_the_first_500(sandbox: Sandbox) -> None:
    pytest.importorskip("matplotlib")
    sweep = sandbox.write_sweep({"a": list(range(620))}, {"steps": 3, "sleep": 0})
    from sweeprun import Sweep, load_spec

    s = Sweep(load_spec(sweep))
    for run in s.runs[600:]:
        folder = Path(s.paths.run(run.run_id).dir)
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text('{"step": 1, "late": 1.0}\n{"step": 2, "late": 0.5}\n')
    result = sandbox.run("plot", str(sweep), "--metric", "late", "-o", str(sandbox.root / "p.png"))
    assert result.returncode == 0 and "wrote" in result.stdout and ": 20 run(s)" in result.stdout, result.stderr


def test_show_and_status_pass_over_a_trainer_folder_named_with_a_unicode_digit(sandbox: Sandbox) -> None:
    sweep = finished(sandbox, 1)
    (run,) = run_dirs(sandbox)
    (run / "trainer" / "checkpoint-²").mkdir(parents=True)
    (run / "trainer" / "checkpoint-²" / "sweeprun-seal.json").write_text("{}")
    for args in (["status", str(sweep)], ["show", str(sweep), run.name], ["gc", str(sweep), "--dry-run"]):
        result = sandbox.run(*args)
        no_traceback(result)
        assert result.returncode == 0, (args, result.stderr)


# -- launch --------------------------------------------------------------------------------------

def test_a_touched_stop_file_does_not_make_later_launches_refuse(sandbox: Sandbox) -> None:
    sweep = finished(sandbox, 1)
    (run,) = run_dirs(sandbox)
    (run / "DONE").unlink()
    for p in (sandbox.store / "t").glob("done*"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    (sandbox.store / "t" / "STOP").write_bytes(b"")
    result = sandbox.run("launch", str(sweep))
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "is not a stop request written by `sweeprun stop`" in result.stderr


def test_a_ledger_row_in_an_unknown_state_is_not_success(sandbox: Sandbox) -> None:
    sweep = finished(sandbox, 1)
    (run,) = run_dirs(sandbox)
    (run / "DONE").unlink()
    for p in (sandbox.store / "t").glob("done*"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    with sqlite3.connect(sandbox.ledger) as db:
        db.execute("UPDATE runs SET state = 'weird'")
    result = sandbox.run("launch", str(sweep))
    no_traceback(result)
    assert result.returncode == 2 and f"run {run.name} has an unknown state 'weird'" in result.stderr


def test_a_sweep_name_that_is_a_number_asks_for_quotes(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, name="t")
    sweep.write_text(sweep.read_text().replace("name: t", "name: 123"))
    result = sandbox.run("status", str(sweep))
    assert result.returncode == 2 and "name 123 must be a string: quote it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "digits" not in result.stderr


@pytest.mark.parametrize("delay_s", [0.01, 0.03, 0.06, 0.1, 0.2])
def test_ctrl_c_early_in_launch_is_130_without_a_traceback(sandbox: Sandbox, delay_s: float) -> None:
    """From the moment Python runs sweeprun's package (before that the interpreter is Python's
    own): a wrapper imports it, says so, then runs its ``__main__`` as ``python -m sweeprun`` does.
    A signal that lands in the wrapper's own lines, before ``sweeprun.__main__`` began (a
    loaded machine can take longer than the delay to get there), is the wrapper's: 130."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 3, "sleep": 0})
    code = ("import sys, sweeprun\n"
            "sys.argv = ['sweeprun', 'launch', sys.argv[1]]\n"
            "try:\n"
            "    sys.stderr.write('ready\\n'); sys.stderr.flush(); import sweeprun.__main__\n"
            "except KeyboardInterrupt:\n"
            "    if 'sweeprun.__main__' in sys.modules: raise\n"   # sweeprun's own: must not happen
            "    raise SystemExit(130) from None\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(sweep)], env=sandbox.env(), cwd=sandbox.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stderr.readline() == "ready\n"
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode in (130, 0), (proc.returncode, err)  # 0: it finished first
