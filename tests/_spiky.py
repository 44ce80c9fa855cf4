"""The loss-spike tests' script, tests/scripts/spiky.py, run standalone: a regression written the
way users write one, with a bad sample in its data (scaled up, or NaN) or a loss that is NaN
from some step on. Each step logs the first index of its batch, so a test sees which
batches trained."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sweeprun.rollbacks import RollbackRecord, read_rollbacks
from sweeprun.runenv import PREEMPTED_EXIT
from sweeprun.store import open_store

from _training_helpers import REPO, ScriptRun, made_once

SPIKY = REPO / "tests" / "scripts" / "spiky.py"
#: A NaN sample in the batch of step 16 (batches of 4, in order); saves every 4 steps.
NAN_AT_16 = ("--poison", "60", "--nan", "--every", "4")
#: Three batches (steps 16-18) scaled 30x: a spike confirmed at 18 (patience 3); a save at
#: every step, two kept: the saves of steps 16 and 17 fall inside the spike.
SPIKE_16_TO_18 = ("--poison", "60", "--poison-count", "12", "--scale", "30", "--patience", "3",
                  "--every", "1", "--keep-last", "2")


@dataclass
class SpikyRun(ScriptRun):
    script: Path = SPIKY

    def until_done(self, *extra: str, env: dict[str, str] | None = None, starts: int = 6) -> list[int]:
        """Start it again after each exit 75, as the launcher (or a user) does; the exit codes."""
        codes = []
        for _ in range(starts):
            result = self.complete(*extra, env=env)
            codes.append(result.returncode)
            if result.returncode != PREEMPTED_EXIT:
                break
        return codes

    def rollbacks(self) -> list[RollbackRecord]:
        store = open_store(str(self.out))
        return read_rollbacks(store.fs, f"{store.root}/rollbacks")

    def final(self) -> dict[str, list[float]]:
        return json.loads((self.out / "final.json").read_text())

    def checkpoint_steps(self) -> list[int]:
        return sorted(json.loads(p.read_text())["step"] for p in (self.out / "checkpoints").glob("*.json"))


def spiky_reference(shared_dir: Path, *flags: str) -> SpikyRun:
    """The script with ``flags``, never killed (rolled back as it needs): made once per session."""
    def make(folder: Path) -> None:
        assert SpikyRun(folder, flags).until_done() == [PREEMPTED_EXIT, 0]

    return SpikyRun(made_once(shared_dir, "spiky-" + "-".join(f.strip("-") for f in flags), make), flags)
