"""The Lightning callback under ``strategy="ddp"`` and the Hugging Face Trainer on two ranks.

Each script is written as users write one for ``torchrun --nproc-per-node 2``
(tests/scripts/lightning_ddp.py, tests/scripts/hf_ddp.py); the ranks are started here as
torchrun starts them (:mod:`_ranks_helpers`). Interrupted and run again, each ends where a
run of two ranks never interrupted ends: the same weights and optimizer state
(``torch.equal``) and the same metrics, one line per step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from _training_helpers import REPO, assert_same_tree
from conftest import Sandbox, wait_for

sys.path.insert(0, str(REPO / "tests" / "training"))
from _ranks_helpers import SIGKILL, SIGTERM, RankRun, assert_same_result, reference  # noqa: E402

SCRIPTS = REPO / "tests" / "scripts"
LIGHTNING_DDP = SCRIPTS / "lightning_ddp.py"
HF_DDP = SCRIPTS / "hf_ddp.py"
NEEDS = {LIGHTNING_DDP: "lightning", HF_DDP: "transformers"}


def stopped_on_every_rank(run: RankRun, step: int) -> int:
    """Lightning's two ranks SIGTERMed once rank 0 has logged ``step`` (as the launcher stops
    a run): both save the same step and exit 75. The step they stopped at."""
    procs = run.start("--step-sleep-s", "0.05")
    run.signal_at(procs, step, rank=0, signum=SIGTERM)
    procs[1].send_signal(SIGTERM)
    assert run.wait(procs) == [75, 75], run.err(0) + run.err(1)
    return run.last_step()


@pytest.mark.slow  # heavier than the Trainer's (Lightning's imports); the fast subset keeps that one
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="Lightning is not installed")
def test_lightning_ddp_stopped_on_every_rank_resumes_exactly(shared_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to both ranks (what the launcher sends): both save the same step and exit 75;
    the next start resumes each rank from its own part (RNG states, sampler position)."""
    want = reference(shared_dir, LIGHTNING_DDP)
    run = RankRun(LIGHTNING_DDP, tmp_path / "run")
    step = stopped_on_every_rank(run, 5)
    assert 5 <= step < 12 and f"at step {step}; exiting with 75" in run.err(1)

    assert run.complete() == [0, 0], run.err(0) + run.err(1)
    assert f"(step {step}" in run.err(0)
    assert_same_result(run, want)


@pytest.mark.slow  # two Lightning ranks, then one
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="Lightning is not installed")
def test_lightning_ddp_stopped_at_two_ranks_goes_on_at_one_and_says_it_is_approximate(tmp_path: Path) -> None:
    """The sharded checkpoint reshards the model and optimizer to one process; the data
    position carries the samples the epoch has used: 48 samples an epoch, 4 a step, so after
    step 3 of two ranks (24 samples) one rank has 6 steps left in epoch 0, then 12 in epoch 1."""
    run = RankRun(LIGHTNING_DDP, tmp_path / "run")
    step = stopped_on_every_rank(run, 2)

    assert run.complete(world=1) == [0], run.err(0)
    assert (f"(step {step}, epoch 0); resharded from 2 rank(s) to 1: model and optimizer exact, "
            "rng and data position approximate") in run.err(0)
    total = step + (48 - 8 * step) // 4 + 12
    assert [e["step"] for e in run.entries()] == list(range(1, total + 1))
    assert run.final_state()["step"] == total


