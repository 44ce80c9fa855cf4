"""The training API with its run directory in a real S3 bucket (moto's server on loopback):
bit-exact resume after SIGKILL, per-attempt metrics, and fencing of a stale attempt."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sweeprun import open_store
from sweeprun.training import init, load_checkpoint
from sweeprun.training.checkpoints import CheckpointDir
from sweeprun.training.metrics import read_metrics
from sweeprun.training.writer import Snapshot

from _training_helpers import SIGKILL, TOTAL_STEPS, ExampleRun, assert_same_run, example_reference


@dataclass
class S3ExampleRun(ExampleRun):
    """examples/train_mlp.py with ``--out s3://...``: progress is read from the bucket, polled
    gently (metrics reach it at each save)."""

    poll_s: float = 0.05

    def entries(self) -> list[dict[str, Any]]:
        store = open_store(str(self.out))
        return read_metrics(store.fs, store.root + "/metrics.jsonl")

    def last_step(self) -> int:
        entries = self.entries()
        return entries[-1]["step"] if entries else 0

    def _metrics_stamp(self) -> None:
        return None   # nothing local to stat: the bucket is read at every poll


@pytest.mark.slow  # two whole training runs against the S3 server, and the example's reference
def test_sigkill_mid_run_then_rerun_on_s3_matches_the_uninterrupted_run(s3_bucket: str, shared_dir: Path) -> None:
    reference = example_reference(shared_dir)   # where it was saved changes nothing it computed
    run = S3ExampleRun(f"{s3_bucket}/mlp")  # type: ignore[arg-type]
    rng = random.Random(5)
    for _ in range(2):
        target = rng.randint(run.last_step() + 5, run.last_step() + 20)
        code, seen, err = run.interrupt_at(target, SIGKILL)
        assert code == -SIGKILL, f"exit {code} after step {seen}:\n{err}"
        assert 0 < seen < TOTAL_STEPS
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "resumed from ckpt-a" in result.stderr
    run.final_state = lambda: load_checkpoint(run.out)  # type: ignore[method-assign]
    assert_same_run(run, reference)
    fs = open_store(s3_bucket).fs
    names = [p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/mlp/metrics")]
    assert len(names) >= 2 and all(n.startswith("attempt-") for n in names)


def _attempt(run_dir: str, attempt: int, every_steps: int = 1000) -> Any:
    """A process of attempt ``attempt`` under the launcher, as its environment says."""
    env = {"SWEEPRUN_RUN_DIR": run_dir, "SWEEPRUN_RUN_ID": "r-1", "SWEEPRUN_SWEEP": "s",
           "SWEEPRUN_ATTEMPT": str(attempt), "SWEEPRUN_PARAMS": "{}"}
    run = init(env=env, every_steps=every_steps, stop_signals=())
    model = torch.nn.Linear(2, 1)
    run.track(model=model)
    run.restore()
    return run, model


def test_a_stale_attempt_never_clobbers_the_live_attempts_metrics(s3_bucket: str) -> None:
    """Attempt 1 saves at step 3 and goes on to step 5, then freezes; attempt 2 resumes from
    step 3. When attempt 1 wakes and flushes, it rewrites only its own object: the run's
    metrics stay attempt 2's, each step once."""
    run_dir = f"{s3_bucket}/sweeps/s/runs/r-1"
    stale, _ = _attempt(run_dir, 1)
    for step in range(1, 6):
        stale.end_step(loss=float(step))
        if step == 3:
            stale.save()
    stale._metrics.flush()
    live, _ = _attempt(run_dir, 2)
    assert live.step == 3
    for step in range(4, 7):
        live.end_step(loss=10.0 * step)
    live.save()
    stale.end_step(loss=99.0)                      # the frozen machine wakes up
    stale._metrics.flush()
    store = open_store(run_dir)
    entries = read_metrics(store.fs, store.root + "/metrics.jsonl")
    assert [(e["step"], e["loss"]) for e in entries] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    stale_object = store.fs.cat_file(store.root + "/metrics/attempt-1.jsonl").decode()
    assert [json.loads(line)["loss"] for line in stale_object.splitlines()][-1] == 99.0
    live.close()
    stale.close()


def test_restore_prefers_the_newest_attempt_over_a_late_higher_step(s3_bucket: str) -> None:
    """Attempt 2 saves at step 4. A stale attempt 1, past both its fence checks (before the
    data and before the manifest) before attempt 2 began, writes a step-50 checkpoint late: restore still takes attempt 2's, and the late write
    neither replaced nor pruned anything of attempt 2."""
    run_dir = f"{s3_bucket}/sweeps/s/runs/r-1"
    stale, stale_model = _attempt(run_dir, 1)
    stale.end_step()
    stale.save()
    fenced = stale._writer.fence()                 # attempt 1 passes its fence, then freezes
    live, live_model = _attempt(run_dir, 2)
    for _ in range(3):
        live.end_step()
    with torch.no_grad():
        live_model.weight.fill_(2.0)
    live_manifest = live.save()
    with torch.no_grad():
        stale_model.weight.fill_(-1.0)
    stale._writer.fence = lambda: fenced            # type: ignore[method-assign]  # still frozen
    late = stale._writer.write(Snapshot(step=50, state={**stale.snapshot().state, "step": 50},
                                        metrics={}), fenced)
    assert (late.attempt, late.step) == (1, 50)
    store = open_store(run_dir)
    directory = CheckpointDir(store.fs, store.root + "/checkpoints")
    assert live_manifest.name in {m.name for m in directory.manifests()}
    resumed, resumed_model = _attempt(run_dir, 3)
    assert resumed.step == 4
    assert torch.equal(resumed_model.weight, torch.full_like(resumed_model.weight, 2.0))
    for run in (stale, live, resumed):
        run.close()
