"""Issue 18 (the fleet probe), continued: Trainer folders in a bucket as ``show`` and ``gc``
see them, a ``verify`` whose script never exits, and the last numbers and nestings a file
in the store could use to crash a command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeprun import Sweep, load_spec, open_store
from sweeprun.errors import SpecError, StoreError
from sweeprun.fleet import parse_duration
from sweeprun.manage import run_detail
from sweeprun.store import read_json
from sweeprun.trainer_folders import GC_MARK
from sweeprun.training import sealed
from sweeprun.training.checkpoints import Name

from _training_helpers import sweeprun_verify
from conftest import Sandbox

REPO = Path(__file__).resolve().parents[2]

# -- Trainer folders in a bucket ----------------------------------------------------------------

#: A done Trainer run in a bucket as a kill-and-resume history leaves it, each folder uploaded
#: by the integration's own code (hf_store.StoreFolders.push: files, then the seal): 10, 20 and
#: 30 sealed (10 is the Trainer's best, named by its local staging path as the Trainer records
#: it), 40 sealed and then truncated in the store, 5 cut short (files, no seal), and one folder
#: a resume set aside.
BUCKET_FOLDERS = """
import json, os, tempfile
from sweeprun import open_store
from sweeprun.training import sealed
from sweeprun.integrations.hf_store import StoreFolders
from sweeprun.store import RunPaths

store = open_store(os.environ["SWEEPRUN_RUN_DIR"])
staging = tempfile.mkdtemp()
folders = StoreFolders(RunPaths(store.fs, store.root), staging, 2)

def folder(step, seal=True):
    path = os.path.join(staging, f"checkpoint-{step}")
    os.makedirs(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(bytes([step % 251]) * (1000 + step))
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "best_model_checkpoint": os.path.join(staging, "checkpoint-10")}, f)
    if seal:
        sealed.seal(path, step, {"attempt": 2, "created": 1.0e9 + step})
        folders.push(path, lambda: None)
    else:  # a kill between the files and the seal
        for name in os.listdir(path):
            store.fs.put_file(os.path.join(path, name), f"{folders.remote}/checkpoint-{step}/{name}")

for step in (10, 20, 30, 40):
    folder(step)
