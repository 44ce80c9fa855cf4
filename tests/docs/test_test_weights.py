"""The suite's own ordering data: tools/test_weights.py and the weights it wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from test_weights import weights  # noqa: E402


def test_weights_sum_each_files_fast_and_slow_tests_apart() -> None:
    """By wall time, how long a test holds its worker: a SLURM test waits more than it computes."""
    log = [json.dumps({"test": "tests/a.py::t1", "cpu_s": 1.5, "wall_s": 3.0, "slow": False}),
           json.dumps({"test": "tests/a.py::t2[x]", "cpu_s": 2.0, "wall_s": 4.0, "slow": False}),
           json.dumps({"test": "tests/a.py::t3", "cpu_s": 2.0, "wall_s": 90.0, "slow": True}),
           "",
           json.dumps({"test": "tests/b.py::C::t", "cpu_s": 0.25, "slow": False})]  # an older log: CPU
    assert weights(log) == {"tests/a.py": {"fast": [7.0, 2], "slow": [90.0, 1]},
                            "tests/b.py": {"fast": [0.25, 1]}}


def test_the_shipped_weights_name_test_files_with_seconds_and_counts() -> None:
    shipped = json.loads((REPO / "tests" / "cpu_weights.json").read_text())
    assert shipped, "tests/cpu_weights.json is empty"
    for name, kinds in shipped.items():
        assert name.startswith("tests/") and name.endswith(".py"), name
        for kind, (seconds, count) in kinds.items():
            assert kind in ("fast", "slow") and seconds >= 0 and count >= 1, (name, kind)
