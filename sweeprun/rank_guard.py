"""Start one rank of a multi-process run so that it dies with the agent that started it.

torchrun starts every rank in a session of its own and does not take its ranks down when
it is itself SIGKILLed (the launcher's grace ran out, or the launcher died): a rank would
go on training, holding its GPU, while the next attempt starts the run again. So torchrun
starts each rank through this module, which asks the kernel for SIGKILL when its parent
(the torchrun agent) dies, then becomes the user's command with ``exec``: the rank keeps
this process's pid, its session and its signals, and nothing stands between it and them.

Standard library only, and nothing of sweeprun imported: run by its path in isolated mode
without ``site``, it costs a few milliseconds per rank.

    python -I -S .../sweeprun/rank_guard.py PROGRAM [ARGS...]
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

#: The agent's pid, set by :mod:`sweeprun.torchrun_agent`: a parent that died before the
#: death signal was armed is seen as a parent pid other than this one.
AGENT_PID = "SWEEPRUN_AGENT_PID"
_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if not argv:
        sys.stderr.write("usage: python -I -S rank_guard.py PROGRAM [ARGS...]\n")
        sys.exit(2)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # no prctl (not Linux): the launcher's orphan killer is left to find the rank
    agent = os.environ.get(AGENT_PID, "")
    if agent.isdigit() and os.getppid() != int(agent):
        os.kill(os.getpid(), signal.SIGKILL)  # the agent died before the signal was armed
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"sweeprun: cannot start {argv[0]!r}: {exc.strerror or exc}\n")
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
