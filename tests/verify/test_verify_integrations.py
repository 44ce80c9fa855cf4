"""``sweeprun verify`` on the Hugging Face Trainer and Lightning examples, run as a user runs it.

Variants that lose one piece fail, and the verdict names it: Lightning with ``--unsafe-omit
rng`` (the example's own knob), the Trainer resumed with its own late RNG restore
(tests/scripts/verify_hf_late_rng.py). That their final states (a sealed Trainer folder;
Lightning's checkpoint inside sweeprun's) are equal bit for bit when nothing is left out is
shown on the scripts users write (test_verify_users.py).

What legitimately differs between the two runs (their directories, clock readings) is shown
not to count, in process, on the states these integrations save.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from sweeprun.verify.compare import MetricsDiff, compare_pieces
from sweeprun.verify.diagnose import diagnose
from sweeprun.verify.endings import ending_of

from _training_helpers import sweeprun_verify

#: 40 steps of 16 sequences, sealed every 10: kills at seed 0 land after steps 13 and 33.
HF = ("examples/hf_trainer.py", "--max-steps", "40", "--save-steps", "10", "--step-sleep-s", "0.02")
#: 2 epochs of 16 batches, saved every 5 steps: the SIGKILL replays a few steps.
LIGHTNING = ("examples/lightning_mlp.py", "--epochs", "2", "--save-every-steps", "5",
             "--step-sleep-s", "0.02")


def verdict(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith(("EXACT", "NOT EXACT", "NOT VERIFIED"))]
    return line


def pieces(stdout: str) -> dict[str, str]:
    """The verdict's ``  piece: detail`` lines."""
    return dict(re.findall(r"^  ([^:\n]+): (.*)$", stdout, re.MULTILINE))


# -- forgetful variants are named -----------------------------------------------------------------

@pytest.mark.slow  # three starts of the Trainer
def test_the_trainers_own_late_rng_restore_is_named(tmp_path: Path) -> None:
    """Resumed as plain ``trainer.train(resume_from_checkpoint=...)`` would: the augmentation of
    the first resumed batch draws from fresh RNGs, so the loss of that step already differs.
    One interruption (``--kills 1``: a SIGTERM after step 25) is enough to lose it."""
    pytest.importorskip("transformers")
    script = ("tests/scripts/verify_hf_late_rng.py", *HF[1:])
    result = sweeprun_verify("--kills", "1", "--", sys.executable, *script, tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdict(result.stdout).startswith("NOT EXACT")
    found = pieces(result.stdout)
    assert found["likely"].startswith("the RNG state was not restored: the loss differs from the first "
                                      "step after resuming from step 26 while the learning rate matches; "
                                      "the Trainer puts the RNGs back only after the first resumed batch")
    assert "instead of run.train(trainer)" in found["likely"]
    assert found["metrics"].startswith("first differ at step 27")
    # sweeprun-rng.pt holds the CPU RNGs at the save and the Trainer's loss sums: they follow
    assert found["RNG"].split(" differ")[0] == (
        "rng_state.pth.python, rng_state.pth.numpy, sweeprun-rng.pt.cpu_at_save.python, "
        "sweeprun-rng.pt.cpu_at_save.numpy, sweeprun-rng.pt.extra.total_loss")
    assert found["optimizer"].startswith("exp_avg, exp_avg_sq differ (largest difference")
    assert found["equal"] == "LR scheduler, trainer state, other files", "the schedule itself was restored"


@pytest.mark.slow  # three starts of the Lightning example
def test_a_lightning_run_that_forgets_its_rng_is_named(tmp_path: Path) -> None:
    """What the callback adds, shown by leaving it out (what a plain Lightning resume does):
    one interruption (``--kills 1``: a SIGTERM after step 28) already loses the RNG state,
    the weights end elsewhere, and the verdict names it. (The data position left out, and
    the examples passing: test_verify_users, on the scripts users write.)"""
    pytest.importorskip("lightning")
    result = sweeprun_verify("--kills", "1", "--", sys.executable, *LIGHTNING, "--unsafe-omit", "rng",
                             tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    found = pieces(result.stdout)
    assert found["likely"].startswith(
        "the RNG state was not restored: the loss differs from the first step after resuming from "
        "step 29 while the learning rate matches; Lightning saves no RNG state and the callback was "
        "made with SweeprunCallback(rng=False)"), found["likely"]
    assert found["model"].startswith("net.0.weight, net.0.bias"), "named as the module names them"
    assert found["optimizer"].startswith("exp_avg, exp_avg_sq differ")
    assert "LR scheduler" in found["equal"] and "training progress" in found["equal"]


# -- what legitimately differs, in process ---------------------------------------------------------

#: ModelCheckpoint's state key, as Lightning 2.6 writes it: its settings, a clock-like name among them.
CHECKPOINT_KEY = ("ModelCheckpoint{'monitor': 'loss', 'mode': 'min', 'every_n_train_steps': 0, "
                  "'every_n_epochs': 1, 'train_time_interval': None}")


def lightning_checkpoint(run_dir: Path, elapsed_s: float, rng: bool = True) -> dict:
    """A sweeprun checkpoint as the Lightning callback writes it, with a ModelCheckpoint that
    names a file of its own run and a Timer that measured the wall clock."""
    weights = {"net.0.weight": torch.ones(2, 2)}
    trainer = {
        "epoch": 1, "global_step": 32, "pytorch-lightning_version": "2.6.6", "state_dict": weights,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2, 2)}}, "param_groups": [{"lr": 0.1}]}],
        "lr_schedulers": [{"last_epoch": 32, "_last_lr": [0.0]}],
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"completed": 2}}}},
        "callbacks": {CHECKPOINT_KEY: {"best_model_path": f"{run_dir}/ckpt/best.ckpt",
                                       "best_model_score": torch.tensor(0.5),
                                       "best_k_models": {f"{run_dir}/ckpt/best.ckpt": torch.tensor(0.5),
                                                         f"{run_dir}/ckpt/other.ckpt": torch.tensor(0.7)}},
                      "Timer": {"time_elapsed": {"train": elapsed_s}}},
    }
    return {"step": 32, "epoch": 1, "extras": {},
            "objects": {"lightning": {"trainer": trainer,
                                      "samplers": [{"epoch": 1, "offset": 512, "seed": 0}]}},
            "rng": {"torch": torch.zeros(4, dtype=torch.uint8)} if rng else None}


