"""The contract between the launcher and a run's process: environment and exit codes.

Both sides import these names, so the launcher (which never imports torch) and
the training API (which does) cannot drift apart.
"""

from __future__ import annotations

RUN_DIR = "SWEEPRUN_RUN_DIR"      # URL or path of the run directory
RUN_ID = "SWEEPRUN_RUN_ID"
PARAMS = "SWEEPRUN_PARAMS"        # JSON object of the run's parameters
ATTEMPT = "SWEEPRUN_ATTEMPT"      # 1, 2, ... one per start of the run (also the fencing token)
SWEEP = "SWEEPRUN_SWEEP"          # sweep name
TIME_LIMIT = "SWEEPRUN_TIME_LIMIT"  # seconds: save and exit as preempted before this budget ends
#: Seconds: the sweep's mean time between interruptions, which the launcher measures from
#: its ledger (``every_s="auto"`` spaces checkpoints by it); a user may set it instead.
MTBI = "SWEEPRUN_MTBI_S"
#: What that mean is taken to be before any interruption was seen: a spot or preemptible
#: GPU, or a free notebook session, lasts hours, not days.
PRIOR_MTBI_S = 6 * 3600.0

#: A run that saved a checkpoint and stopped early because it was asked to
#: (SIGTERM, SIGINT, time limit) exits with this code (EX_TEMPFAIL). The launcher
#: records it as ``interrupted``: resumable, and no attempt is used up.
PREEMPTED_EXIT = 75
