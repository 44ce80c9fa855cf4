"""`status`, `show` and `gc` of Hugging Face Trainer runs, whose checkpoints are sealed
folders (``<run>/trainer/checkpoint-<step>/``) rather than sweeprun's own files.

Most tests launch a small script that writes the folders the way the Trainer callback
leaves them (files, then ``sealed.seal()``), plus the damage a kill leaves behind; one
launches examples/hf_trainer.py itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from test_manage import cli, runs_dir

from sweeprun import Sweep, load_spec
from sweeprun.manage import run_detail
from sweeprun.render import run_view
from sweeprun.training import sealed

from conftest import Sandbox

REPO = Path(__file__).resolve().parents[2]

#: A done Trainer run as a kill-and-resume history leaves it: checkpoint-5 never sealed
#: (killed mid-save in attempt 1), 10, 20 and 30 sealed (10 is the Trainer's best), 40
#: sealed and then damaged (its weights truncated), and one folder a resume set aside.
FOLDERS_SCRIPT = """
import json, os, sys
from sweeprun.training import sealed
out = os.path.join(os.environ["SWEEPRUN_RUN_DIR"], "trainer")

def folder(path, step, seal=True):
    os.makedirs(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(bytes([step % 251]) * (1000 + step))
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "best_model_checkpoint": os.path.join(out, "checkpoint-10")}, f)
    if seal:
        sealed.seal(path, step, {"attempt": 2, "created": 1.0e9 + step})

folder(os.path.join(out, "checkpoint-5"), 5, seal=False)
for step in (10, 20, 30, 40):
    folder(os.path.join(out, f"checkpoint-{step}"), step)
with open(os.path.join(out, "checkpoint-40", "model.safetensors"), "r+b") as f:
    f.truncate(100)
