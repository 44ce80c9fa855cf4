"""Run a command while holding a per-run flock, to prove no run ever has two processes at once.

Usage: exclusive.py CMD ARGS... The lock is taken without waiting; if another
process holds it, an "overlap" line goes to SIDE_LOG and the exit code is 3.
Then the command replaces this process (exec), keeping the lock until it ends,
so signals reach it directly and a SIGKILL releases the lock.
"""

import fcntl
import json
import os
import sys
import time

run_id = os.environ["SWEEPRUN_RUN_ID"]
lock_fd = os.open(os.path.join(os.environ["LOCK_DIR"], run_id + ".lock"), os.O_CREAT | os.O_WRONLY)
try:
    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    event = "start"
except BlockingIOError:
    event = "overlap"
with open(os.environ["SIDE_LOG"], "a") as f:
    f.write(json.dumps({"run": run_id, "attempt": int(os.environ["SWEEPRUN_ATTEMPT"]),
                        "pid": os.getpid(), "event": event, "time": time.time()}) + "\n")
if event == "overlap":
    sys.exit(3)
os.set_inheritable(lock_fd, True)
argv = sys.argv[1:]
if argv[0] in ("python", "python3"):
    argv[0] = sys.executable
os.execvp(argv[0], argv)
