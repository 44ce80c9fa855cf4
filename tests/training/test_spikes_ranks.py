"""Loss spikes on several ranks: whichever rank sees it, every rank rolls back at the same step."""

from __future__ import annotations

import json
import math
from pathlib import Path

from _ranks_helpers import RankRun

from sweeprun.rollbacks import read_rollbacks
from sweeprun.runenv import PREEMPTED_EXIT
from sweeprun.store import open_store

from _spiky import SPIKY


def test_a_nan_on_one_rank_rolls_every_rank_back_to_the_same_step(tmp_path: Path) -> None:
    """DDP on 2 gloo ranks, a NaN sample in rank 1's data only (index 61: its 31st, the
    batch of its step 8): both ranks roll back together and finish."""
    run = RankRun(SPIKY, tmp_path / "run", flags=("--poison", "61", "--nan", "--poison-rank", "1",
                                                  "--every", "3", "--steps", "14"))
    codes = run.complete()
    assert codes == [PREEMPTED_EXIT] * 2, run.err(0) + run.err(1)
    assert "rolled back to" in run.err(0) and "rolled back to" in run.err(1)
    assert run.complete() == [0, 0], run.err(0) + run.err(1)
    store = open_store(str(run.out))
    [record] = read_rollbacks(store.fs, f"{store.root}/rollbacks")
    assert (record.start, record.step, record.restored_step, record.world_size) == (8, 8, 6, 2)
    assert sorted(p.name for p in (run.out / "rollbacks").iterdir()) == ["1.json", "1.rank-0.pt", "1.rank-1.pt"]
    assert [e["step"] for e in run.entries()] == list(range(1, 15))
    final = json.loads(run.final.read_text())
    assert all(math.isfinite(v) for values in final.values() for v in values)
