"""The torchrun agent of a multi-process run: ``torch.distributed.run``, with an exit code
the launcher can read.

The launcher starts this module (never imports it: it imports torch) with torchrun's own
arguments. Two things are added to plain ``torchrun``:

* ``SWEEPRUN_AGENT_PID`` in the ranks' environment, so :mod:`sweeprun.rank_guard` can tell
  that the agent died before the rank's death signal was armed;
* one exit code for the whole run, from the exit codes of the ranks torchrun saw fail (the
  first to end; it stops the others itself). torchrun exits 1 whatever its ranks did, so a
  run whose ranks all saved and exited 75 would read as a failure. Here: every rank 0
  gives 0; a rank that exited 75, or was ended by SIGKILL, SIGTERM, SIGINT or SIGHUP (one
  rank lost to the OOM killer or a kill, and the ranks torchrun then stopped), gives 75,
  an interruption, whatever the others did meanwhile: a peer's collective fails as soon
  as one rank is gone, and that failure is not the script's. Otherwise the first other
  code (an exception, a segfault) is the run's failure, passed on (a signal ``n`` as
  ``128 + n``). torchrun stopped by a signal of its own has stopped its ranks with it: the
  agent then dies of that signal, as a single process would.
"""

from __future__ import annotations

import os
import signal
import sys

from sweeprun.rank_guard import AGENT_PID  # standard library only, like this module

#: The exit code of a run that saved and stopped when asked: :data:`sweeprun.runenv.PREEMPTED_EXIT`
#: (not imported: this module must not pull sweeprun's launcher side into every agent).
PREEMPTED_EXIT = 75
#: Rank deaths that are interruptions, not failures of the script.
_STOPPING_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def exit_code(codes: list[int]) -> int:
    """The run's exit code from its ranks' (a negative code: killed by that signal)."""
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    if any(c == PREEMPTED_EXIT or -c in _STOPPING_SIGNALS for c in failed):
        return PREEMPTED_EXIT
    code = failed[0]
    return code if code > 0 else 128 - code


def main(argv: list[str]) -> int:
    os.environ[AGENT_PID] = str(os.getpid())
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        return exit_code([failure.exitcode for failure in exc.failures.values()])
    except SignalException as exc:  # its ranks were stopped with the same signal
        sys.stdout.flush()
        signal.signal(exc.sigval, signal.SIG_DFL)
        os.kill(os.getpid(), exc.sigval)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
