"""From a SLURM requeue to the run's next training step, with SLURM's share apart.

A one-run sweep (tests/scripts/steps.py with ``api: true``: the training API, no torch in the
steps, a checkpoint every two)
is submitted with ``sweeprun launch --on slurm`` to the tests' one-node cluster
(tests/_slurm_cluster.py: started if it is not running; root, Debian's slurm-wlm and munge).
Each round interrupts the training task one way, then times:

- ``slurm``: from the interruption to the task RUNNING again (squeue, polled every 0.1 s):
  the job's end, the requeue, its wait (``AuthInfo=cred_expire``: 5 s on this cluster, 120 s
  by default, see docs/schedulers.md) and its start; what any tool on SLURM pays;
- ``sweeprun``: from the task RUNNING to the run's first training step in it: the worker's
  start, the ledger claim, the lease, the run's start and its resume from the checkpoint.

Ways: ``requeue`` (``scontrol requeue``: SIGTERM, the runs save, SLURM requeues) and
``warning`` (``scancel --signal=USR1 --batch``, what ``--signal=B:USR1@N`` sends before the
time limit: the runs save and the task requeues itself).

    python benchmarks/slurm_requeue.py [--rounds 3]

A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import _slurm_cluster  # noqa: E402


def first_steps(side_log: Path) -> list[dict]:
    if not side_log.exists():
        return []
    return [e for e in map(json.loads, side_log.read_text().splitlines()) if e["event"] == "first_step"]


def task_state(job: str) -> str:
    return _slurm_cluster.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = _slurm_cluster.start()
    root = Path(tempfile.mkdtemp(prefix="sweeprun-slurm-bench-"))
    (root / "locks").mkdir()
    side = root / "side.log"
    env.update(SIDE_LOG=str(side), LOCK_DIR=str(root / "locks"), SWEEPRUN_HOME=str(root / "state"),
               PYTHONPATH=str(REPO))
    sweep = root / "bench.yaml"
    sweep.write_text(f"""\
name: bench
command: {sys.executable} {REPO}/tests/scripts/steps.py --x 1
store: {root}/store
grid: {{seed: [1]}}
params: {{steps: 100000, sleep: 0.1, api: true}}
grace_s: 30
slurm: {{partition: spot}}
""")
    out = subprocess.run([sys.executable, "-m", "sweeprun", "launch", str(sweep), "--on", "slurm"], env=env,
                         capture_output=True, text=True, check=True, cwd=root).stdout
    job = out.split("submitted job ")[1].split()[0] + "_0"
    rows = []
    try:
        for i in range(args.rounds * 2):
            way = ("requeue", "warning")[i % 2]
            deadline = time.monotonic() + 300
            while len(first_steps(side)) < i + 1:  # the run trains in this round's task
                if time.monotonic() > deadline:
                    raise SystemExit("the run did not start training")
                time.sleep(0.1)
            time.sleep(1.0)  # a few steps and a checkpoint
            started = time.time()
            if way == "requeue":
                _slurm_cluster.run("scontrol", "requeue", job)
            else:
                _slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
            while task_state(job) == "RUNNING":  # the old task ends
                time.sleep(0.1)
            while task_state(job) != "RUNNING":
                time.sleep(0.1)
            running = time.time()
            while len(first_steps(side)) < i + 2:
                time.sleep(0.05)
            stepped = first_steps(side)[-1]["at"]
            rows.append((way, running - started, stepped - running))
            print(f"{way:8s} slurm {running - started:6.1f} s   sweeprun {stepped - running:5.1f} s", flush=True)
    finally:
        _slurm_cluster.run("scancel", job.split("_")[0], check=False)
    print("\n| way | SLURM: interruption to task running, s | sweeprun: task running to next step, s |")
    print("|---|---:|---:|")
    for way in ("requeue", "warning"):
        mine = [r for r in rows if r[0] == way]
        print(f"| {way} | {statistics.median(r[1] for r in mine):.1f} | {statistics.median(r[2] for r in mine):.1f} |")
    print(f"\n(medians of {args.rounds} rounds each; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
