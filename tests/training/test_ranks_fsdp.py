"""Multi-rank runs, FSDP2 (``fully_shard``): each rank holds a shard of every parameter and of
the optimizer state (DTensors); sweeprun saves them through DCP, each rank its own shards.

The script is tests/scripts/fsdp_train.py; the resume is started by torchrun itself, as a
user starts it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _ranks_helpers import FSDP, SIGTERM, RankRun, assert_same_result, assert_same_tree, reference

from sweeprun import open_store
from sweeprun.training import load_checkpoint


@pytest.mark.slow  # the fast subset's multi-rank test is DDP's; FSDP2 runs in the full suite
def test_sigterm_to_rank_0_saves_every_shard_and_a_torchrun_resume_is_exact(shared_dir: Path,
                                                                              tmp_path: Path) -> None:
    want = reference(shared_dir, FSDP)
    run = RankRun(FSDP, tmp_path / "run")
    procs = run.start("--step-sleep-s", "0.05")
    run.signal_at(procs, 5, rank=0, signum=SIGTERM)
    assert run.wait(procs) == [75, 75], run.err(0) + run.err(1)
    saved = [re.search(r"saved (\S+) at step (\d+)", run.err(r)) for r in (0, 1)]
    assert saved[0] and saved[1] and saved[0].groups() == saved[1].groups()
    newest = run.manifests()[-1]
    assert newest["world_size"] == 2 and {"__0_0.distcp", "__1_0.distcp"} <= set(newest["files"])

    result = run.torchrun()
    assert result.returncode == 0, result.stderr
    assert f"resumed from {saved[0][1]}" in result.stderr
    assert_same_result(run, want)
    # read from outside the run, the sharded checkpoint gathers into one process
    assert_same_tree(load_checkpoint(run.out)["objects"]["model"], run.final_state()["model"])


@pytest.mark.slow  # a moto S3 server and a whole 2-rank run
def test_on_an_object_store_every_rank_writes_its_shards_through_the_store(
        shared_dir: Path, s3_bucket: str, tmp_path: Path) -> None:
    want = reference(shared_dir, FSDP)
    run = RankRun(FSDP, f"{s3_bucket}/fsdp", logs=tmp_path / "run")  # type: ignore[arg-type]
    assert run.complete() == [0, 0], run.err(0) + run.err(1)
    store = open_store(f"{s3_bucket}/fsdp")
    manifests = [n for n in store.fs.ls(f"{store.root}/checkpoints", detail=False) if n.endswith(".json")]
    newest = json.loads(store.fs.cat_file(sorted(manifests)[-1]))
    shards = {n.rsplit("/", 1)[1] for n in store.fs.ls(f"{store.root}/checkpoints/{newest['data']}", detail=False)}
    assert shards == set(newest["files"]) and newest["world_size"] == 2
    got = run.final_state()
    assert_same_tree(got["model"], want.final_state()["model"], "model")
    assert_same_tree(load_checkpoint(run.out)["objects"]["model"], got["model"])