folder(5, seal=False)
weights = f"{folders.remote}/checkpoint-40/model.safetensors"
store.fs.pipe_file(weights, store.fs.cat_file(weights)[:100])
store.fs.pipe_file(f"{folders.remote}/{sealed.REJECTED}/checkpoint-35-a1/model.safetensors", b"x" * 100)
"""


def bucket_trainer_sweep(sandbox: Sandbox, bucket: str) -> tuple[Path, str, str]:
    """A launched sweep in ``bucket`` of one done run with Trainer folders: (sweep file, run
    id, the run's ``trainer`` folder as a URL)."""
    script = sandbox.root / "bucket_folders.py"
    script.write_text(BUCKET_FOLDERS)
    sweep = sandbox.write_sweep({"a": [1]}, {}, command=f"{sys.executable} {script}",
                                store=f"{bucket}/sweeps")
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stderr
    (run_id,) = sandbox.status(sweep)
    return sweep, run_id, f"{bucket}/sweeps/t/runs/{run_id}/trainer"


def bucket_folders(url: str) -> dict[str, set[str]]:
    """folder name (``.sweeprun-rejected/<name>`` for those set aside) -> its files' names."""
    store = open_store(url)
    out: dict[str, set[str]] = {}
    for path in store.fs.find(store.root):
        rel = str(path)[len(store.root) + 1:]
        if rel.startswith(sealed.REJECTED + "/"):
            folder, _, name = rel[len(sealed.REJECTED) + 1:].partition("/")
            folder = f"{sealed.REJECTED}/{folder}"
        else:
            folder, _, name = rel.partition("/")
        out.setdefault(folder, set()).add(name)
    return out


def cli(sandbox: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    return sandbox.run(*args, "--ledger", str(sandbox.ledger))


@pytest.mark.slow  # the bucket variants of show and gc: the fast subset has the half-removed folder in a bucket
def test_show_lists_the_trainer_folders_of_a_run_in_a_bucket(sandbox: Sandbox, s3_bucket: str) -> None:
    sweep, run_id, _ = bucket_trainer_sweep(sandbox, s3_bucket)
    detail = run_detail(Sweep(load_spec(sweep), str(sandbox.ledger)), run_id)
    rows = [(c.data, c.step, c.verified, c.problem) for c in detail.checkpoints]
    assert rows == [
        ("trainer/checkpoint-5", 5, False, "it was never sealed in the store (the upload was cut short)"),
        ("trainer/checkpoint-10", 10, True, None),
        ("trainer/checkpoint-20", 20, True, None),
        ("trainer/checkpoint-30", 30, True, None),
        ("trainer/checkpoint-40", 40, False, "model.safetensors is truncated or changed: 100 bytes, sealed 1040"),
        ("trainer/.sweeprun-rejected/checkpoint-35-a1", 35, False,
         "set aside by attempt 1 (it was never sealed in the store (the upload was cut short))"),
    ]
    by_name = {c.data: c for c in detail.checkpoints}
    assert (by_name["trainer/checkpoint-30"].created, by_name["trainer/checkpoint-30"].attempt) == (1.0e9 + 30, 2)
    assert by_name["trainer/checkpoint-5"].size > 1005   # the listed sizes: no seal to go by

    result = cli(sandbox, "show", str(sweep), run_id, "--json")
    assert result.returncode == 0, result.stderr
    assert [c["data"] for c in json.loads(result.stdout)["checkpoints"]] == [r[0] for r in rows]


@pytest.mark.slow  # see above; test_manage_hf has gc of Trainer folders on local disk
def test_gc_in_a_bucket_keeps_the_newest_verified_folder_and_the_best(sandbox: Sandbox, s3_bucket: str) -> None:
    sweep, run_id, trainer = bucket_trainer_sweep(sandbox, s3_bucket)
    before = bucket_folders(trainer)
    assert set(before) == {"checkpoint-5", "checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40",
                           ".sweeprun-rejected/checkpoint-35-a1"}

    dry = cli(sandbox, "gc", str(sweep), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 checkpoint(s)" in dry.stdout
    assert "kept trainer/checkpoint-30, trainer/checkpoint-10" in dry.stdout
    assert bucket_folders(trainer) == before

    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    # 30: the newest that verifies; 10: the Trainer's best. 20 goes; 5 (never sealed), 40
    # (damaged) and the set-aside one stay: evidence.
    assert set(bucket_folders(trainer)) == set(before) - {"checkpoint-20"}
    assert "removed 1 checkpoint(s) (1.4 KB); kept trainer/checkpoint-30, trainer/checkpoint-10" in result.stdout
    assert "t: removed 3 file(s)" in result.stdout   # its weights, trainer_state.json and seal
    assert ("left trainer/checkpoint-40, trainer/checkpoint-5, trainer/.sweeprun-rejected (damaged or "
            "set aside; look inside, then --damaged removes them)") in result.stdout
    assert bucket_folders(trainer)["checkpoint-30"] == before["checkpoint-30"]   # kept whole

    result = cli(sandbox, "gc", str(sweep), "--damaged")
    assert result.returncode == 0, result.stderr
    assert set(bucket_folders(trainer)) == {"checkpoint-10", "checkpoint-30"}
    again = cli(sandbox, "gc", str(sweep), "--damaged")
    assert "removed 0 file(s), freed 0 B" in again.stdout, again.stdout


@pytest.mark.slow  # a sweep trained in a bucket: the full suite's
def test_a_folder_half_removed_in_a_bucket_is_never_taken_for_a_checkpoint_and_the_next_gc_ends_it(
        sandbox: Sandbox, s3_bucket: str) -> None:
    sweep, run_id, trainer = bucket_trainer_sweep(sandbox, s3_bucket)
    store = open_store(trainer)
    # a gc killed in the middle of removing checkpoint-30 (the newest good one until then):
    # its mark is written and its seal gone, the weights still there
    store.fs.pipe_file(f"{store.root}/checkpoint-30/{GC_MARK}", b"")
    store.fs.rm_file(f"{store.root}/checkpoint-30/{sealed.SEAL}")
    detail = run_detail(Sweep(load_spec(sweep), str(sandbox.ledger)), run_id)
    half = next(c for c in detail.checkpoints if c.data == "trainer/checkpoint-30")
    assert not half.verified and "half removed by a gc" in str(half.problem)

    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    assert "kept trainer/checkpoint-20, trainer/checkpoint-10" in result.stdout   # 20 is now the newest
    assert set(bucket_folders(trainer)) == {"checkpoint-5", "checkpoint-10", "checkpoint-20", "checkpoint-40",
                                            ".sweeprun-rejected/checkpoint-35-a1"}


# -- verify: a script that never exits -------------------------------------------------------------

#: The smallest user of the training API; an attempt that resumed then hangs for good (a
#: deadlock after a resume, a wait on a lock the killed attempt held).
HANGS_AFTER_RESUME = """\
import random, time
from sweeprun.training import init

random.seed(0)
run = init(every_steps=3)
run.restore()
if run.step > 0:
    time.sleep(3600)
while run.step < 30:
    time.sleep(0.01)
    run.end_step(loss=random.random())
run.finish()
"""


@pytest.mark.slow  # a verify that waits out a hung attempt: the full suite's
def test_verify_kills_a_resumed_attempt_that_never_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeprun import verify as verify_module
    from sweeprun.verify import attempts

    script = tmp_path / "hangs.py"
    script.write_text(HANGS_AFTER_RESUME)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    # the default bound, 3x the uninterrupted run's time, without its 60 s floor: a short test
    monkeypatch.setattr(verify_module, "MIN_TIMEOUT_S", 0.0)
    lines: list[str] = []
    report = verify_module.verify([sys.executable, str(script)], kills=1, say=lines.append)
    assert report.exit_code == 1, report.lines
    (verdict, *_) = report.lines
    assert verdict.startswith("NOT EXACT: attempt 2: resumed from step "), verdict
    assert "did not exit within" in verdict and "3x the uninterrupted run's" in verdict, verdict
    assert "killed with its process group" in verdict, verdict
    # the hanging process is gone: nothing of the script is left running
    assert not [p for p in attempts._members(os.getpid()) if p != os.getpid()]
    assert report.kept is not None and (report.kept / "interrupted" / "logs" / "attempt-2.log").exists()


def test_verify_timeout_s_bounds_the_uninterrupted_run_too(tmp_path: Path) -> None:
    result = sweeprun_verify("--timeout-s", "1", "--", sys.executable, "-c", "import time; time.sleep(3600)",
                             tmp=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "the uninterrupted run did not exit within 1 s (--timeout-s) and was killed" in line, line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_verify_timeout_s_must_be_a_positive_number(tmp_path: Path, value: str) -> None:
    result = sweeprun_verify("--timeout-s", value, "--", sys.executable, "-c", "pass", tmp=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"--timeout-s {float(value)!r}: give a number of seconds above 0" in line, line
    assert "Traceback" not in result.stderr


# -- the last numbers and nestings ------------------------------------------------------------------

def test_a_json_file_nested_too_deeply_is_one_store_error(tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    store = open_store(str(tmp_path))
    with pytest.raises(StoreError, match=r"params.json: it is nested too deeply"):
        read_json(store.fs, str(path))


def test_show_and_status_carry_on_past_a_params_file_nested_too_deeply(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 2, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (run,) = (sandbox.store / "t" / "runs").iterdir()
    for name in ("params.json", "attempts/1.json"):
        (run / name).write_text("[" * 100_000 + "]" * 100_000)
    # a run no longer in the sweep file, shown on a machine with no ledger rows: its params
    # and attempts come from the store's files
    other = sandbox.write_sweep({"a": [2]}, {"steps": 2, "sleep": 0})
    result = sandbox.run("show", str(other), run.name, "--ledger", str(sandbox.root / "new-machine.db"))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["ckpt-a1-" + "9" * 19 + "-step1.pt", "ckpt-a1-1-step" + "9" * 19 + ".json",
                                  "ckpt-a" + "9" * 19 + "-1-step1.pt", "ckpt-a1-1-step1.pt\n",
                                  "ckpt-a1-\u0661-step1.pt", "ckpt-a1-1-step\u00b2.json"])
def test_a_checkpoint_name_is_ascii_digits_of_bounded_length(name: str) -> None:
    assert Name.parse(name) is None
    assert Name.parse("ckpt-a1-" + "9" * 18 + "-step" + "9" * 18 + ".pt") == Name(1, 10**18 - 1, 10**18 - 1)


@pytest.mark.parametrize("text", ["\u0661\u0662", "\u0661h", "1\u0665m", "\uff11\uff12s"])
def test_a_time_limit_in_other_scripts_digits_is_refused(text: str) -> None:
    with pytest.raises(SpecError, match="--time-limit"):
        parse_duration(text)


def test_a_time_limit_in_ascii_digits_still_parses() -> None:
    assert parse_duration("1h30m") == 5400.0 and parse_duration("90") == 90.0


def test_a_seal_nested_past_the_parsers_limit_is_a_damaged_folder(tmp_path: Path) -> None:
    """A seal is a file anyone can write: nested too deeply, it is one reason, not a traceback
    (local resume and gc read it with read_seal, a bucket's with parse_seal)."""
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / sealed.SEAL).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        sealed.read_seal(str(folder))
    scan = sealed.newest_sealed(str(tmp_path))
    assert scan.chosen is None and "nested too deeply" in scan.rejected[0][1]
