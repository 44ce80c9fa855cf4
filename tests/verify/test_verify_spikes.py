"""``sweeprun verify`` on a script that rolls back after a loss spike."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from _spiky import NAN_AT_16, SPIKY
from _training_helpers import sweeprun_verify


@pytest.mark.slow   # five starts of a torch script
def test_verify_compares_a_rolled_back_run_as_it_rolled_back(tmp_path: Path) -> None:
    """Both runs meet the NaN batch at step 16 and roll back the same way (verify starts a
    rolled-back run again, as the launcher does): EXACT, and it says they rolled back.

    Seed 1 plans SIGTERM after step 3 and SIGKILL after step 24, so the attempt meant for the
    SIGKILL always rolls back at step 16 first: that exit is no interruption, and the SIGKILL
    goes to the attempt after it (it was lost once, when a slow machine let that happen)."""
    result = sweeprun_verify("--seed", "1", "--", sys.executable, str(SPIKY), *NAN_AT_16, tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\[verify\] attempt 2: resumed from step \d+; exit 75$", result.stdout, re.MULTILINE)
    assert re.search(r"^\[verify\] attempt 3: resumed from step 16; SIGKILL after step", result.stdout,
                     re.MULTILINE), result.stdout
    assert "uninterrupted: rolled back after a loss spike (at step 16 to step 12)" in result.stdout
    assert re.search(r"^EXACT: interrupted 2 time\(s\)", result.stdout, re.MULTILINE), result.stdout
    assert "both runs rolled back after the same loss spike(s) (at step 16 to step 12)" in result.stdout
