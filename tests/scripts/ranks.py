"""A tiny multi-rank stand-in for launcher tests: gloo on CPU, a few all_reduce steps.

Started by sweeprun as ``nproc`` ranks through torchrun. Every rank records in the side
log (``SIDE_LOG``) its start, its rank, pid, the variables torchrun and sweeprun gave it
and ``CUDA_VISIBLE_DEVICES``, each step, and how it ended. Rank 0 checkpoints the step to a
JSON file in the run directory (atomically, as ``steps.py`` does), so a relaunch resumes.
SIGTERM on any rank: it exits 75 after the step in progress (no collective save: this is the
launcher's test, the training side has its own).

Parameters: ``steps``, ``sleep`` (seconds per step), ``meet`` (rank 0 waits before its first
step until that many runs have reached theirs: proof that they run at once) and ``escape``
(in attempt 1, the rank of that number clears its death signal, as a rank that escaped its
launcher would, and sleeps: its peers wait for it), ``deaf`` (every rank ignores SIGTERM, as a
script stuck in a long step would: only the grace period's SIGKILL ends it).
"""

import ctypes
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

run_dir = os.environ["SWEEPRUN_RUN_DIR"]
params = json.loads(os.environ["SWEEPRUN_PARAMS"])
rank = int(os.environ.get("RANK", "0"))  # nproc 1: one process, no torchrun, no process group
distributed = "RANK" in os.environ
stop = False


def side(event: str, **extra: object) -> None:
    line = {"run": os.environ["SWEEPRUN_RUN_ID"], "attempt": int(os.environ["SWEEPRUN_ATTEMPT"]),
            "rank": rank, "pid": os.getpid(), "event": event, "t": time.time(), **extra}
    with open(os.environ["SIDE_LOG"], "a") as f:
        f.write(json.dumps(line) + "\n")


def on_term(signum: int, frame: object) -> None:
    global stop
    if not stop:
        side("sigterm")
    stop = True


signal.signal(signal.SIGTERM, signal.SIG_IGN if params.get("deaf") else on_term)
escaping = params.get("escape") == rank and os.environ["SWEEPRUN_ATTEMPT"] == "1"
if escaping:
    ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG 0: survive the agent's death
env_names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CUDA_VISIBLE_DEVICES", "SWEEPRUN_NPROC", "SWEEPRUN_ON_WORLD_SIZE_CHANGE", "SWEEPRUN_SWEEP",
             "SWEEPRUN_RUN_DIR", "SWEEPRUN_MTBI_S")
side("start", env={k: os.environ.get(k) for k in env_names}, sid=os.getsid(0))
if escaping:
    time.sleep(3600)
if distributed:
    dist.init_process_group("gloo")
if params.get("meet") and rank == 0:
    meeting = os.path.join(os.environ["LOCK_DIR"], "meet")
    os.makedirs(meeting, exist_ok=True)
    open(os.path.join(meeting, os.environ["SWEEPRUN_RUN_ID"]), "w").close()
    while len(os.listdir(meeting)) < params["meet"]:
        time.sleep(0.05)
ckpt = os.path.join(run_dir, "ckpt.json")
step = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
steps, sleep_s = int(params.get("steps", 3)), float(params.get("sleep", 0.05))
while step < steps:
    time.sleep(sleep_s)
    total = torch.tensor([float(rank + 1)])
    if distributed:
        dist.all_reduce(total)
    step += 1
    if rank == 0:
        with open(ckpt + ".tmp", "w") as f:
            json.dump({"step": step}, f)
        os.replace(ckpt + ".tmp", ckpt)
    side("step", step=step, total=total.item())
    flags = torch.tensor([1.0 if stop else 0.0])
    if distributed:
        dist.all_reduce(flags)  # any rank asked to stop: all stop at the same step
    if flags.item():
        side("preempted", step=step)
        sys.exit(75)
side("finish", step=step)
if distributed:
    dist.destroy_process_group()