@pytest.mark.slow   # the fast subset keeps tests/training/test_ranks_ddp.py
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_trainer_on_two_ranks_stopped_on_one_then_killed_resumes_exactly(shared_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to one rank: both save the same step, rank 0 seals the folder once both
    ranks' files are in it, both exit 75. The next start resumes each rank from its own RNG
    file and running loss; there rank 0 is SIGKILLed (then rank 1, as the launcher ends the
    attempt), with saves also on sweeprun's time cadence, rank 0's clock deciding for both.
    The last start resumes every rank from the newest sealed folder rank 0 chose and ends as
    the run never stopped."""
    want = reference(shared_dir, HF_DDP)
    run = RankRun(HF_DDP, tmp_path / "run")
    procs = run.start("--step-sleep-s", "0.1")
    run.signal_at(procs, 3, rank=1, signum=SIGTERM)
    assert run.wait(procs) == [75, 75], run.err(0) + run.err(1)
    step = run.last_step()
    assert "another rank was asked to stop" in run.err(0)
    sealed = run.out / "trainer" / f"checkpoint-{step}"
    assert {"sweeprun-seal.json", "sweeprun-rng-0.pt", "sweeprun-rng-1.pt",
            "rng_state_1.pth"} <= {p.name for p in sealed.iterdir()}

    procs = run.start("--step-sleep-s", "0.1", "--every-s", "0.25")
    run.signal_at(procs, step + 3, rank=0, signum=SIGKILL)
    procs[1].send_signal(SIGKILL)
    assert run.wait(procs) == [-SIGKILL, -SIGKILL]
    assert f"checkpoint-{step} (step {step})" in run.err(1)
    newest = max(int(p.parent.name.split("-")[1]) for p in (run.out / "trainer").glob("*/sweeprun-seal.json"))

    assert run.complete() == [0, 0], run.err(0) + run.err(1)
    assert f"checkpoint-{newest} (step {newest})" in run.err(1)
    assert_same_result(run, want)


@pytest.mark.slow  # a moto S3 server and two 2-rank Trainer runs
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("s3fs") is None,
                    reason="transformers or s3fs is not installed")
def test_trainer_on_two_ranks_with_a_bucket_as_the_store_resumes_on_an_empty_disk(
        shared_dir: Path, s3_bucket: str, tmp_path: Path) -> None:
    """Rank 0 uploads what both ranks wrote into the machine's staging folder, the seal last;
    killed before its second seal, the run resumes on a machine with nothing on its disk from
    the first folder, downloaded by rank 0 for both, and ends as the run never interrupted."""
    from sweeprun import open_store
    from sweeprun.store import RunPaths
    from sweeprun.training.metrics import read_run_metrics

    want = reference(shared_dir, HF_DDP)
    url = f"{s3_bucket}/hf"
    run = RankRun(HF_DDP, url, logs=tmp_path / "run",  # type: ignore[arg-type]  (a URL for a path)
                  env={"SWEEPRUN_HOME": str(tmp_path / "machine-1")})
    procs = run.start(rank_env={0: {"SWEEPRUN_CRASH_AT": "checkpoint.before_manifest@2"}})
    assert procs[0].wait(timeout=run.timeout_s) == -SIGKILL     # before the seal of step 8
    procs[1].kill()                                              # as the launcher ends the attempt
    procs[1].wait(timeout=run.timeout_s)

    run.env = {"SWEEPRUN_HOME": str(tmp_path / "machine-2")}
    assert run.complete() == [0, 0], run.err(0) + run.err(1)
    assert "checkpoint-4 (step 4)" in run.err(1)
    got, ref = run.final_state(), want.final_state()
    assert_same_tree(got["model"], ref["model"], "model")
    assert_same_tree(got["optimizer"], ref["optimizer"], "optimizer")
    store = open_store(url)
    assert read_run_metrics(RunPaths(store.fs, store.root)) == want.entries()


@pytest.mark.slow  # a 2-rank Trainer run, then the same run on one process
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_trainer_stopped_at_two_ranks_goes_on_at_one_and_says_it_is_approximate(tmp_path: Path) -> None:
    """The folder holds the whole model and optimizer (DDP), so one process goes on from it;
    each rank's RNG states and share of the data cannot carry over: the resume says so."""
    run = RankRun(HF_DDP, tmp_path / "run")
    procs = run.start("--step-sleep-s", "0.1")
    run.signal_at(procs, 3, rank=0, signum=SIGTERM)
    assert run.wait(procs) == [75, 75], run.err(0) + run.err(1)
    step = run.last_step()
    seal = run.out / "trainer" / f"checkpoint-{step}" / "sweeprun-seal.json"
    assert json.loads(seal.read_text())["world_size"] == 2

    assert run.complete(world=1) == [0], run.err(0)
    assert (f"checkpoint-{step} (step {step}); resharded from 2 rank(s) to 1: model and optimizer "
            "exact, rng and data position approximate") in run.err(0)
    assert run.final_state()["step"] == 12
    assert [e["step"] for e in run.entries()] == list(range(1, 13))


@pytest.mark.slow  # imports Lightning in the test process
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="Lightning is not installed")
def test_lightning_refuses_a_resumable_sampler_it_wrapped_for_ddp() -> None:
    """With use_distributed_sampler left on, Lightning wraps the sampler in its
    DistributedSamplerWrapper, which lists it whole at each epoch and shards it a second
    time: the callback stops the fit before the first batch and says what to pass."""
    from types import SimpleNamespace

    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import DataLoader

    from sweeprun.errors import CheckpointError
    from sweeprun.integrations.lightning import _stateful_samplers
    from sweeprun.training import ResumableSampler

    sampler = ResumableSampler(48, seed=0, num_replicas=2, rank=0)
    loader = DataLoader(range(48), sampler=DistributedSamplerWrapper(sampler, num_replicas=2, rank=0))
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(_combined_loader=SimpleNamespace(flattened=[loader])))
    with pytest.raises(CheckpointError, match=r"pass L\.Trainer\(use_distributed_sampler=False\)$"):
        _stateful_samplers(trainer)


