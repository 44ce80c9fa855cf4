"""Run a training script, SIGKILLed at a crash point in its first attempt only.

``python first_attempt_crashes.py POINT SCRIPT ARGS...``: with SWEEPRUN_ATTEMPT=1 the
script runs with ``SWEEPRUN_CRASH_AT=POINT`` (a lost machine at that instant); later
attempts run it plainly, so the relaunch shows what the lost attempt left behind.
"""

import os
import runpy
import sys

point, script, *args = sys.argv[1:]
if os.environ.get("SWEEPRUN_ATTEMPT") == "1":
    os.environ["SWEEPRUN_CRASH_AT"] = point
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
