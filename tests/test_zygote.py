"""The fork server the tests start their training scripts from (tests/_zygote.py) behaves, for
what the tests look at, as ``subprocess.Popen([python, script, ...])`` does: argv, environment,
working directory, exit codes (negative for a signal), both pipes, an uncaught exception's
traceback and the script's own ``sys.excepthook``, fresh RNG seeds."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import pytest

from _zygote import FRESH, ForkedProcess, spawn

pytestmark = pytest.mark.skipif(FRESH, reason="every script starts fresh here (SWEEPRUN_TEST_FRESH=1, or no pidfds)")
PRELOAD = ("torch",)
SCRIPT = textwrap.dedent("""
    import os, random, sys, time
    import torch
    print(sys.argv[1:], os.getcwd(), os.environ.get("ZYGOTE_TEST"), __name__, sys.path[0], flush=True)
    print(random.random(), torch.rand(1).item(), file=sys.stderr)
    if sys.argv[1] == "sleep":
        time.sleep(60)
    if sys.argv[1] == "raise":
        raise ValueError("from the script")
    if sys.argv[1] == "hook":
        sys.excepthook = lambda *exc: (print("my hook", file=sys.stderr), os._exit(2))
        raise ValueError("hooked")
    sys.exit(int(sys.argv[1]))
""")


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    monkeypatch.chdir(tmp_path)
    return path


def start(script: Path, arg: str) -> ForkedProcess:
    proc = spawn([sys.executable, str(script), arg], {"ZYGOTE_TEST": "yes", "PATH": "/usr/bin"}, PRELOAD)
    assert isinstance(proc, ForkedProcess)
    return proc


def test_a_script_sees_its_argv_environment_and_folder_and_its_exit_code_comes_back(script: Path) -> None:
    out, err = (proc := start(script, "3")).communicate(timeout=60)
    assert proc.returncode == 3
    assert out == f"['3'] {script.parent} yes __main__ {script.parent}\n"
    other = start(script, "0")
    assert other.communicate(timeout=60)[1] != err, "each child draws fresh random numbers"
    assert other.returncode == 0


def test_a_signal_ends_it_as_it_ends_a_process(script: Path) -> None:
    proc = start(script, "sleep")
    assert proc.stdout is not None and proc.stdout.readline().startswith("['sleep']")
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_an_uncaught_exception_prints_from_the_script_and_honours_its_hook(script: Path) -> None:
    proc = start(script, "raise")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert 'File "' + str(script) in err and "ValueError: from the script" in err
    assert "_zygote" not in err and "runpy" not in err
    hooked = start(script, "hook")
    _, err = hooked.communicate(timeout=60)
    assert (hooked.returncode, err.splitlines()[-1]) == (2, "my hook")
