"""A run killed after its final checkpoint, before it could say it finished, ends done at the
next launch, and ends as the uninterrupted run: with the plain API and the Trainer (Lightning:
tests/integrations/test_lightning_users.py, standalone).

The relaunch finds a checkpoint at the last step; there is nothing left to train, and the
script must still reach its end (``run.finish()``, the Trainer's end of training), or the
launcher could never mark the run done.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Sandbox

REPO = Path(__file__).resolve().parents[2]
CRASHES = REPO / "tests" / "scripts" / "first_attempt_crashes.py"

SCRIPTS = {
    "plain": f"{REPO}/examples/train_mlp.py --lr 0.01 --seed 0 --epochs 1",
    "trainer": f"{REPO}/examples/hf_trainer.py --lr 0.003 --seed 0 --max-steps 6 --save-steps 3",
}


@pytest.mark.parametrize("script", [  # the Trainer's starts are seconds each: full suite. Lightning's
    "plain", pytest.param("trainer", marks=pytest.mark.slow)])   # case: test_lightning_users
def test_killed_after_the_final_checkpoint_the_next_attempt_finishes_the_run(sandbox: Sandbox, script: str) -> None:
    command = f"python {CRASHES} training.before_finished {SCRIPTS[script]}"
    sweep = sandbox.write_sweep({"lr": [0.01]}, command=command, max_attempts=2)
    result = sandbox.run("launch", str(sweep), timeout=300)
    (run_dir,) = (sandbox.store / "t" / "runs").iterdir()
    second = (run_dir / "logs" / "attempt-2.log").read_text()
    assert result.returncode == 0, result.stderr + second[-3000:]
    assert "resum" in second, second[-3000:]   # from the final checkpoint of attempt 1
    (row,) = sandbox.status(sweep).values()
    assert row["state"] == "done"
    assert json.loads((run_dir / "DONE").read_text())["attempt"] == 2
