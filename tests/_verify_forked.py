"""``python -m sweeprun verify ...`` whose script starts fork from the test's fork server.

``sweeprun verify`` starts the script four or five times, each a fresh interpreter that
imports torch (and Lightning, or the Trainer) again: most of a verify test's CPU. Run as
``python tests/_verify_forked.py verify ARGS`` with :data:`_zygote.SERVER` naming the test
process's server, it is the same command, with one change: a start of ``python script.py``
forks from that server (:func:`_zygote.spawn`, the child leading a session of its own, as
verify's own start does). A start of anything else (torchrun's agent for ``--nproc``) is
verify's own. Everything verify does with the process (signals to its group, waiting for
its group to end, exit codes) is what it does with a fresh one; the tests whose command is
not ``sys.executable script.py`` (the documented ``python examples/...``, an ``sh -c``
wrapper, ``--nproc``) keep testing fresh starts.

A forked script is the server's child, not verify's: verify's look at whether its leader
has exited (``waitid`` without reaping, which only works on a child) reads ``/proc`` instead.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from typing import Any

from sweeprun import procs
from sweeprun.verify import attempts

import _zygote

_own_spawn = attempts.spawn
_own_exited = attempts._exited
_forked: set[int] = set()


def _spawn(argv: Any, **kwargs: Any) -> Any:
    argv = [str(a) for a in argv]
    if len(argv) < 2 or argv[0] != sys.executable or not argv[1].endswith(".py"):
        return _own_spawn(argv, **kwargs)
    assert kwargs.get("stdin") == subprocess.DEVNULL and kwargs.get("start_new_session")
    proc = _zygote.spawn(argv, kwargs["env"], (), stdout=kwargs["stdout"], stderr=kwargs["stderr"],
                         server=os.environ[_zygote.SERVER], session=True)
    _forked.add(proc.pid)
    return proc


def _exited(pid: int) -> bool:
    if pid in _forked:
        found = procs._proc_stat(pid)                   # the server reaps it as it ends
        return found is None or procs._exited(pid, found[0])
    return _own_exited(pid)


attempts.spawn = _spawn
attempts._exited = _exited
sys.argv = ["sweeprun", *sys.argv[1:]]
runpy.run_module("sweeprun", run_name="__main__", alter_sys=True)
