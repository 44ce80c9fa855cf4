"""The ledger contract's part on how attempts end besides done, interrupted and failed: a
loss-spike rollback, a divergence, running out of memory (:mod:`sweeprun.rollbacks`).
:class:`~.contract.LedgerContract` inherits it; its fixtures (``ledger``, ``location``) are
that class's."""

from __future__ import annotations

import pytest

from ..identity import RunSpec
from ..procs import ProcessRef
from ..rollbacks import RollbackSummary
from ..store.layout import CheckpointName
from . import open_ledger
from .base import Ledger, Outcome, Policy, RunState, Verdict, grid_key, judge

#: The grid every contract test uses (:mod:`.contract` imports these).
RUNS = [RunSpec.from_params({"i": i}, index=i) for i in range(6)]
GRID = grid_key(RUNS)
ME = ProcessRef.me()
POLICY = Policy(max_attempts=3, max_lost=3)


class EndsContract:
    def test_a_rollback_resumes_a_divergence_settles_and_a_reset_reopens(
            self, ledger: Ledger, location: str) -> None:
        """A rollback is an interruption (runnable at once, no failure counted) and the row keeps
        the run's rollbacks for every reader; a divergence is a state of its own that no claim
        takes and that settles the sweep, until a reset makes it pending with none recorded."""
        summary = RollbackSummary(count=1, diverged=False, step=16, restored_step=12,
                                  checkpoint=CheckpointName(1, 3, 12).stem, skipped=4)
        one = [RUNS[0]]
        ledger.sync(one, done=set(), started=set())
        grid = grid_key(one)
        first = ledger.claim(ME, POLICY, 60, grid)
        assert first and ledger.finish(first, Outcome.ROLLED_BACK, POLICY, 75,
                                       rollbacks=summary) is RunState.INTERRUPTED
        reader = open_ledger(location, "sweep", readonly=True)
        try:
            [row] = [r for r in reader.rows() if r.run_id == first.run_id]
        finally:
            reader.close()
        assert (row.rollbacks, row.failures) == (summary, 0)
        second = ledger.claim(ME, POLICY, 60, grid)
        assert second and second.run_id == first.run_id
        diverged = RollbackSummary(count=1, diverged=True, step=20, restored_step=20, checkpoint=None, skipped=4)
        assert ledger.finish(second, Outcome.DIVERGED, POLICY, 76, rollbacks=diverged) is RunState.DIVERGED
        [row] = [r for r in ledger.rows(grid)]
        assert judge(row, ledger.now(), POLICY) is Verdict.EXHAUSTED and row.rollbacks == diverged
        assert ledger.claim(ME, POLICY, 60, grid) is None
        assert ledger.settled(POLICY, grid)
        assert [a.outcome for a in ledger.attempts(first.run_id)] == ["rolled-back", "diverged"]
        ledger.forget({first.run_id: "reset-token-1"})
        [row] = [r for r in ledger.rows(grid)]
        assert (row.state, row.rollbacks) == (RunState.PENDING, None)
        assert ledger.claim(ME, POLICY, 60, grid) is not None

    @pytest.mark.parametrize(("retries", "after"), [(0, RunState.FAILED), (1, RunState.PENDING)])
    def test_out_of_memory_is_retried_only_within_on_oom(self, ledger: Ledger, retries: int,
                                                          after: RunState) -> None:
        policy = Policy(max_attempts=3, oom_retries=retries)
        c = ledger.claim(ME, policy, 60, GRID)
        assert c and ledger.finish(c, Outcome.OOM, policy, 77, ooms=1) is after
        [row] = [r for r in ledger.rows() if r.run_id == c.run_id]
        assert judge(row, ledger.now(), policy) is (Verdict.EXHAUSTED if after is RunState.FAILED
                                                    else Verdict.RUNNABLE)
        assert row.failures == (0 if retries else policy.max_attempts)
