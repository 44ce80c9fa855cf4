"""The promise, shown with real processes: interrupt the example anywhere, run the same command
again, and it ends bit for bit where the uninterrupted run ends.

Each test starts examples/train_mlp.py standalone (``--out``), interrupts it from
outside at seeded-random steps, re-runs the same command until it finishes, and
compares with one uninterrupted run: weights and optimizer state ``torch.equal``,
the same loss and LR at every step, one metrics entry per step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweeprun.runenv import PREEMPTED_EXIT

from _training_helpers import (
    FLAGS,
    SIGKILL,
    SIGTERM,
    TOTAL_STEPS,
    ExampleRun,
    assert_same_run,
    example_reference,
    interrupt_repeatedly,
)


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> ExampleRun:
    """The run never interrupted (trained once per session, test_faults compares against it too)."""
    return example_reference(shared_dir)


@pytest.mark.slow  # whole training runs; the full suite (CI) runs it
def test_sigkill_several_times_then_rerun_matches_the_uninterrupted_run(
        tmp_path: Path, reference: ExampleRun) -> None:
    """One seed's kill points: more random kills of this example are in test_chaos (nine
    runs under two launchers) and in verify's seeded kills."""
    run = ExampleRun(tmp_path / "run")
    hit = interrupt_repeatedly(run, SIGKILL, kills=3, seed=11)
    assert all(0 < s < TOTAL_STEPS for s in hit)
    assert_same_run(run, reference)


@pytest.mark.slow  # three starts; the fast subset keeps the SIGTERM save's own step test below
def test_sigterm_saves_exits_75_and_the_rerun_matches(tmp_path: Path, reference: ExampleRun) -> None:
    run = ExampleRun(tmp_path / "run")
    interrupt_repeatedly(run, SIGTERM, kills=2, seed=7)
    assert_same_run(run, reference)


def test_sigterm_checkpoint_is_at_the_step_it_stopped(tmp_path: Path) -> None:
    """A graceful stop loses nothing: the last logged step is the saved one."""
    run = ExampleRun(tmp_path / "run")
    code, _, err = run.interrupt_at(10, SIGTERM)
    assert code == PREEMPTED_EXIT, err
    assert "SIGTERM received" in err
    assert run.final_state()["step"] == run.entries()[-1]["step"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_sigkill_then_rerun_matches(tmp_path: Path) -> None:
    """On GPU: CUDA RNG (dropout) and the GradScaler of fp16 autocast are part of the state.
    The example forces deterministic kernels on CUDA, so bitwise equality is a fair demand there too."""
    cuda = FLAGS + ("--device", "cuda", "--amp")
    ref = ExampleRun(tmp_path / "reference", cuda)
    assert ref.complete().returncode == 0
    run = ExampleRun(tmp_path / "run", cuda)
    for target in (9, 30):
        code, _, err = run.interrupt_at(target, SIGKILL)
        assert code == -SIGKILL, err
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert_same_run(run, ref)
    assert "scaler" in run.final_state()["objects"]
