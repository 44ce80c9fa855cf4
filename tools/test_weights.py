"""Write tests/cpu_weights.json from a run's per-test log, so the suite starts the files
that hold their worker longest first.

    SWEEPRUN_TEST_CPU_LOG=/tmp/cpu.jsonl python -m pytest -n 4 --dist loadscope
    python tools/test_weights.py /tmp/cpu.jsonl

The log has one JSON line per test (``test``, ``cpu_s``, ``wall_s``, ``slow``); the weights
are, per file, the seconds its tests held their worker (wall time: a file that mostly waits,
on a SLURM cluster or a lease, holds its worker as long as one that computes) and the number
of its fast and of its slow tests. Only the order in which pytest-xdist hands files to its
workers depends on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "tests" / "cpu_weights.json"


def weights(lines: list[str]) -> dict[str, dict[str, list[float]]]:
    files: dict[str, dict[str, list[float]]] = {}
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        kind = "slow" if row["slow"] else "fast"
        seconds_and_tests = files.setdefault(row["test"].split("::")[0], {}).setdefault(kind, [0.0, 0])
        seconds_and_tests[0] = round(seconds_and_tests[0] + row.get("wall_s", row["cpu_s"]), 2)
        seconds_and_tests[1] += 1
    return dict(sorted(files.items()))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/test_weights.py CPU_LOG", file=sys.stderr)
        return 2
    found = weights(Path(argv[0]).read_text().splitlines())
    WEIGHTS.write_text("{\n" + ",\n".join(f" {json.dumps(name)}: {json.dumps(kinds)}"
                                          for name, kinds in found.items()) + "\n}\n")
    print(f"wrote {WEIGHTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
