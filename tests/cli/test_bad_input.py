"""The catalogue of user mistakes: each gets one line naming the problem and where, exit 2,
no traceback, and nothing written (no store folder, no ledger)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sweeprun.cli import main
from sweeprun.ledger import open_ledger

GOOD = """\
name: demo
command: python train.py --lr {lr} --seed {seed}
store: {store}
grid:
  lr: [0.1, 0.01]
  seed: [0, 1]
params:
  epochs: 2
"""

# (case id, sweep file text or None for GOOD, extra CLI args, expected message fragment)
SPEC_CASES = [
    ("invalid-yaml", "name: demo\ngrid: [1, 2\n", [], "invalid YAML"),
    ("empty-file", "", [], "the sweep file is empty"),
    ("top-level-list", "- name: demo\n", [], "must be a mapping"),
    ("typo-grid", GOOD.replace("grid:", "gird:"), [], "unknown key 'gird' (did you mean 'grid'?)"),
    ("typo-command", GOOD.replace("command:", "comand:"), [], "did you mean 'command'?"),
    ("typo-max-attempts", GOOD + "max_attempt: 3\n", [], "did you mean 'max_attempts'?"),
    ("missing-name", GOOD.replace("name: demo\n", ""), [], "missing required key 'name'"),
    ("missing-command", GOOD.replace("command: python train.py --lr {lr} --seed {seed}\n", ""), [],
     "missing required key 'command'"),
    ("missing-grid", "name: demo\ncommand: python x.py\nstore: {store}\n", [], "missing required key 'grid'"),
    ("name-with-slash", GOOD.replace("name: demo", "name: a/b"), [], "name 'a/b' may only use"),
    ("name-dotdot", GOOD.replace("name: demo", "name: '..'"), [], "name '..' may only use"),
    ("empty-command", GOOD.replace("python train.py --lr {lr} --seed {seed}", "''"), [],
     "command must be a non-empty string"),
    ("command-not-string", GOOD.replace("python train.py --lr {lr} --seed {seed}", "[python, x]"), [],
     "command must be a non-empty string"),
    ("grid-is-list", GOOD.replace("  lr: [0.1, 0.01]\n  seed: [0, 1]", "  - 0.1"), [],
     "grid must map parameter names"),
    ("grid-empty", GOOD.replace("  lr: [0.1, 0.01]\n  seed: [0, 1]", "  {}").replace("grid:\n  {}", "grid: {}"),
     [], "grid must map parameter names"),
    ("axis-empty", GOOD.replace("[0.1, 0.01]", "[]"), [], "grid.lr is an empty list"),
    ("axis-scalar", GOOD.replace("[0.1, 0.01]", "0.1"), [], "grid.lr must be a list"),
    ("axis-mapping-value", GOOD.replace("[0.1, 0.01]", "[{a: 1}]"), [], "must be scalars or lists"),
    ("axis-duplicate", GOOD.replace("[0.1, 0.01]", "[0.1, 0.1]"), [], "lists 0.1 more than once"),
    ("axis-duplicate-spelling", GOOD.replace("[0, 1]", "[1, 1.0]"), [], "lists 1 more than once"),
    ("axis-duplicate-bool-spelling", GOOD.replace("[0, 1]", "[true, True]"), [], "lists true more than once"),
    ("param-name-dash", GOOD.replace("  epochs: 2", "  learning-rate: 2"), [], "must be a Python identifier"),
    ("param-in-grid-and-params", GOOD.replace("  epochs: 2", "  lr: 2"), [], "both in grid and in params"),
    ("reserved-param", GOOD.replace("  epochs: 2", "  run_id: 2"), [], "reserved"),
    ("params-not-mapping", GOOD.replace("  epochs: 2", "  - 2"), [], "params must map"),
    ("unknown-placeholder", GOOD.replace("{seed}", "{sed}"), [], "unknown placeholder {sed} (did you mean 'seed'?)"),
    ("unbalanced-brace", GOOD.replace("{seed}", "{seed"), [], "bad placeholder"),
    ("unbalanced-quote", GOOD.replace("--seed {seed}", "--seed '{seed}"), [], "cannot be split into words"),
    ("max-attempts-zero", GOOD + "max_attempts: 0\n", [], "max_attempts must be an integer from 1 to 1,000,000"),
    ("max-attempts-text", GOOD + "max_attempts: three\n", [], "max_attempts must be an integer from 1 to 1,000,000"),
    ("duplicate-key", GOOD + "name: again\n", [], "key 'name' appears twice"),
    ("negative-lease", GOOD + "lease_s: -5\n", [], "lease_s must be a finite number from 1 to 86400"),
    ("no-store", GOOD.replace("store: {store}\n", ""), [], "no store given"),
    ("unknown-protocol", GOOD.replace("store: {store}", "store: nosuch://bucket/x"), [], "Protocol not known"),
    ("store-parent-missing", GOOD.replace("store: {store}", "store: /nonexistent-mount/drive/sweeps"), [],
     "does not exist (is the drive mounted?)"),
    ("placeholder-attribute", GOOD.replace("{seed}", "{seed.__class__}"), [],
     "placeholder '{seed.__class__}' is not a name"),
    ("placeholder-attribute-real", GOOD.replace("{seed}", "{seed.real}"), [], "placeholder '{seed.real}' is not a name"),
    ("placeholder-index", GOOD.replace("{seed}", "{seed[99]}"), [], "placeholder '{seed[99]}' is not a name"),
    ("placeholder-positional", GOOD.replace("{seed}", "{0}"), [], "placeholder '{0}' is not a name"),
    ("placeholder-conversion", GOOD.replace("{seed}", "{seed!r}"), [], "{seed!r} has a conversion"),
    ("format-d-on-float", GOOD.replace("{lr}", "{lr:d}"), [],
     "{lr:d} cannot format lr = 0.1: Unknown format code 'd' for object of type 'float'"),
    ("format-f-on-text", GOOD.replace("{seed}", "{seed:.3f}").replace("[0, 1]", "[a, b]"), [],
     "{seed:.3f} cannot format seed = 'a'"),
    ("format-char-out-of-range", GOOD.replace("{seed}", "{seed:c}").replace("[0, 1]", "[0, 2000000]"), [],
     "{seed:c} cannot format seed = 2000000"),
    ("format-huge-width", GOOD.replace("{seed}", "{seed:99999999}"), [], "asks for a width or precision over 1000"),
    ("format-nested", GOOD.replace("{seed}", "{seed:{lr}}"), [], "has a placeholder inside its format spec"),
    ("flag-not-boolean", GOOD + "flags:\n  seed: --seed\n", [], "flags.seed: seed must be true or false in every run"),
    ("flag-unknown-param", GOOD + "flags:\n  fp16: --fp16\n", [], "flags.fp16: 'fp16' is not a parameter"),
    ("flag-inside-a-word", GOOD.replace("{seed}", "--fp16={seed}").replace("[0, 1]", "[true, false]")
     + "flags:\n  seed: --fp16\n", [], "{seed} is a flag (flags.seed); write it as a word of its own"),
    ("flag-not-in-command", GOOD.replace("  seed: [0, 1]", "  seed: [0, 1]\n  fp16: [true, false]")
     + "flags:\n  fp16: --fp16\n", [], ":11: flags.fp16 is never used: put {fp16} in the command"),
    ("name-too-long", GOOD.replace("name: demo", "name: " + "n" * 300), [], "at most 128"),
    ("lease-inf-in-file", GOOD + "lease_s: .inf\n", [], "lease_s must be a finite number from 1 to 86400, got inf"),
    ("grace-nan-in-file", GOOD + "grace_s: .nan\n", [], "grace_s must be a finite number from 0 to 86400, got nan"),
    ("max-attempts-huge-in-file", GOOD + "max_attempts: 99999999999999999999\n", [],
     "max_attempts must be an integer from 1 to 1,000,000"),
    ("max-runs-zero", GOOD + "max_runs: 0\n", [], "max_runs must be an integer from 1"),
    ("duplicate-by-text", GOOD.replace("[0, 1]", "[1, '1']"), [], "lists 1 and '1', which both give '1'"),
    ("workers-zero", None, ["--workers", "0"], "Invalid value for '--workers'"),
    ("gpus-not-numbers", None, ["--gpus", "a,b"], "--gpus 'a,b': give GPU indices"),
    ("gpus-twice", None, ["--gpus", "0,0"], "names a GPU twice"),
    ("grace-negative", None, ["--grace-s", "-1"], "Invalid value for '--grace-s'"),
    ("unknown-flag", None, ["--wokers", "2"], "No such option: --wokers"),
    ("ledger-unknown-backend", None, ["--ledger", "redis://localhost/0"], "unknown backend 'redis'"),
    ("empty-store-flag", None, ["--store", " "], "--store must be a non-empty string"),
]


def run_cli(args: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("text,args,fragment", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_mistake_gets_one_line_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str], text: str | None,
                                                  args: list[str], fragment: str) -> None:
    monkeypatch.setenv("SWEEPRUN_HOME", str(tmp_path / "state"))
    store = tmp_path / "store"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text((text if text is not None else GOOD).replace("{store}", str(store)))
    code, _, err = run_cli(["launch", str(sweep), *args], capfd)
    assert_one_line_error(code, err, fragment)
    assert not store.exists()
    assert not (tmp_path / "state").exists()


def test_missing_and_directory_sweep_files(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(*run_cli(["launch", str(tmp_path / "nope.yaml")], capfd)[::2],
                          "nope.yaml does not exist")
    assert_one_line_error(*run_cli(["status", str(tmp_path)], capfd)[::2], "is a folder")


def test_errors_name_the_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(GOOD.replace("{store}", str(tmp_path / "store")).replace("{seed}", "{sed}"))
    code, _, err = run_cli(["launch", str(sweep)], capfd)
    assert f"{sweep}:2: unknown placeholder" in err


@pytest.fixture
def good_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWEEPRUN_HOME", str(tmp_path / "state"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(GOOD.replace("{store}", str(tmp_path / "store")))
    return sweep


def test_store_that_is_a_file(good_sweep: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(["launch", str(good_sweep), "--store", str(tmp_path / "afile")], capfd)
    assert_one_line_error(code, err, "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_store_not_writable(good_sweep: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run_cli(["launch", str(good_sweep), "--store", str(locked / "store")], capfd)
    assert_one_line_error(code, err, "permission denied")


def test_corrupt_ledger(good_sweep: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ledger = tmp_path / "ledger.sqlite"
    ledger.write_bytes(b"garbage" * 1000)
    code, _, err = run_cli(["launch", str(good_sweep), "--ledger", str(ledger)], capfd)
    assert_one_line_error(code, err, "is corrupt")
    assert "delete it and run again" in err
    assert not (tmp_path / "store").exists()


def test_ledger_that_is_a_folder(good_sweep: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["launch", str(good_sweep), "--ledger", str(tmp_path)], capfd)
    assert_one_line_error(code, err, "is a folder")


def test_locked_ledger(good_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capfd: pytest.CaptureFixture[str]) -> None:
    ledger = tmp_path / "ledger.sqlite"
    open_ledger(ledger, "t").close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys, time
        c = sqlite3.connect({str(ledger)!r}, isolation_level=None)
        c.execute("BEGIN EXCLUSIVE"); print("locked", flush=True); time.sleep(60)""")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("SWEEPRUN_BUSY_TIMEOUT_S", "0.5")
        code, _, err = run_cli(["launch", str(good_sweep), "--ledger", str(ledger)], capfd)
        assert_one_line_error(code, err, "stayed locked")
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "store").exists()


