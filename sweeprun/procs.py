"""Process identity on this host: who holds a run, is it still alive, and may we kill it.

A pid alone is not an identity (pids are reused), so a holder is recorded as
host + pid + the process's start time, read from /proc where there is one. The
rule for signals: never kill a process you cannot prove is your run's child, that
is, one whose recorded start time is known and equals the live process's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import settings


def _pid_space() -> str:
    """A short tag for this boot of this kernel and this pid namespace: where a pid means something.

    Two machines (or containers) may share a hostname (a cloned image, ``--hostname
    worker``); each would then take the other's pids for its own, find them dead, and
    take over live runs at once. The kernel's boot id and the pid namespace tell them apart.
    """
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("")
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("")
    if not any(parts):
        return ""
    return "~" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:6]


#: This machine's name in the ledger: its hostname and the tag of its pid space.
#: ``SWEEPRUN_HOST`` overrides it, e.g. for tests that play several machines on one.
HOST = settings.HOST.get() or socket.gethostname() + _pid_space()

_PR_SET_PDEATHSIG = 1


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state letter, start time in clock ticks since boot)`` from /proc, or ``None`` when unknown."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        # The command name (field 2) may hold spaces and parens: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or ``None`` when unknown."""
    found = _proc_stat(pid)
    return found[1] if found else None


def boot_clock() -> float:
    """Seconds on a clock that never jumps and keeps counting while the machine sleeps.

    Lease accounting must see a laptop's suspend or a VM's pause as time gone by:
    ``time.monotonic()`` stops during a suspend on Linux, so a holder that wakes would
    think its lease still fresh and renew it after another machine took the run.
    ``CLOCK_BOOTTIME`` counts the suspend; where there is none, the monotonic clock.
    """
    return time.clock_gettime(_BOOT_CLOCK)


_BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


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
        """Might this process still be running? False only when it is known to be gone.

        Used to decide whether a claim may be taken over, where wrongly saying "gone"
        would run a run twice, so every doubt counts as alive: a process on another
        host, or a live pid whose start time was not recorded (or cannot be read). It is
        gone when the pid does not exist, when it is a zombie (exited, not yet reaped),
        or when the pid now belongs to a process that started at another time.
        For signals, :meth:`kill` asks for proof instead.
        """
        if self.host != HOST:
            return True
        if self.pid <= 0:
            return False
        now = _proc_stat(self.pid)
        if now is None:  # no /proc here: the kernel still knows whether the pid exists
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        state, started = now
        if _exited(self.pid, state):
            return False
        return self.start is None or started == self.start

    def is_provably_running(self) -> bool:
        """This very process is running here: the recorded start time is known and matches."""
        if self.host != HOST or self.start is None:
            return False
        now = _proc_stat(self.pid)
        return now is not None and not _exited(self.pid, now[0]) and now[1] == self.start

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        """Send ``sig`` only to this very process; True when it was sent.

        A pid whose start time was never recorded, or whose live start time differs
        (the OS gave the pid to another process), is left alone: killing on a guess
        could kill a stranger, or an old launcher that is still alive.
        """
        if not self.is_provably_running():
            return False
        pidfd = _pidfd_open(self.pid)
        try:
            # With a pidfd, the check below and the signal are about one process even if
            # the pid is reused in between: the fd stays bound to the process it was opened on.
            if not self.is_provably_running():
                return False
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False
        finally:
            if pidfd is not None:
                os.close(pidfd)


    def kill_group(self, sig: int = signal.SIGKILL) -> bool:
        """Send ``sig`` to the process group this process leads; True when it was sent.

        A run's child is spawned as a group leader (a new session), so a wrapper such as
        ``bash train.sh`` or ``torchrun`` takes what it started down with it. Proof is as
        for :meth:`kill` while the leader lives; once it is gone, a group that still
        exists under its number is that very group, since Linux gives no new process a
        number that a living group still holds.
        """
        if self.host != HOST or self.start is None or self.pid <= 1:
            return False
        if not self.is_provably_running():
            now = _proc_stat(self.pid)
            if now is not None and not _exited(self.pid, now[0]):
                return False  # the number belongs to another live process now
        try:
            os.killpg(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False


def _exited(pid: int, state: str) -> bool:
    """Zombie or dead. A zombie main thread whose other threads still run is a live process."""
    if state not in ("Z", "X"):
        return False
    try:
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True


def _pidfd_open(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None or not hasattr(signal, "pidfd_send_signal"):
        return None
    try:
        return int(opener(pid))
    except OSError:  # old kernel (ENOSYS), or the process is already gone
        return None


# -- children that die with the launcher ---------------------------------------------------

def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Looked up once in the parent: a forked child of a threaded process must not dlopen,
# since another thread may have held the loader's lock at the moment of the fork.
_PRCTL = _load_prctl()


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL the child when the thread that forked it ends (Linux).

    Linux binds PR_SET_PDEATHSIG to the forking THREAD, not the process: used from a
    short-lived thread it kills the child as soon as that thread exits. :func:`spawn`
    uses it from a thread that lives as long as the process; prefer :func:`spawn`.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class _Request:
    argv: Any
    kwargs: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen[Any] | None = None
    error: BaseException | None = None


class _Spawner:
    """One thread, started on first use and living as long as the process, forks every child.

    A child's death signal is tied to the thread that forked it, so only a thread that
    never ends gives "dies with the launcher process" without "dies with the slot
    thread that asked for it" (a slot thread that raises would otherwise SIGKILL its
    child at once, with no grace and no checkpoint).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def spawn(self, argv: Any, kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        request = _Request(argv, kwargs)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="sweeprun-spawner",
                                                daemon=True)
                self._thread.start()
            self._queue.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.proc is not None
        return request.proc

    def _serve(self) -> None:
        while True:
            request = self._queue.get()
            try:
                request.proc = subprocess.Popen(request.argv, **request.kwargs)
            except BaseException as exc:  # handed to the caller; this thread must not end
                request.error = exc
            finally:
                request.done.set()


_spawner = _Spawner()


def _reset_after_fork() -> None:
    global _spawner
    _spawner = _Spawner()  # the forked child has no spawner thread, and maybe a held lock


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def spawn(argv: Any, **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **popen_kwargs)`` whose child dies with this process (Linux).

    Unlike ``preexec_fn=die_with_parent`` from the caller's thread, the child outlives
    the thread that asked for it: it is SIGKILLed only when the launcher process ends,
    so a launcher killed on its own leaves no child training while the next launcher,
    seeing the holder gone, starts a second copy. Blocks until the child is started;
    errors (a missing executable, ...) are raised here, in the calling thread. A
    ``preexec_fn`` given by the caller runs after the death signal is set.
    """
    user_preexec = popen_kwargs.pop("preexec_fn", None)
    parent = os.getpid()

    def preexec() -> None:
        die_with_parent()
        if os.getppid() != parent:  # the launcher died before the death signal was armed
            os.kill(os.getpid(), signal.SIGKILL)
        if user_preexec is not None:
            user_preexec()

    return _spawner.spawn(argv, {**popen_kwargs, "preexec_fn": preexec})


# -- the ranks of a multi-process run ---------------------------------------------------------

def children(pid: int) -> list[int]:
    """The live children of ``pid`` on this machine, from /proc (``[]`` where there is none)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = []
    for task in tasks:  # the kernel's own list, where it keeps one (CONFIG_PROC_CHILDREN)
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            found = []
            break
    else:
        if tasks:
            return sorted(set(found))
    for entry in _pids():  # otherwise every process's parent
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                    found.append(entry)
        except (OSError, IndexError, ValueError):
            continue
    return sorted(set(found))


def processes_with_env(wanted: dict[str, str]) -> list[ProcessRef]:
    """Every other process of this machine (this user's: others' environments cannot be read)
    whose environment holds each of ``wanted``'s variables with exactly that value."""
    needles = [f"{k}={v}".encode() for k, v in wanted.items()]
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if all(n in env for n in needles):
            ref = ProcessRef.of(pid)
            if ref.start is not None:
                found.append(ref)
    return found


def end_process(ref: ProcessRef, sig: int = signal.SIGKILL) -> bool:
    """Signal ``ref``'s process group if it leads one (a rank does), else the process alone."""
    try:
        leads = os.getpgid(ref.pid) == ref.pid
    except OSError:
        return False
    return ref.kill_group(sig) if leads else ref.kill(sig)


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
