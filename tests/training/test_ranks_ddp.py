"""Multi-rank runs, DDP: every rank drives its own ``Run``; they stop, save and resume together.

The script is tests/scripts/ddp_train.py, written as users write a torchrun script; the
ranks are started here as torchrun starts them (:mod:`_ranks_helpers`). Every test ends
where the product's promise is: the final model and optimizer, gathered by the script,
equal bit for bit those of a run never interrupted, with the same metrics line per step.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import fsspec
import pytest
import xxhash
from _ranks_helpers import (
    DDP,
    SIGKILL,
    SIGTERM,
    TOTAL_STEPS,
    RankRun,
    assert_same_result,
    reference,
)

from sweeprun.training.checkpoints import CheckpointDir
from sweeprun.training.restore import load_one


def _saved(err: str) -> tuple[str, int]:
    found = re.search(r"saved (\S+) at step (\d+); exiting with 75", err)
    assert found, err
    return found[1], int(found[2])


@pytest.mark.slow  # two DDP ranks trained three times; the launcher's SIGTERM test covers it in the fast subset: the full suite's
def test_sigterm_to_one_rank_saves_once_at_the_same_step_on_both_and_resumes_exactly(
        shared_dir: Path, tmp_path: Path) -> None:
    want = reference(shared_dir, DDP)
    run = RankRun(DDP, tmp_path / "run")
    procs = run.start("--step-sleep-s", "0.05")
    seen = run.signal_at(procs, 5, rank=1, signum=SIGTERM)
    assert run.wait(procs) == [75, 75], run.err(0) + run.err(1)
    assert _saved(run.err(0)) == _saved(run.err(1))          # one checkpoint, the same step
    name, step = _saved(run.err(0))
    assert seen <= step < TOTAL_STEPS
    newest = run.manifests()[-1]
    assert (newest["data"], newest["step"], newest["world_size"]) == (name, step, 2)
    assert sorted(newest["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "rank-0.pt", "rank-1.pt"]
    assert "another rank was asked to stop" in run.err(0)

    assert run.complete() == [0, 0], run.err(0) + run.err(1)
    assert f"resumed from {name} (step {step}" in run.err(0)
    assert_same_result(run, want)


@pytest.mark.slow  # the fast subset's multi-rank test is the SIGTERM one above
@pytest.mark.parametrize("async_save", ["1", "0"])
def test_a_kill_after_one_rank_wrote_its_part_resumes_from_the_previous_checkpoint(
        shared_dir: Path, tmp_path: Path, async_save: str) -> None:
    """Rank 1 dies in the second save after DCP wrote the shards and before its own state was
    written: that save has no manifest, is never read, and the next commit removes it.
    Cadence saves are background ones unless SWEEPRUN_ASYNC_SAVE=0: both paths."""
    want = reference(shared_dir, DDP)
    run = RankRun(DDP, tmp_path / "run", env={"SWEEPRUN_ASYNC_SAVE": async_save})
    procs = run.start(rank_env={1: {"SWEEPRUN_CRASH_AT": "checkpoint.before_rank_state@2"}})
    assert procs[1].wait(timeout=run.timeout_s) == -SIGKILL
    procs[0].send_signal(SIGKILL)                 # the launcher ends the rest of the attempt
    procs[0].wait(timeout=run.timeout_s)
    folder = run.out / "checkpoints"
    partial = folder / "ckpt-a1-00000002-step0000000008.dcp"
    assert (partial / "__1_0.distcp").exists() and not (partial / "rank-1.pt").exists()
    assert not partial.with_suffix(".json").exists()

    assert run.complete() == [0, 0], run.err(0) + run.err(1)
    assert "resumed from ckpt-a1-00000001-step0000000004.dcp (step 4" in run.err(0)
    assert_same_result(run, want)
    assert not partial.exists()                   # retention removed the save cut short


@pytest.mark.parametrize(("damage", "said"), [("rot", "__1_0.distcp is corrupt"),
                                              ("lost", "__1_0.distcp is missing")])
def test_a_sharded_checkpoint_whose_files_do_not_match_is_passed_over(shared_dir: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       damage: str, said: str) -> None:
    """The sizes and hashes are taken as DCP writes the files (never read back): they are
    those of the bytes on disk, and one flipped bit (or a shard lost) is still caught on restore."""
    want = reference(shared_dir, DDP)
    folder = tmp_path / "checkpoints"
    shutil.copytree(want.out / "checkpoints", folder)
    for manifest in want.manifests():
        for name, record in manifest["files"].items():
            raw = (folder / manifest["data"] / name).read_bytes()
            assert record == {"size": len(raw), "xxh3_128": xxhash.xxh3_128(raw).hexdigest()}, name
    newest = sorted(folder.glob("*.json"))[-1]
    shard = folder / json.loads(newest.read_text())["data"] / "__1_0.distcp"
    if damage == "rot":
        raw = bytearray(shard.read_bytes())
        raw[-1] ^= 1                                             # one bit of rot
        shard.write_bytes(bytes(raw))
    else:
        shard.unlink()
    directory = CheckpointDir(fsspec.filesystem("file"), str(folder))
    loaded = directory.load_latest(load=lambda m: load_one(directory, m, None))
    assert loaded is not None and loaded.manifest.stem < newest.stem
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(("rewrite", "restored"), [
    ("sha256", True),           # a sharded checkpoint of an older sweeprun: its files' SHA-256
    ("both", False),            # a record must name one hash
    ("neither", False),
])
def test_a_sharded_manifest_names_the_hash_of_each_file(shared_dir: Path, tmp_path: Path, rewrite: str,
                                                        restored: bool) -> None:
    """Shards are hashed with XXH3-128 now; a manifest naming SHA-256 still verifies, and a
    record naming two hashes or none makes the manifest unusable, never half-checked."""
    want = reference(shared_dir, DDP)
    folder = tmp_path / "checkpoints"
    shutil.copytree(want.out / "checkpoints", folder)
    newest = sorted(folder.glob("*.json"))[-1]
    manifest = json.loads(newest.read_text())
    for name, record in manifest["files"].items():
        if rewrite != "neither":
            record["sha256"] = hashlib.sha256((folder / manifest["data"] / name).read_bytes()).hexdigest()
        if rewrite != "both":
            del record["xxh3_128"]
    newest.write_text(json.dumps(manifest))
    directory = CheckpointDir(fsspec.filesystem("file"), str(folder))
    loaded = directory.load_latest(load=lambda m: load_one(directory, m, None))
    assert loaded is not None and (loaded.manifest.stem == newest.stem) == restored


def test_a_kill_between_a_commit_and_its_retention_keeps_the_commit_and_the_next_save_cleans_up(
        tmp_path: Path) -> None:
    """Retention runs after the commit, off the save's path: a process killed before it ran
    leaves the checkpoint it replaced, which the next save's retention removes. One rank
    with a process group (a sharded save, the same commit) keeps the test to two starts."""
    run = RankRun(DDP, tmp_path / "run", world=1, flags=("--epochs", "1", "--save-every-steps", "2"))
    procs = run.start(rank_env={0: {"SWEEPRUN_CRASH_AT": "checkpoint.before_retention@4"}})
    assert run.wait(procs) == [-SIGKILL], run.err(0)
    folder = run.out / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert [n for n in names if n.endswith(".json")] == [
        f"ckpt-a1-0000000{i}-step00000000{2 * i:02d}.json" for i in range(1, 5)]   # keep_last=3, one too many
    assert run.complete(world=1) == [0], run.err(0)
    assert "resumed from ckpt-a1-00000004-step0000000008.dcp (step 8" in run.err(0)
    left = sorted(p.name for p in folder.iterdir())
    kept = [n.removesuffix(".json") for n in left if n.endswith(".json")]
    assert len(kept) == 3 and left == sorted([*(f"{k}.json" for k in kept), *(f"{k}.dcp" for k in kept)])


@pytest.mark.slow  # three attempts; tests/fleet/test_ranks_sweep.py does it under the launcher too
def test_killed_at_two_ranks_resumed_at_one_reshards_and_says_it_was_approximate(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "lr=0.01"
    launcher = {"SWEEPRUN_RUN_DIR": str(run_dir), "SWEEPRUN_RUN_ID": "lr=0.01", "SWEEPRUN_SWEEP": "s"}
    run = RankRun(DDP, run_dir, env={**launcher, "SWEEPRUN_ATTEMPT": "1"})
    procs = run.start("--step-sleep-s", "0.05")
    run.signal_at(procs, 3, rank=0, signum=SIGTERM)
    assert run.wait(procs) == [75, 75], run.err(0) + run.err(1)
    name, step = _saved(run.err(0))
    assert json.loads((run_dir / "attempts" / "1.started").read_text())["world_size"] == 2

    run.env = {**launcher, "SWEEPRUN_ATTEMPT": "2", "SWEEPRUN_ON_WORLD_SIZE_CHANGE": "refuse"}
    assert run.complete(world=1) == [2]
    assert run.err(0).strip().splitlines()[-1] == (
        f"sweeprun: error: checkpoint {name} was written by 2 rank(s) and this run has 1; "
        "SWEEPRUN_ON_WORLD_SIZE_CHANGE=refuse (on_world_size_change: refuse in the sweep file) "
        "forbids resharding: run it with 2 rank(s), or allow reshard")

    run.env = {**launcher, "SWEEPRUN_ATTEMPT": "3"}
    assert run.complete(world=1) == [0], run.err(0)
    assert "resharded from 2 rank(s) to 1" in run.err(0)
    record = json.loads((run_dir / "attempts" / "3.started").read_text())
    assert record["world_size"] == 1
    assert record["resumed"] == {"checkpoint": name, "step": step, "world_size": 2,
                                 "approximate": ["rng", "data position"]}
    # one rank now takes all 48 samples of an epoch, 4 a step: the rest of epoch 0, then epoch 1
    final = 24 - step
    assert run.final_state()["step"] == final
    assert [e["step"] for e in run.entries()] == list(range(1, final + 1))
    assert (run_dir / "attempts" / "3.finished").exists()


@pytest.mark.slow  # the reverse of the case above: one process, then two
def test_killed_at_one_rank_resumed_at_two_reshards_too(tmp_path: Path) -> None:
    run = RankRun(DDP, tmp_path / "run", world=1)
    procs = run.start("--step-sleep-s", "0.05")
    run.signal_at(procs, 3, rank=0, signum=SIGTERM)
    assert run.wait(procs) == [75], run.err(0)
    name, step = _saved(run.err(0))
    assert run.manifests()[-1]["world_size"] == 1

    assert run.complete(world=2) == [0, 0], run.err(0) + run.err(1)
    assert f"resumed from {name} (step {step}" in run.err(0)
    assert "resharded from 1 rank(s) to 2" in run.err(1)
    final = run.final_state()["step"]
    assert step < final < TOTAL_STEPS * 2
    assert [e["step"] for e in run.entries()] == list(range(1, final + 1))


def test_a_taken_over_attempt_is_fenced_on_every_rank_and_writes_nothing(tmp_path: Path) -> None:
    """Attempt 2 has started elsewhere: at the first save both ranks of attempt 1 stop with 75."""
    run_dir = tmp_path / "runs" / "lr=0.01"
    (run_dir / "attempts").mkdir(parents=True)
    (run_dir / "attempts" / "2.json").write_text("{}")
    run = RankRun(DDP, run_dir, env={"SWEEPRUN_RUN_DIR": str(run_dir), "SWEEPRUN_RUN_ID": "lr=0.01",
                                     "SWEEPRUN_SWEEP": "s", "SWEEPRUN_ATTEMPT": "1"})
    assert run.complete() == [75, 75], run.err(0) + run.err(1)
    for rank in (0, 1):
        assert "attempt 2 has started" in run.err(rank)
    assert not list(run_dir.glob("checkpoints/*"))
