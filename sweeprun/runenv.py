"""The contract between the launcher and a run's process: environment and exit codes.

Both sides import these names, so the launcher (which never imports torch) and
the training API (which does) cannot drift apart. The variables are declared (type,
meaning, parser) in :mod:`sweeprun.settings`; these are their names.
"""

from __future__ import annotations

from . import settings

RUN_DIR = settings.RUN_DIR.name        # URL or path of the run directory
RUN_ID = settings.RUN_ID.name
PARAMS = settings.PARAMS.name          # JSON object of the run's parameters
ATTEMPT = settings.ATTEMPT.name        # 1, 2, ... one per start of the run (also the fencing token)
SWEEP = settings.SWEEP.name            # sweep name
TIME_LIMIT = settings.TIME_LIMIT.name  # seconds: save and exit as preempted before this budget ends
#: Seconds: the sweep's mean time between interruptions, which the launcher measures from
#: its ledger (``every_s="auto"`` spaces checkpoints by it); a user may set it instead.
MTBI = settings.MTBI_S.name
#: What that mean is taken to be before any interruption was seen: a spot or preemptible
#: GPU, or a free notebook session, lasts hours, not days.
PRIOR_MTBI_S = 6 * 3600.0

#: A run that saved a checkpoint and stopped early because it was asked to
#: (SIGTERM, SIGINT, time limit) exits with this code (EX_TEMPFAIL). The launcher
#: records it as ``interrupted``: resumable, and no attempt is used up.
PREEMPTED_EXIT = 75

#: A run whose loss spiked again after its last allowed rollback (``sweeprun.init(spikes=...)``)
#: exits with this code, its attempt marked ``attempts/<n>.diverged``: the launcher records
#: the run ``diverged`` and does not start it again until it is reset.
DIVERGED_EXIT = 76
#: A run that ran out of accelerator memory exits with this code, its attempt marked
#: ``attempts/<n>.oom`` with the step: the launcher records ``oom``, not an ordinary failure.
OOM_EXIT = 77
