"""``sweeprun verify --nproc N`` on a user's DDP script (``tests/scripts/ddp_train.py``): its
ranks started through torchrun as ``nproc: N`` in a sweep file starts them, SIGTERMed and
SIGKILLed together, and the gathered ending compared. ``--resume-nproc`` resumes at
another world size: the verdict names what cannot be exact then, and blames nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_verify_integrations import verdict

from _training_helpers import sweeprun_verify

DDP = ("tests/scripts/ddp_train.py", "--step-sleep-s", "0.05")


@pytest.mark.slow  # two attempts of two ranks and a torchrun each, and the uninterrupted run
def test_a_ddp_script_at_two_ranks_resumes_exactly(tmp_path: Path) -> None:
    # one interruption (a SIGTERM) judges the resume; the sweep tests kill ranks every way
    result = sweeprun_verify("--nproc", "2", "--kills", "1", "--", sys.executable, *DDP, tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "attempt 1: from step 0; SIGTERM after step" in result.stdout
    assert verdict(result.stdout).startswith("EXACT: interrupted 1 time(s)")
    assert "the final state at step 12 equal bit for bit" in verdict(result.stdout)


@pytest.mark.slow
def test_a_resume_at_another_world_size_is_named_as_what_cannot_be_exact(tmp_path: Path) -> None:
    result = sweeprun_verify("--nproc", "2", "--resume-nproc", "1", "--kills", "1", "--",
                             sys.executable, *DDP, tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdict(result.stdout).startswith("NOT EXACT")
    assert "attempt 2: resumed from step" in result.stdout, "the one rank resumed the two ranks' checkpoint"
    likely = [line for line in result.stdout.splitlines() if line.startswith("  likely: ")]
    assert len(likely) == 1, "nothing else is blamed on the script"
    assert likely[0].startswith("  likely: it resumed at another world size (2 -> 1 processes): the "
                                "model and optimizer were resharded, but the RNG states and the data "
                                "position cannot be exact")
