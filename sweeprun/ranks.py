"""Multi-process runs, the launcher's side: how N ranks are started, found, stopped and cleaned up.

A run with ``nproc: N > 1`` is started as N ranks through ``torch.distributed.run``
(torchrun), but never by importing torch here: the launcher starts
:mod:`sweeprun.torchrun_agent` (torchrun, plus one exit code for the whole run) as the
attempt's child, in the child's usual place (its own session, dying with the launcher).
torchrun starts every rank in a session of its own, so a signal to the agent's group does
not reach them, and a SIGKILLed agent leaves them running. Three things keep one run one
owner:

* every rank starts through :mod:`sweeprun.rank_guard`, which arms SIGKILL on its parent's
  death and then ``exec``\\ s the user's command: a killed agent (or a killed launcher, whose
  death kills the agent) takes every rank with it, at once, with nothing to poll;
* the attempt finds its ranks as the agent's children (:func:`~sweeprun.procs.children`)
  to signal them itself: SIGTERM reaches every rank, not torchrun, which would answer it
  by stopping them on its own clock and exiting without their exit codes;
* what escaped anyway (a rank that cleared its death signal, a rank's own daemon) carries
  the run's environment, which no other process has: the attempt's end, and the next
  attempt's start on this machine, kill every process whose environment names this run
  (:func:`stray_processes`).

The guard is run by its path in isolated mode without ``site`` (``python -I -S``): about 6 to
14 ms of CPU per rank measured here, where ``python -m sweeprun.rank_guard`` cost 30 to 40 ms
(and a rank's ``import torch`` 1.5 s). The agent costs what torchrun costs. Rejected: the
launcher as child subreaper (a SIGKILLed launcher leaves the ranks to init all the same),
and only recording rank pids for the next launch's orphan killer (the ranks would train on,
holding their GPUs, until someone relaunches on that machine).
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import settings
from .errors import SpecError
from .procs import ProcessRef, children, end_process, processes_with_env
from .runenv import ATTEMPT, RUN_DIR, RUN_ID

if TYPE_CHECKING:
    from .spec import SweepSpec

#: Processes of the run, for the script and for the training side (the contract with it).
NPROC_ENV = settings.NPROC.name
#: The rank guard's file, run by its path: ``-I`` keeps sweeprun's folder off ``sys.path``.
RANK_GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank_guard.py")
#: The sweep file's ``on_world_size_change:`` (``reshard`` or ``refuse``), for the training side.
WORLD_SIZE_POLICY_ENV = settings.ON_WORLD_SIZE_CHANGE.name


def agent_argv(argv: list[str], nproc: int, grace_s: float) -> list[str]:
    """The attempt's child for ``nproc`` ranks of ``argv`` (the run's command as built for one
    process, a leading ``python`` already the launcher's interpreter).

    ``--no-python``: torchrun runs the rank guard, which runs ``argv`` as it is, so a command
    that is not ``python ...`` (``bash train.sh``, a binary) works the same way. ``--standalone``
    gives each run a rendezvous on a free port of its own. torchrun's own shutdown waits the
    sweep's ``grace_s`` before it SIGKILLs its ranks, as the launcher does.
    """
    return [sys.executable, "-m", "sweeprun.torchrun_agent", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "--shutdown-timeout", str(math.ceil(grace_s)), "--no-python",
            sys.executable, "-I", "-S", RANK_GUARD, *argv]


def stray_processes(run_dir: str, run_id: str, attempt: int | None = None) -> list[ProcessRef]:
    """Processes on this machine started for this run (of ``attempt``, or of any attempt):
    the environment the launcher gave them names the run's folder and id."""
    wanted = {RUN_DIR: run_dir, RUN_ID: run_id}
    if attempt is not None:
        wanted[ATTEMPT] = str(attempt)
    return processes_with_env(wanted)


def check_launchable(spec: SweepSpec, gpus: Sequence[str] | None) -> None:
    """Refuse, before anything starts, what no run could do: take more GPUs than ``--gpus``
    gives, or start ranks without torch in the launcher's interpreter (found, not imported)."""
    most = spec.max_nproc()
    if gpus is not None and most > len(gpus):
        raise SpecError(f"{spec.source}: a run takes nproc = {most} GPUs, but --gpus gives {len(gpus)} "
                        f"({','.join(gpus)}); give at least {most}, or lower nproc")
    if spec.ranked and importlib.util.find_spec("torch") is None:
        raise SpecError(f"{spec.source}: nproc {most} starts ranks through torch.distributed.run, but "
                        f"torch is not installed for {sys.executable}; install it there")


class Processes:
    """What one attempt started: its child's process group and, with ``nproc > 1``, each rank's.

    The child (the agent, for ranks) leads a group of its own; each rank leads another.
    """

    def __init__(self, nproc: int, run_dir: str, run_id: str, ranked: bool | None = None) -> None:
        self.nproc = nproc
        #: started through torchrun (``nproc:`` in the sweep file): a run of one rank too
        self.ranked = nproc > 1 if ranked is None else ranked
        self.run_dir = run_dir
        self.run_id = run_id
        self._ranks: dict[int, ProcessRef] = {}  # the ranks seen so far, by pid

    def signal(self, proc: subprocess.Popen[Any], sig: int) -> None:
        """SIGTERM: to every rank, not torchrun, which would stop them on its own clock and
        exit without their exit codes; before torchrun has started them, to torchrun, which
        then stops what it starts. SIGKILL: to torchrun's group and every rank's."""
        ranks = self._find(proc) if self.ranked else []
        if sig == signal.SIGKILL or not ranks:
            _signal_group(proc.pid, sig)
        for rank in ranks:
            end_process(rank, sig)

    def end(self, pid: int, attempt: int) -> None:
        """SIGKILL what is left once the child exited: its group and, for ranks, their groups
        and any process still carrying this attempt's environment."""
        _signal_group(pid, signal.SIGKILL)
        if self.ranked:
            for rank in self._ranks.values():
                end_process(rank)
            self.kill_strays(attempt)

    def kill_strays(self, attempt: int | None) -> list[int]:
        """Kill every process of this machine whose environment names this run (and
        ``attempt``): ranks that outlived their attempt. Only the run's holder calls it."""
        return [ref.pid for ref in stray_processes(self.run_dir, self.run_id, attempt) if end_process(ref)]

    def _find(self, proc: subprocess.Popen[Any]) -> list[ProcessRef]:
        """The agent's children now, added to those seen before (each with its start time)."""
        if proc.poll() is None:
            for pid in children(proc.pid):
                if pid not in self._ranks:
                    self._ranks[pid] = ProcessRef.of(pid)
        return list(self._ranks.values())


def _signal_group(pgid: int, sig: int) -> None:
    """Signal a child's process group (it leads one: spawned in its own session)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