@pytest.mark.slow  # a launcher, torchrun and two framework ranks, twice
@pytest.mark.parametrize("script", [HF_DDP], ids=["trainer"])
def test_a_sweep_with_nproc_2_stopped_and_relaunched_ends_as_the_uninterrupted_run(
        sandbox: Sandbox, shared_dir: Path, script: Path) -> None:
    """The user's path: ``nproc: 2`` in the sweep file, the launcher SIGTERMed mid-run (it
    signals every rank: all save the same step, exit 75, and the run is interrupted, not
    failed), then the same command again until done. (Lightning's ranks stopped on every
    rank at once, as the launcher does: the first test above; the launcher's part is the
    same for any script.)"""
    if importlib.util.find_spec(NEEDS[script]) is None:
        pytest.skip(f"{NEEDS[script]} is not installed")
    want = reference(shared_dir, script)
    final = sandbox.root / "run.final.pt"   # where RankRun(logs=root / "run") reads it
    sweep = sandbox.write_sweep({"seed": [0]}, {}, name="ranks", nproc=2, lease_s=30, grace_s=20,
                                command=f"python {script} --seed {{seed}} --step-sleep-s 0.1 --final {final}")
    launcher = sandbox.sweeprun("launch", str(sweep))
    wait_for(lambda: any(sandbox.store.glob("ranks/runs/*/metrics.jsonl")), timeout=180, what="the first step")
    (run_dir,) = sandbox.store.glob("ranks/runs/*")
    run = RankRun(script, run_dir, env={"SWEEPRUN_RUN_DIR": str(run_dir)}, logs=sandbox.root / "run")
    wait_for(lambda: run.last_step() >= 4 or launcher.poll() is not None, timeout=180, what="step 4")
    os.killpg(launcher.pid, signal.SIGTERM)
    launcher.communicate(timeout=120)
    first = (run_dir / "logs" / "attempt-1.log").read_text()
    assert first.count("exiting with 75") == 2, first     # both ranks saved and stopped

    done = sandbox.run("launch", str(sweep), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_result(run, want)
    row = sandbox.status(sweep)[run_dir.name]
    assert row["state"] == "done" and row["nproc"] == 2
