"""Process identity on this host: who holds a run, and is it still alive.

A pid alone is not an identity (pids are reused), so a holder is recorded as
host + pid + the process's start time, read from /proc where there is one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from dataclasses import dataclass

#: This machine's name in the ledger. ``SWEEPRUN_HOST`` overrides it, e.g. for containers that
#: share a hostname, or for tests that play several machines on one.
HOST = os.environ.get("SWEEPRUN_HOST") or socket.gethostname()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or ``None`` when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        # The command name (field 2) may hold spaces and parens: split after the last ')'.
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessRef:
    host: str
    pid: int
    start: int | None

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(HOST, pid, start_time(pid))

    @classmethod
    def me(cls) -> ProcessRef:
        return cls.of(os.getpid())

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}"

    def alive(self) -> bool:
        """True unless this process is known to be gone; a process on another host counts as alive."""
        if self.host != HOST:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        now = start_time(self.pid)
        return self.start is None or now is None or now == self.start

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.host == HOST and self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def die_with_parent() -> None:
    """``preexec_fn`` for children: SIGKILL them when the launcher dies (Linux).

    Without it a launcher killed on its own leaves its children training, and
    the next launcher, seeing the holder's pid gone, would start a second copy.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
