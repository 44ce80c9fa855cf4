"""A fork server for the tests' standalone script starts: what keeps the suite's time down.

Most of a test's CPU goes into starting training scripts, and most of a start is imports:
4.7 CPU-s for a Lightning script, 4.3 for a Trainer one, 2.6 for the plain example (torch,
and ``torch._dynamo``, which the first optimizer imports). A test interrupts and restarts a
script many times. So :class:`ScriptRun` starts its scripts from a server that imported
those modules once (:func:`spawn`): the server forks, and the child runs the script as
``python script.py ...`` would (``__main__``, its argv, environment, working directory and
``sys.path[0]``, default signal handlers, fresh RNG seeds), with the test's pipes as its
stdout and stderr, and ends as an interpreter ends (atexit, non-daemon threads joined).

It is a real process with its own pid: signals, SIGKILL, exit codes and files behave as
for a fresh interpreter. What it shares with its siblings is what was imported before the
fork (nothing of sweeprun: the tests set its path per start) and the hash seed: the
launcher, torchrun and ``verify`` still start fresh interpreters, so the suite keeps
testing those. The ranks a test starts itself, as torchrun would (``RankRun``), are forked
too: a rank is a script with a few more variables in its environment.
``SWEEPRUN_TEST_FRESH=1`` starts every script fresh (to rule the server out), as does a
kernel without pidfds.

Protocol: one Unix-socket connection per start. The test sends a JSON request and the
child's stdout and stderr (SCM_RIGHTS); the server answers the child's pid, then, when the
child has ended, its exit code (negative for a signal, as :class:`subprocess.Popen`) and
its CPU seconds.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _pidfds_work() -> bool:
    """The server waits for its children through pidfds (Linux 5.3): without them, start fresh."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


FRESH = os.environ.get("SWEEPRUN_TEST_FRESH") == "1" or not _pidfds_work()
#: The servers' environment: the suite's, before any test changed it (a module can read a
#: variable at import, and the imports happen once, in the server).
_BASE_ENV = {**os.environ, "PYTHONPATH": str(REPO)}

_servers: dict[tuple[str, ...], tuple[subprocess.Popen[bytes], str]] = {}
_lock = threading.Lock()
#: CPU seconds of the forked children that have ended (the server waits for them, not the
#: test process, so ``RUSAGE_CHILDREN`` does not see them): the suite's CPU log adds them.
_ended_cpu_s = [0.0]


def ended_children_cpu_s() -> float:
    return _ended_cpu_s[0]


# -- the test's side ----------------------------------------------------------------------------

class ForkedProcess:
    """The part of :class:`subprocess.Popen` the tests use, for a child of the fork server."""

    def __init__(self, args: list[str], conn: socket.socket, stdout: Any, stderr: Any) -> None:
        self.args, self._conn = args, conn
        self.stdout, self.stderr = stdout, stderr
        self.pid = int(self._message())
        self.returncode: int | None = None

    def _message(self, timeout: float | None = None) -> str:
        self._conn.settimeout(timeout)
        data = b""
        while not data.endswith(b"\n"):
            chunk = self._conn.recv(64)
            if not chunk:
                raise RuntimeError("the fork server went away")
            data += chunk
        return data.decode().strip()

    def _ended(self, message: str) -> int:
        code, cpu_s = message.split()
        _ended_cpu_s[0] += float(cpu_s)
        self._conn.close()
        self.returncode = int(code)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                return self._ended(self._message(timeout=0))
            except (BlockingIOError, TimeoutError):
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                return self._ended(self._message(timeout=timeout))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both pipes read to their end (each on its own thread, as Popen does), then the exit."""
        out: dict[str, str] = {}

        def read(name: str, stream: Any) -> None:
            out[name] = stream.read() if stream is not None else ""

        readers = [threading.Thread(target=read, args=(n, s), daemon=True)
                   for n, s in (("out", self.stdout), ("err", self.stderr))]
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return out["out"], out["err"]

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


#: The variable that hands a server's socket to a process the test starts (``sweeprun verify``
#: through ``tests/_verify_forked.py``), so that process's script starts fork from it too.
SERVER = "SWEEPRUN_TEST_ZYGOTE"


def server_for(script: Path) -> str | None:
    """The socket of this process's server for ``script`` (started now if need be), to hand
    to a child through :data:`SERVER`; ``None`` where scripts start fresh."""
    preload = preload_for(script)
    return None if FRESH or not preload else _server(preload)


def preload_for(script: Path) -> tuple[str, ...]:
    """What a script imports that is worth importing once: torch (and ``torch._dynamo``, which
    its first optimizer imports), Lightning, the Trainer. A script that never mentions torch
    gets nothing: it starts fresh (sweeprun behaves differently where torch is not loaded)."""
    text = script.read_text()
    if "torch" not in text:
        return ()
    found = ["torch", "torch._dynamo"]
    if "lightning" in text:
        found.append("lightning.pytorch")
    if "transformers" in text:
        found.append("transformers.trainer")
    return tuple(found)


def spawn(argv: list[str], env: dict[str, str], preload: tuple[str, ...],
          stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE, *,
          server: str | None = None, session: bool = False, cwd: str | None = None) -> Any:
    """``subprocess.Popen(argv, env=env, text=True, stdout=stdout, stderr=stderr)`` for
    ``argv = [sys.executable, script, ...]``, from the server that imported ``preload``
    (or the one listening on ``server``, started by another process: see :data:`SERVER`).
    ``stdout``: ``PIPE``, ``DEVNULL`` or an open file, as for Popen; ``stderr`` also
    ``STDOUT``. ``session``: the child leads a session of its own (``start_new_session``);
    ``cwd``: its working directory (this process's by default)."""
    if server is None and (FRESH or not preload):
        return subprocess.Popen(argv, env=env, text=True, stdout=stdout, stderr=stderr,
                                start_new_session=session, cwd=cwd)
    path = server or _server(preload)
    ours: list[int] = []        # the test's ends of the pipes
    theirs: list[int] = []      # what the child gets as its fds 1 and 2
    for where in (stdout, stderr):
        if where == subprocess.STDOUT:
            ours.append(-1)
            theirs.append(os.dup(theirs[0]))
        elif where == subprocess.PIPE:
            read, write = os.pipe()
            ours.append(read)
            theirs.append(write)
        else:
            ours.append(-1)
            theirs.append(os.open(os.devnull, os.O_WRONLY) if where == subprocess.DEVNULL
                          else os.dup(where.fileno()))
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        umask = os.umask(0o022)
        os.umask(umask)
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd or os.getcwd(), "umask": umask,
                              "session": session}).encode() + b"\n"
        socket.send_fds(conn, [request], theirs)
    finally:
        for fd in theirs:
            os.close(fd)
    streams = [open(fd, encoding="utf-8", errors="replace") if fd >= 0 else None for fd in ours]  # noqa: SIM115
    return ForkedProcess(argv, conn, *streams)


