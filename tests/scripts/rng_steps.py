"""A training stand-in that resumes through sweeprun's training API, with no torch: each step
draws its "loss" from Python's RNG, which sweeprun checkpoints, so a run resumed from any
checkpoint logs exactly what an uninterrupted one does, and one that is not would differ.

``--steps N --sleep S --seed K``. Like steps.py it records each start and its resume point in
``SIDE_LOG`` and holds a per-run ``flock`` (``LOCK_DIR``): two processes on one run at once
is written down as an ``overlap``, never hidden.
"""

import argparse
import fcntl
import json
import os
import random
import sys
import time

from sweeprun.training import init

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--sleep", type=float, default=0.1)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
run_id = os.environ["SWEEPRUN_RUN_ID"]


def side(event: str, **extra: object) -> None:
    line = json.dumps({"run": run_id, "attempt": int(os.environ["SWEEPRUN_ATTEMPT"]), "pid": os.getpid(),
                       "event": event, "job": os.environ.get("SLURM_JOB_ID"),
                       "partition": os.environ.get("SLURM_JOB_PARTITION"), "at": time.time(), **extra})
    with open(os.environ["SIDE_LOG"], "a") as f:
        f.write(line + "\n")


lock = open(os.path.join(os.environ["LOCK_DIR"], run_id + ".lock"), "w")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    side("overlap")
    sys.exit(3)

random.seed(args.seed)
run = init(every_steps=2)
run.restore()
side("start", from_step=run.step)
first = True
while run.step < args.steps:
    time.sleep(args.sleep)
    run.end_step(loss=random.random())
    if first:  # this process's first step: the end of a resume's wait
        side("first_step", step=run.step)
        first = False
run.finish()
side("finish", step=run.step)