def test_paths_of_the_run_and_clock_readings_do_not_count(tmp_path: Path) -> None:
    a = ending_of(lightning_checkpoint(tmp_path / "uninterrupted" / "run", 12.5), tmp_path / "uninterrupted" / "run")
    b = ending_of(lightning_checkpoint(tmp_path / "interrupted" / "run", 31.0), tmp_path / "interrupted" / "run")
    assert compare_pieces(a.pieces, b.pieces) == {}
    assert a.shown() == ["model", "optimizer", "LR scheduler", "callbacks", "data position",
                         "training progress", "global RNGs"]
    b.pieces["callbacks"][CHECKPOINT_KEY]["best_model_path"] = "/elsewhere/best.ckpt"
    found = compare_pieces(a.pieces, b.pieces)
    assert list(found) == ["callbacks"], "a path outside the run still counts"
    b = ending_of(lightning_checkpoint(tmp_path / "interrupted" / "run", 31.0), tmp_path / "interrupted" / "run")
    b.pieces["callbacks"][CHECKPOINT_KEY]["best_model_score"] = torch.tensor(0.25)
    assert list(compare_pieces(a.pieces, b.pieces)) == ["callbacks"], "its best-k tracking counts"


def test_a_lightning_state_names_what_it_cannot_restore(tmp_path: Path) -> None:
    state = lightning_checkpoint(tmp_path, 1.0, rng=False)
    state["objects"]["lightning"]["samplers"] = []
    ending = ending_of(state, tmp_path)
    assert sorted(ending.missing) == ["RNG", "data position"]
    assert "data position" not in ending.pieces, "no sampler: nothing to call equal"
    metrics = MetricsDiff((32, 32), index=15, step=16, keys=["loss"])
    (cause,) = diagnose(metrics, resumes=[15], resumed_steps=range(1, 33), state=ending)
    assert cause.startswith("the RNG state was not restored") and "SweeprunCallback(rng=False)" in cause
    del ending.missing["RNG"]
    (cause,) = diagnose(metrics, resumes=[15], resumed_steps=range(1, 33), state=ending)
    assert "sampler=sweeprun.ResumableSampler(dataset, seed=...)" in cause
    metrics = MetricsDiff((32, 32), index=16, step=17, keys=["loss"])
    (cause,) = diagnose(metrics, resumes=[15], resumed_steps=range(1, 33), state=ending)
    assert cause.startswith("the optimizer was not restored") and "'optimizer' is tracked" in cause
