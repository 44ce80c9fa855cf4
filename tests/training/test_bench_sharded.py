"""The sharded-save benchmark runs: its quick form starts two gloo ranks, saves with sweeprun
and with DCP, and prints its ratio line. Only that it runs is checked, never a figure
(how long a save takes is for benchmarks/RESULTS.md, not for a test on a shared machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _training_helpers import REPO


@pytest.mark.slow  # two torch ranks; the benchmark's smoke test, not an everyday one
def test_sharded_save_benchmark_quick_runs_and_prints_its_ratios(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sharded_save.py"), "--quick",
                          "--dir", str(tmp_path)],
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("ratios at ") and "stall sweeprun/dcp async_save" in last, out.stdout
    assert "commit overhead" in last
    assert list(tmp_path.iterdir()) == []        # its folder removed: nothing left behind