folder(os.path.join(out, sealed.REJECTED, "checkpoint-35-a1"), 35, seal=False)
"""


def trainer_sweep(sandbox: Sandbox) -> tuple[Path, str, Path]:
    """A launched sweep of one done run with Trainer folders: (sweep file, run id, trainer folder)."""
    script = sandbox.root / "folders.py"
    script.write_text(FOLDERS_SCRIPT)
    sweep = sandbox.write_sweep({"a": [1]}, {}, command=f"{sys.executable} {script}")
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stderr
    (run_id,) = sandbox.status(sweep)
    return sweep, run_id, runs_dir(sandbox) / run_id / "trainer"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_status_ages_a_trainer_run_by_its_newest_seal(sandbox: Sandbox) -> None:
    sweep, run_id, trainer = trainer_sweep(sandbox)
    hour_ago = time.time() - 3600
    for path in trainer.rglob("*"):  # everything written an hour ago ...
        os.utime(path, (hour_ago, hour_ago), follow_symlinks=False)
    day_ago = time.time() - 86400
    for path in (runs_dir(sandbox) / run_id).rglob("*"):
        if "trainer" not in path.parts:  # ... the rest of the run's files even longer ago
            os.utime(path, (day_ago, day_ago), follow_symlinks=False)
    age = sandbox.status(sweep)[run_id]["checkpoint_age_s"]
    assert age is not None and 3600 <= age < 3600 + 600  # the upper bound only guards a hang
    # only seals count: an unsealed folder written just now is not a checkpoint yet
    (trainer / "checkpoint-50").mkdir()
    (trainer / "checkpoint-50" / "model.safetensors").write_bytes(b"half")
    age = sandbox.status(sweep)[run_id]["checkpoint_age_s"]
    assert 3600 <= age < 3600 + 600


def test_show_lists_each_trainer_folder_verified_or_why_not(sandbox: Sandbox) -> None:
    sweep, run_id, trainer = trainer_sweep(sandbox)
    detail = run_detail(Sweep(load_spec(sweep), str(sandbox.ledger)), run_id)
    rows = [(c.data, c.step, c.verified, c.problem) for c in detail.checkpoints]
    assert rows == [
        ("trainer/checkpoint-5", 5, False, "it was never sealed (the save was cut short)"),
        ("trainer/checkpoint-10", 10, True, None),
        ("trainer/checkpoint-20", 20, True, None),
        ("trainer/checkpoint-30", 30, True, None),
        ("trainer/checkpoint-40", 40, False, "model.safetensors is truncated or changed: 100 bytes, sealed 1040"),
        ("trainer/.sweeprun-rejected/checkpoint-35-a1", 35, False,
         "set aside by attempt 1 (it was never sealed (the save was cut short))"),
    ]
    by_name = {c.data: c for c in detail.checkpoints}
    # sealed folders: the sealed size (every file) and the seal's own time; others from the disk
    seal_30 = json.loads((trainer / "checkpoint-30" / sealed.SEAL).read_text())
    assert by_name["trainer/checkpoint-30"].size == sum(f["size"] for f in seal_30["files"].values())
    assert by_name["trainer/checkpoint-30"].created == 1.0e9 + 30
    assert by_name["trainer/checkpoint-30"].attempt == 2
    assert by_name["trainer/checkpoint-5"].size == sum(p.stat().st_size for p in (trainer / "checkpoint-5").iterdir())

    console = Console(record=True, width=160)
    console.print(run_view(detail))
    text = console.export_text()
    assert "trainer/checkpoint-30" in text and text.count("yes") == 3
    assert "no: model.safetensors is truncated or changed: 100 bytes, sealed 1040" in text
    as_json = json.loads(cli(sandbox, "show", str(sweep), run_id, "--json").stdout)
    assert [c["data"] for c in as_json["checkpoints"]] == [r[0] for r in rows]


def test_gc_keeps_the_newest_verified_folder_and_the_best_and_leaves_evidence(sandbox: Sandbox) -> None:
    sweep, run_id, trainer = trainer_sweep(sandbox)
    before = names(trainer)

    dry = cli(sandbox, "gc", str(sweep), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert names(trainer) == before
    assert "would remove 1 checkpoint(s)" in dry.stdout

    size_20 = sum(p.stat().st_size for p in (trainer / "checkpoint-20").iterdir())
    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    # 30: the newest that verifies (what a resume takes); 10: the Trainer's best. 20 goes
    # (older, sealed); 5 (never sealed), 40 (damaged) and the set-aside one stay: evidence.
    assert names(trainer) == [".sweeprun-rejected", "checkpoint-10", "checkpoint-30", "checkpoint-40",
                              "checkpoint-5"]
    assert f"removed 1 checkpoint(s) ({size_20 / 1000:.1f} KB); kept trainer/checkpoint-30, " \
           "trainer/checkpoint-10" in result.stdout
    assert ("left trainer/checkpoint-40, trainer/checkpoint-5, trainer/.sweeprun-rejected (damaged or "
            "set aside; look inside, then --damaged removes them)") in result.stdout
    for kept in ("checkpoint-10", "checkpoint-30"):
        sealed.verify(str(trainer / kept))  # whole: nothing inside a kept folder was touched

    result = cli(sandbox, "gc", str(sweep), "--damaged")
    assert result.returncode == 0, result.stderr
    assert names(trainer) == ["checkpoint-10", "checkpoint-30"]
    assert "removed 3 checkpoint(s)" in result.stdout

    again = cli(sandbox, "gc", str(sweep), "--damaged")
    assert "removed 0 file(s), freed 0 B" in again.stdout


def test_gc_finishes_what_a_killed_gc_left(sandbox: Sandbox) -> None:
    """gc renames a folder before deleting it: killed in between, the renamed folder is no
    checkpoint to any reader, and the next gc deletes it."""
    sweep, run_id, trainer = trainer_sweep(sandbox)
    shutil.copytree(trainer / "checkpoint-20", trainer / ".tmp-gc-checkpoint-20-4242")
    (trainer / "checkpoint-20").rename(trainer / ".tmp-gc-checkpoint-15-4242")
    assert [c.data for c in run_detail(Sweep(load_spec(sweep), str(sandbox.ledger)), run_id).checkpoints
            if ".tmp-gc" in c.data] == []
    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    assert "removed 2 temp file(s)" in result.stdout
    assert not any(name.startswith(".tmp-gc") for name in names(trainer))


def test_gc_of_a_trainer_run_with_no_folder_that_verifies_removes_nothing(sandbox: Sandbox) -> None:
    sweep, run_id, trainer = trainer_sweep(sandbox)
    for name in ("checkpoint-10", "checkpoint-20", "checkpoint-30"):
        (trainer / name / "model.safetensors").write_bytes(b"")
    before = names(trainer)
    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    assert names(trainer) == before
    assert "left trainer/checkpoint-40, trainer/checkpoint-30, trainer/checkpoint-20" in result.stdout


@pytest.mark.slow
def test_a_real_trainer_run_in_status_show_and_gc(sandbox: Sandbox) -> None:
    pytest.importorskip("transformers")
    sweep = sandbox.write_sweep(
        {"seed": [3]}, {"max_steps": 12, "save_steps": 4},
        command=f"{sys.executable} {REPO / 'examples' / 'hf_trainer.py'} --seed {{seed}} "
                "--max-steps {max_steps} --save-steps {save_steps}")
    result = sandbox.run("launch", str(sweep), timeout=600)
    assert result.returncode == 0, result.stderr
    (run_id,) = sandbox.status(sweep)
    trainer = runs_dir(sandbox) / run_id / "trainer"
    assert sorted(p.name for p in trainer.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    row = sandbox.status(sweep)[run_id]
    seal_age = time.time() - (trainer / "checkpoint-12" / sealed.SEAL).stat().st_mtime
    assert row["checkpoint_age_s"] is not None and row["checkpoint_age_s"] <= seal_age + 1
    detail: dict[str, Any] = json.loads(cli(sandbox, "show", str(sweep), run_id, "--json").stdout)
    assert [(c["data"], c["step"], c["verified"]) for c in detail["checkpoints"]] == [
        ("trainer/checkpoint-4", 4, True), ("trainer/checkpoint-8", 8, True), ("trainer/checkpoint-12", 12, True)]
    assert all(c["size"] > 10_000 and c["attempt"] == 1 for c in detail["checkpoints"])
    result = cli(sandbox, "gc", str(sweep))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in trainer.glob("checkpoint-*")) == ["checkpoint-12"]
    sealed.verify(str(trainer / "checkpoint-12"))


def test_a_seal_that_names_a_file_outside_its_folder_does_not_verify(tmp_path: Path) -> None:
    """A seal is a file anyone can edit; what it names is read, hashed and downloaded."""
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "secret").write_bytes(b"not ours")
    record = sealed.seal(str(folder), 5, {})
    record["files"]["../secret"] = record["files"].pop("model.safetensors")
    (folder / sealed.SEAL).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"its seal names '\.\./secret', outside the folder"):
        sealed.verify(str(folder))
