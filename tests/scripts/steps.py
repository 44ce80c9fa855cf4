"""A tiny training stand-in for launcher tests: no torch, starts in milliseconds (but see ``api``).

It counts ``steps`` steps of ``sleep`` seconds, checkpoints its step to a JSON
file in its run directory after each one (atomically; with ``api: true`` through sweeprun's
training API instead, drawing a seeded "loss" from Python's RNG), and records in a side
log (``SIDE_LOG``) every start, resume point and finish, so tests can prove what
ran and when (and the SLURM partition it ran on, if any). A per-run ``flock`` detects two
processes on one run at once.
"""

import fcntl
import json
import os
import signal
import sys
import time

run_dir = os.environ["SWEEPRUN_RUN_DIR"]
run_id = os.environ["SWEEPRUN_RUN_ID"]
attempt = int(os.environ["SWEEPRUN_ATTEMPT"])
# Large parameters stay out of the environment; params.json always has them.
params = (json.loads(os.environ["SWEEPRUN_PARAMS"]) if "SWEEPRUN_PARAMS" in os.environ
          else json.load(open(os.path.join(run_dir, "params.json"))))
side_log = os.environ["SIDE_LOG"]
steps = int(params.get("steps", 5))
sleep_s = float(params.get("sleep", 0.05))


def side(event: str, **extra: object) -> None:
    line = json.dumps({"run": run_id, "attempt": attempt, "pid": os.getpid(), "event": event,
                       "partition": os.environ.get("SLURM_JOB_PARTITION"), "at": time.time(), **extra})
    with open(side_log, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


lock = open(os.path.join(os.environ["LOCK_DIR"], run_id + ".lock"), "w")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    side("overlap")
    sys.exit(3)

if params.get("api"):
    # The training API instead (``api: true``): each step's "loss" draws from Python's RNG,
    # seeded by ``seed``, which sweeprun checkpoints every two steps: a run resumed from any
    # checkpoint logs exactly what an uninterrupted one does, and one that is not differs.
    import random

    from sweeprun.training import init

    random.seed(params.get("seed", 0))
    run = init(every_steps=2, tracker=params.get("tracker"))   # tracker: also to mlflow / tensorboard
    run.restore()
    side("start", from_step=run.step)
    first = True
    while run.step < steps:
        time.sleep(sleep_s)
        if run.step == params.get("fail_at"):
            raise RuntimeError(f"failing on purpose at step {run.step}")
        run.end_step(loss=random.random())
        if first:  # this process's first step: where a resume's wait ends (benchmarks/slurm_requeue.py)
            side("first_step", step=run.step)
            first = False
    run.finish()
    side("finish", step=run.step)
    sys.exit(0)

ckpt = os.path.join(run_dir, "ckpt.json")
step = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
side("start", from_step=step)

stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
if params.get("fail"):
    print("failing on purpose", flush=True)
    side("fail")
    sys.exit(7)
while step < steps:
    time.sleep(sleep_s)
    step += 1
    tmp = ckpt + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    print(f"step {step}", flush=True)
    if stop:
        side("preempted", step=step)
        sys.exit(75)
side("finish", step=step)
