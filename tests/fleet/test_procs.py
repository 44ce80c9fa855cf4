"""Process identity with real processes: who may be killed, who is alive, and children that
die with the launcher process but not with the thread that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweeprun.procs import HOST, ProcessRef, die_with_parent, spawn, start_time

from conftest import REPO, wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(SLEEPER)
    wait_for(lambda: start_time(proc.pid) is not None, what="the sleeper in /proc")
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# -- kill: only a process proven to be the one recorded --------------------------------------

def test_kill_signals_the_recorded_process(sleeper: subprocess.Popen[bytes]) -> None:
    assert ProcessRef.of(sleeper.pid).kill() is True
    assert sleeper.wait(timeout=60) == -signal.SIGKILL


def test_kill_without_a_recorded_start_time_does_nothing(sleeper: subprocess.Popen[bytes]) -> None:
    assert ProcessRef(HOST, sleeper.pid, None).kill() is False
    assert sleeper.poll() is None and ProcessRef.of(sleeper.pid).alive()


def test_kill_of_a_reused_pid_does_nothing(sleeper: subprocess.Popen[bytes]) -> None:
    """The recorded child is gone and the OS gave its pid to this sleeper: it must survive."""
    start = start_time(sleeper.pid)
    assert start is not None
    recorded = ProcessRef(HOST, sleeper.pid, start - 1)
    assert recorded.kill() is False and recorded.kill(signal.SIGTERM) is False
    assert sleeper.poll() is None


def test_kill_on_another_host_or_of_a_gone_process_does_nothing(sleeper: subprocess.Popen[bytes]) -> None:
    assert ProcessRef("elsewhere", sleeper.pid, start_time(sleeper.pid)).kill() is False
    ref = ProcessRef.of(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert ref.kill() is False
    assert ProcessRef(HOST, 0, 1).kill() is False and ProcessRef(HOST, -1, 1).kill() is False


# -- alive: conservative, but precise about what is known ------------------------------------

def test_alive_is_false_for_a_zombie(tmp_path: Path) -> None:
    """An exited child nobody has reaped yet still has a pid, but it is not running."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = ProcessRef.of(proc.pid)
    wait_for(lambda: _state(proc.pid) == "Z", what="the child to exit")  # not reaped: no wait()
    try:
        assert not ref.alive() and not ProcessRef(HOST, proc.pid, None).alive()
    finally:
        proc.wait()
    assert not ref.alive()


MAIN_THREAD_EXITS = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(600,)).start()
print("go", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_whose_main_thread_ended_is_still_alive() -> None:
    """/proc shows its leader as a zombie, but its other thread (a launcher's work) runs on."""
    proc = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        ref = ProcessRef.of(proc.pid)
        wait_for(lambda: _state(proc.pid) == "Z", what="the main thread to exit")
        assert ref.alive()
        assert ref.kill() is True
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def test_alive_answers(sleeper: subprocess.Popen[bytes]) -> None:
    start = start_time(sleeper.pid)
    assert ProcessRef(HOST, sleeper.pid, start).alive()
    assert ProcessRef(HOST, sleeper.pid, None).alive()           # unknown start: cannot prove it gone
    assert not ProcessRef(HOST, sleeper.pid, start - 1).alive()  # the pid now names another process
    assert ProcessRef("elsewhere", 1, None).alive()              # another host: cannot tell from here


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _sigkill_pending(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        masks = {k: int(v, 16) for k, _, v in (line.partition(":") for line in f)
                 if k in ("SigPnd", "ShdPnd")}
    return any(mask & (1 << (signal.SIGKILL - 1)) for mask in masks.values())


# -- spawn: children die with the launcher process, not with a thread ------------------------

LAUNCHER = """
import os, subprocess, sys, threading, time
from sweeprun.procs import die_with_parent, spawn
box = {}
def slot():
    box["tid"] = threading.get_native_id()
    argv = [sys.executable, "-c", "import time; time.sleep(600)"]
    if sys.argv[1] == "spawn":
        box["proc"] = spawn(argv)
    else:  # the old way: the death signal is bound to this short-lived thread
        box["proc"] = subprocess.Popen(argv, preexec_fn=die_with_parent)
    raise RuntimeError("the slot thread fails and ends")
threading.excepthook = lambda args: None
thread = threading.Thread(target=slot)
thread.start()
thread.join()
while os.path.exists(f"/proc/self/task/{box['tid']}"):  # the OS thread itself is gone
    time.sleep(0.01)
print(box["proc"].pid, flush=True)
time.sleep(600)
"""


def _launcher(how: str) -> tuple[subprocess.Popen[str], ProcessRef]:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, how], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert launcher.stdout is not None
    pid = int(launcher.stdout.readline())
    return launcher, ProcessRef(HOST, pid, start_time(pid))


def test_spawned_child_outlives_its_thread_and_dies_with_the_launcher() -> None:
    launcher, child = _launcher("spawn")
    try:
        assert child.start is not None and child.alive()
        assert not _sigkill_pending(child.pid)  # no death signal on its way either
        launcher.send_signal(signal.SIGKILL)    # the launcher is lost
        launcher.wait()
        wait_for(lambda: not child.alive(), what="the child to die with its launcher")
    finally:
        launcher.kill()
        launcher.wait()
        child.kill()


def test_the_old_preexec_kills_the_child_when_its_thread_ends() -> None:
    """The failure spawn() exists for: PR_SET_PDEATHSIG is tied to the forking thread."""
    launcher, child = _launcher("thread")
    try:
        wait_for(lambda: not child.alive(), what="the child to die with its thread")
        assert launcher.poll() is None
    finally:
        launcher.kill()
        launcher.wait()
        child.kill()


def test_spawn_raises_in_the_caller_and_keeps_serving() -> None:
    with pytest.raises(FileNotFoundError):
        spawn(["/nonexistent/sweeprun-no-such-program"])
    results: list[str] = []

    def one(i: int) -> None:
        proc = spawn([sys.executable, "-c", f"print({i})"], stdout=subprocess.PIPE, text=True)
        results.append(proc.communicate(timeout=60)[0].strip())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [str(i) for i in range(8)]


def test_spawn_runs_the_callers_preexec_fn_too(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    proc = spawn([sys.executable, "-c", "pass"], preexec_fn=lambda: marker.write_text("yes"))
    assert proc.wait(timeout=60) == 0 and marker.read_text() == "yes"
    assert die_with_parent is not None  # the old name stays for callers not yet on spawn()
