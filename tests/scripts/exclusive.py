"""Run a command while holding a per-run flock, to prove no run ever has two processes at once.

Usage: exclusive.py CMD ARGS... The lock is taken without waiting; if another
process holds it, an "overlap" line goes to SIDE_LOG and the exit code is 3.
Then the command replaces this process (exec), keeping the lock until it ends,
so signals reach it directly and a SIGKILL releases the lock.

Paused machines (tests that SIGSTOP a whole simulated host): a holder that is
stopped is not running, so waiting for it is not an overlap. With
``EXCLUSIVE_GRACE_S`` set, a process that finds the lock held waits while the
holder is stopped, and gives a woken holder that many seconds to be stopped by
its own launcher; only a holder that keeps running past that is an overlap.
"""

import fcntl
import json
import os
import sys
import time

run_id = os.environ["SWEEPRUN_RUN_ID"]
grace_s = float(os.environ.get("EXCLUSIVE_GRACE_S", "0"))
lock_path = os.path.join(os.environ["LOCK_DIR"], run_id + ".lock")
lock_fd = os.open(lock_path, os.O_CREAT | os.O_RDWR)


def holder_stopped() -> bool:
    try:
        pid = int(os.pread(lock_fd, 32, 0).decode().strip() or 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, ValueError):
        return False


running_s, waited_paused = 0.0, False
while True:
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        event = "start"
        break
    except BlockingIOError:
        if holder_stopped():
            waited_paused, running_s = True, 0.0
        elif running_s >= grace_s:
            event = "overlap"
            break
        else:
            running_s += 0.05
        time.sleep(0.05)
if event == "start":
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, str(os.getpid()).encode(), 0)
with open(os.environ["SIDE_LOG"], "a") as f:
    f.write(json.dumps({"run": run_id, "attempt": int(os.environ["SWEEPRUN_ATTEMPT"]),
                        "pid": os.getpid(), "event": event, "time": time.time(),
                        "waited_for_paused": waited_paused}) + "\n")
if event == "overlap":
    sys.exit(3)
os.set_inheritable(lock_fd, True)
argv = sys.argv[1:]
if argv[0] in ("python", "python3"):
    argv[0] = sys.executable
os.execvp(argv[0], argv)