def _server(preload: tuple[str, ...]) -> str:
    """The socket of this process's server for ``preload``, started on first use."""
    with _lock:
        found = _servers.get(preload)
        if found is not None and found[0].poll() is None:
            return found[1]
        folder = tempfile.mkdtemp(prefix="sweeprun-zygote-")
        path = os.path.join(folder, "s")
        code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import _zygote; _zygote.serve()"
        proc = subprocess.Popen([sys.executable, "-c", code, path, *preload], env=_BASE_ENV,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fork server for {preload} did not start")
            time.sleep(0.02)
        _servers[preload] = (proc, path)
        return path


@atexit.register
def _stop_servers() -> None:
    for proc, path in _servers.values():
        proc.kill()
        proc.wait()
        Path(path).unlink(missing_ok=True)
        Path(path).parent.rmdir()


# -- the server's side ----------------------------------------------------------------------------

def serve() -> None:
    """``python -c ... PATH MODULE...``: import the modules, listen on PATH, fork per request.
    The server runs no torch operation before forking (no thread pools to inherit), and ends
    when the test process that started it is gone (a worker killed skips its atexit)."""
    import importlib

    path, modules = sys.argv[1], sys.argv[2:]
    parent = os.getppid()
    base_path = [p for p in sys.path if p not in ("", str(TESTS))]
    for module in modules:
        importlib.import_module(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)          # the test waits for the name: listening by then
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while os.getppid() == parent:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                request, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
                while not request.endswith(b"\n"):
                    request += conn.recv(1 << 20)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    conn.close()
                    _child(json.loads(request), fds, base_path)   # never returns
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"{pid}\n".encode())
                selector.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, conn))
            else:
                pid, conn = key.data
                selector.unregister(key.fileobj)
                os.close(key.fd)
                _, status, usage = os.wait4(pid, 0)
                cpu_s = usage.ru_utime + usage.ru_stime
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)} {cpu_s:.3f}\n".encode())
                except OSError:
                    pass                            # the test went away
                conn.close()


def _child(request: dict[str, Any], fds: list[int], base_path: list[str]) -> None:
    """Become ``python script args...``: raises SystemExit, which ends this interpreter as the
    script's own end would (the server's loop is not resumed: nothing catches it)."""
    import random
    import runpy

    if request.get("session"):
        os.setsid()
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None                    # read from TMPDIR again, as a fresh interpreter does
    script, *args = request["argv"][1:]
    sys.argv = [script, *args]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *base_path]
    random.seed()                              # a fresh interpreter's RNGs are fresh
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
        if request["env"].get("OMP_NUM_THREADS", "").isdigit():   # read at import by a fresh one
            sys.modules["torch"].set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as error:   # noqa: BLE001  (uncaught: what the interpreter does)
        tb = error.__traceback__               # from the script's frame on, as Python prints it
        while tb is not None and tb.tb_next is not None and (
                tb.tb_frame.f_code.co_filename == __file__ or "runpy" in tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next
        error.__traceback__ = tb               # what the hook prints, whatever tb it is given
        sys.excepthook(type(error), error, tb)   # the script's own hook too (sweeprun sets one)
        sys.stderr.flush()
        if isinstance(error, KeyboardInterrupt):   # as Python does: die of the signal
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        raise SystemExit(1) from None
    raise SystemExit(0)
