"""From a spot VM's termination notice to every run saved: ``sweeprun worker --notice``.

A loopback stand-in of AWS's metadata server (IMDSv2 token, ``spot/instance-action`` 404
until the notice) and a worker running two runs of tests/scripts/steps.py (0.05 s steps, a
checkpoint each); each round posts the notice and times until both runs have saved and
exited 75 (their ``preempted`` line in the side log).

    python benchmarks/notice_latency.py [ROUNDS]

A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from _metadata import Metadata  # noqa: E402


def events(side: str, kind: str) -> list[dict[str, Any]]:
    if not os.path.exists(side):
        return []
    with open(side) as f:
        return [e for e in map(json.loads, f) if e["event"] == kind]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    server = Metadata()
    url = server.url("/latest/meta-data/spot/instance-action")
    latencies = []
    for i in range(rounds):
        root = tempfile.mkdtemp(prefix=f"sweeprun-notice-{i}-")
        os.makedirs(os.path.join(root, "locks"))
        side = os.path.join(root, "side.log")
        sweep = os.path.join(root, "s.yaml")
        with open(sweep, "w") as f:
            f.write(f"name: n\ncommand: {sys.executable} {REPO}/tests/scripts/steps.py --x 1\n"
                    f"store: {root}/store\ngrid: {{a: [1, 2]}}\nparams: {{steps: 2000, sleep: 0.05}}\n")
        env = {**os.environ, "SIDE_LOG": side, "LOCK_DIR": os.path.join(root, "locks"),
               "SWEEPRUN_HOME": os.path.join(root, "state")}
        server.notice = None
        worker = subprocess.Popen([sys.executable, "-m", "sweeprun", "worker", sweep, "--workers", "2",
                                   "--notice", f"aws={url}"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(events(side, "start")) < 2:
            time.sleep(0.1)
        time.sleep(1.0)
        posted = time.time()
        server.post({"action": "terminate", "time": "soon"})
        worker.wait(timeout=60)
        saved = max(e["at"] for e in events(side, "preempted"))
        latencies.append(saved - posted)
        print(f"round {i}: both runs saved {saved - posted:.2f} s after the notice; worker exit {worker.returncode}")
    print(f"median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s "
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