def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(GOOD.replace("{store}", str(tmp_path / "store")).replace("grid:", "gird:"))
    result = subprocess.run([sys.executable, "-m", "sweeprun", "launch", str(sweep)],
                            capture_output=True, text=True, env={**os.environ, "SWEEPRUN_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.slow  # whole training runs; the full suite (CI) runs it
@pytest.mark.parametrize("source", ["another run", "another sweep"])
def test_a_checkpoint_from_elsewhere_is_refused_in_one_line(sandbox, source: str) -> None:
    """Checkpoints copied into a run's folder from another run or sweep are never loaded:
    the training script stops with one line and exit 2; the files are left as they were."""
    import shutil

    from conftest import REPO

    command = (f"python {REPO}/examples/train_mlp.py --lr {{lr}} --seed 0 --epochs 1 "
               "--save-every-steps 4")
    lrs = [0.01, 0.02] if source == "another run" else [0.01]   # the donor: a neighbour, or its twin
    sweep = sandbox.write_sweep({"lr": lrs}, command=command, max_attempts=1)
    assert sandbox.run("launch", str(sweep), "--workers", "2").returncode == 0
    runs = sandbox.store / "t" / "runs"
    if source == "another sweep":
        other = sandbox.write_sweep({"lr": lrs}, command=command, name="other")
        assert sandbox.run("launch", str(other)).returncode == 0
        (victim,) = runs.iterdir()
        donor = sandbox.store / "other" / "runs" / victim.name
    else:
        victim, donor = sorted(runs.iterdir())
    (victim / "DONE").unlink()
    shutil.rmtree(victim / "checkpoints")
    shutil.copytree(donor / "checkpoints", victim / "checkpoints")
    before = sorted((p.name, p.read_bytes()) for p in (victim / "checkpoints").iterdir())

    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 1  # the run failed for good (max_attempts: 1)
    log = (victim / "logs" / "attempt-2.log").read_text()
    assert log.count("\n") == 1 and "Traceback" not in log
    assert log.startswith("sweeprun: error: checkpoint") and "belongs to" in log
    assert sorted((p.name, p.read_bytes()) for p in (victim / "checkpoints").iterdir()) == before
    status = sandbox.status(sweep)
    assert status[victim.name]["state"] == "failed"
    assert all(row["state"] == "done" for name, row in status.items() if name != victim.name)
