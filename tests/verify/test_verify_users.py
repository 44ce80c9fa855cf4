"""``sweeprun verify`` on the scripts users write (tests/scripts/lightning_user.py and
hf_user.py: gradient accumulation, a plateau scheduler, mid-epoch validation, best-model
checkpoints, logging windows): EXACT, exit 0. Their broken variants, exit 1, name the
piece: a shuffled loader that cannot say where it is (the data position), a collator
drawing from a generator of its own (random numbers the checkpoint does not hold).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from test_verify_integrations import verdict

from _training_helpers import sweeprun_verify

LIGHTNING = ("tests/scripts/lightning_user.py", "--epochs", "2", "--sleep-s", "0.02")
TRAINER = ("tests/scripts/hf_user.py", "--epochs", "2", "--step-sleep-s", "0.05")


def likely(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith("  likely: ")]
    return line


@pytest.mark.slow  # three starts of a Lightning script (its SIGKILLs: test_lightning_users)
def test_the_users_lightning_script_is_exact(tmp_path: Path) -> None:
    result = sweeprun_verify("--seed", "1", "--kills", "1", "--", sys.executable, *LIGHTNING, tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.match(r"EXACT: interrupted 1 time\(s\) .* equal bit for bit \(Lightning checkpoint: model, "
                    r"optimizer, LR scheduler, callbacks, data position", verdict(result.stdout))


@pytest.mark.slow
def test_a_shuffled_lightning_loader_is_named_as_the_data_position(tmp_path: Path) -> None:
    # one interruption is enough to name what is lost (and one start fewer than the default two)
    result = sweeprun_verify("--seed", "1", "--kills", "1", "--", sys.executable, *LIGHTNING, "--shuffle",
                             tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdict(result.stdout).startswith("NOT EXACT")
    assert "the data position was not restored" in likely(result.stdout)
    assert "sampler=sweeprun.ResumableSampler" in likely(result.stdout)
    # and the resumed attempt said so itself, as a plain Lightning resume would not
    kept = re.search(r"both runs are kept in (\S+):", result.stdout)
    assert kept, result.stdout
    resumed = (Path(kept[1]) / "interrupted" / "logs" / "attempt-2.log").read_text()
    assert "cannot say where it is in the epoch" in resumed, resumed


@pytest.mark.slow  # three starts of a Trainer script (its SIGKILLs: test_hf_users)
def test_the_users_trainer_script_is_exact(tmp_path: Path) -> None:
    result = sweeprun_verify("--kills", "1", "--", sys.executable, *TRAINER, tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"attempt 2: resumed from step \d+; exit 0", result.stdout), "the Trainer's resume is seen"
    assert re.match(r"EXACT: interrupted 1 time\(s\) .* equal bit for bit \(Trainer folder checkpoint-\d+: "
                    r"model, optimizer, LR scheduler, RNG, trainer state, log history",
                    verdict(result.stdout))


@pytest.mark.slow
def test_a_trainer_collator_with_its_own_generator_is_named(tmp_path: Path) -> None:
    result = sweeprun_verify("--kills", "1", "--", sys.executable, *TRAINER, "--own-generator", tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdict(result.stdout).startswith("NOT EXACT")
    assert "a generator of the script's own" in likely(result.stdout), result.stdout
