"""``every_s="auto"``: the interval between saves is Young/Daly's sqrt(2 x save stall x mean
time between interruptions), within the user's bounds, and says why when it changes.

Deterministic: a fast-forward clock, and a tracked object whose ``state_dict()`` moves
that clock on, so a save "costs" exactly what the test says.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from test_checkpoint import Trainer, saved_steps

from sweeprun.errors import SpecError
from sweeprun.ledger.contract import FakeClock
from sweeprun.training import init
from sweeprun.training.cadence import PRIOR_MTBI_S, AutoInterval


class CostlyState:
    """State whose snapshot takes ``cost_s`` on the given clock."""

    def __init__(self, clock: FakeClock, cost_s: float) -> None:
        self.clock, self.cost_s = clock, cost_s

    def state_dict(self) -> dict[str, Any]:
        self.clock.advance(self.cost_s)
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def auto_trainer(tmp_path: Path, clock: FakeClock, cost_s: float, env: dict[str, str],
                 **options: Any) -> Trainer:
    t = Trainer.start(str(tmp_path), clock, every_s="auto", keep_last=100, env=env, **options)
    t.run.track(costly=CostlyState(clock, cost_s))
    return t


@pytest.mark.parametrize("async_save", [True, False])
def test_the_interval_follows_young_daly_from_the_measured_stall(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], async_save: bool) -> None:
    clock = FakeClock()
    t = auto_trainer(tmp_path, clock, cost_s=2.0, env={"SWEEPRUN_MTBI_S": "7200"},
                     min_every_s=30, async_save=async_save)
    t.train(3, clock, step_s=10)                 # no cost measured yet: the first save at 30 s
    t.run.wait()
    assert saved_steps(t.run) == [3]
    assert t.run._auto is not None and t.run._auto.interval_s == pytest.approx(math.sqrt(2 * 2 * 7200))
    err = capsys.readouterr().err
    assert "checkpoint interval 170 s: sqrt(2 x save stall 2 s x mean time between interruptions " \
           "2 h (SWEEPRUN_MTBI_S)) = 170 s" in err
    t.train(17, clock, step_s=10)                # 169.7 s after the save ended (t = 1032): step 20
    t.run.close()
    assert saved_steps(t.run) == [3, 20]
    assert "checkpoint interval" not in capsys.readouterr().err   # unchanged: not said again


def test_without_a_measured_rate_the_prior_is_used_and_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    t = auto_trainer(tmp_path, clock, cost_s=0.5, env={})
    t.train(1, clock, step_s=30)
    t.run.close()
    assert t.run._auto is not None and t.run._auto.interval_s == pytest.approx(math.sqrt(2 * 0.5 * PRIOR_MTBI_S))
    assert "(prior; SWEEPRUN_MTBI_S is unset)" in capsys.readouterr().err


@pytest.mark.parametrize(("cost_s", "mtbi", "expected", "said"), [
    (0.001, "3600", 30.0, "raised to min_every_s=30"),
    (50.0, "864000", 3600.0, "lowered to max_every_s=3600"),
])
def test_the_interval_stays_within_the_bounds(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              cost_s: float, mtbi: str, expected: float, said: str) -> None:
    clock = FakeClock()
    t = auto_trainer(tmp_path, clock, cost_s=cost_s, env={"SWEEPRUN_MTBI_S": mtbi})
    t.train(1, clock, step_s=30)
    t.run.close()
    assert t.run._auto is not None and t.run._auto.interval_s == expected
    assert said in capsys.readouterr().err


def test_the_cost_is_smoothed_and_only_material_changes_are_said() -> None:
    auto = AutoInterval(min_s=1, max_s=10_000, mtbi_s=3600, mtbi_measured=True)
    assert auto.interval_s == 1                              # nothing measured yet
    assert auto.observe(1.0) is not None                     # the first interval is always said
    assert auto.interval_s == pytest.approx(math.sqrt(2 * 1.0 * 3600))
    assert auto.observe(1.2) is None                         # EWMA 1.06: 3% longer, not said
    assert auto.cost_s == pytest.approx(0.3 * 1.2 + 0.7 * 1.0)
    lines = [auto.observe(10.0) for _ in range(3)]           # saves got much slower
    assert any(line is not None for line in lines)
    assert auto.interval_s > 2 * math.sqrt(2 * 1.0 * 3600)


def test_step_cadence_still_applies_alongside_auto(tmp_path: Path) -> None:
    clock = FakeClock()
    t = auto_trainer(tmp_path, clock, cost_s=1.0, env={}, every_steps=4)
    t.train(9, clock, step_s=1)                  # 9 s: the time cadence (30 s first) is not due
    t.run.close()
    assert saved_steps(t.run) == [4, 8]


@pytest.mark.parametrize(("options", "env", "error", "message"), [
    ({"every_s": "sometimes"}, {}, ValueError, "every_s must be a number of seconds or 'auto'"),
    ({"every_s": "auto", "min_every_s": 600, "max_every_s": 60}, {}, ValueError, "0 < min <= max"),
    ({"every_s": "auto"}, {"SWEEPRUN_MTBI_S": "soon"}, SpecError, "SWEEPRUN_MTBI_S='soon' is not a positive"),
    ({}, {"SWEEPRUN_ASYNC_SAVE": "maybe"}, SpecError, "SWEEPRUN_ASYNC_SAVE='maybe' is neither 1 nor 0"),
])
def test_bad_cadence_settings_are_one_line_errors(tmp_path: Path, options: dict[str, Any],
                                                  env: dict[str, str], error: type[Exception],
                                                  message: str) -> None:
    with pytest.raises(error, match=message):
        init(local_dir=tmp_path / "run", env=env, clock=FakeClock(), **options)
    assert not (tmp_path / "run" / "checkpoints").exists()
