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
    rolled-back run again, as the launcher does): EXACT, and it says they rolled back."""
    result = sweeprun_verify("--", sys.executable, str(SPIKY), *NAN_AT_16, tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "uninterrupted: rolled back after a loss spike (at step 16 to step 12)" in result.stdout
    assert re.search(r"^EXACT: interrupted 2 time\(s\)", result.stdout, re.MULTILINE), result.stdout
    assert "both runs rolled back after the same loss spike(s) (at step 16 to step 12)" in result.stdout
