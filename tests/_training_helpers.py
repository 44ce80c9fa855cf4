"""Helpers for the training-side tests: run the example as a real process, interrupt it, compare.

Kills come from outside, as on a real machine: the test watches metrics.jsonl (one
line per finished step, flushed as it goes) and signals the process once it has
passed a chosen step.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sweeprun.runenv import PREEMPTED_EXIT
from sweeprun.training import load_checkpoint

from _zygote import SERVER, preload_for, server_for, spawn

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "train_mlp.py"
#: Example flags every test uses: saves land mid-epoch (16 steps per epoch), steps slow
#: enough that a kill lands mid-run. 4 epochs = 64 steps.
FLAGS = ("--lr", "0.01", "--weight-decay", "0.0001", "--seed", "3", "--epochs", "4",
         "--save-every-steps", "7", "--step-sleep-s", "0.01")
TOTAL_STEPS = 64


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)   # per open file: threads of one process wait too
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def made_once(shared_dir: Path, key: str, make: Callable[[Path], None]) -> Path:
    """The folder ``shared_dir/key``, made by ``make(folder)`` by the first caller of this
    session (any xdist worker, any thread) while the others wait, then only read. For results
    that are the same wherever they are made, such as an uninterrupted reference run: many
    test files compare against the same ones. A ``make`` that fails publishes nothing, so the
    next caller tries again and fails the same way, in its own test."""
    folder, made = shared_dir / key, shared_dir / f"{key}.made"
    with _locked(shared_dir / f"{key}.lock"):
        if not made.exists():   # made where it is read: a run may record its own folder
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            made.touch()
    return folder


@dataclass
class ScriptRun:
    """A training script run standalone (``--out``) as a real process, started as often as a
    test needs: run to its end, or signalled from outside once its progress says so.

    The one copy of start/complete/interrupt for every script the tests drive (the
    examples, the user-style scripts, the same with a bucket as ``--out``); a subclass
    names its script and flags and how it reads its progress (:meth:`last_step`).
    """

    out: Path
    flags: tuple[str, ...] = ()
    script: Path = EXAMPLE
    #: variables of the test runner's environment a run does not inherit unless ``env`` sets
    #: them (a name ending in ``*`` is a prefix): the run is standalone, whatever runs pytest
    unset_env: tuple[str, ...] = ("SWEEPRUN_RUN_DIR",)
    #: extra flags of :meth:`interrupt_at` / :meth:`interrupt_when` (slower steps for a signal to land)
    interrupt_flags: tuple[str, ...] = ()
    #: how often an interrupt polls the run's progress
    poll_s: float = 0.002
    #: guards a hung test only; nothing here asserts speed
    timeout_s: float = 120

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        given = env or {}
        full_env = {k: v for k, v in os.environ.items() if k in given or not any(
            k.startswith(u[:-1]) if u.endswith("*") else k == u for u in self.unset_env)}
        full_env.update(PYTHONPATH=str(REPO), **given)
        return spawn([sys.executable, str(self.script), *self.flags, "--out", str(self.out), *extra],
                     full_env, preload_for(self.script))

    def complete(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = self.start(*extra, env=env)
        out, err = proc.communicate(timeout=self.timeout_s)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines()]

    def last_step(self) -> int:
        """The last whole line's step (a line being written is not counted)."""
        if not self.metrics.exists():
            return 0
        lines = self.metrics.read_text().split("\n")[:-1]
        return json.loads(lines[-1])["step"] if lines else 0

    def _metrics_stamp(self) -> tuple[int, int] | None:
        """When the metrics file last changed (None: not there yet, or nothing to stat)."""
        try:
            status = os.stat(self.metrics)
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size

    def interrupt_when(self, ready: Callable[[], bool], signum: int, *extra: str) -> tuple[int, str]:
        """Start the run, signal it once ``ready()``; returns (exit code, stderr)."""
        proc = self.start(*self.interrupt_flags, *extra)
        deadline = time.monotonic() + self.timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                proc.send_signal(signum)
                break
            time.sleep(self.poll_s)
        _, err = proc.communicate(timeout=self.timeout_s)
        return proc.returncode, err

    def interrupt_at(self, step: int, signum: int, *extra: str) -> tuple[int, int, str]:
        """Start the run, signal it once it has logged ``step``; returns (exit code, step seen, stderr).
        The metrics file is read again only when its size or time changed: a poll every 2 ms
        that parsed it each time cost the test process 6 % of a core."""
        seen: list[int] = [0]
        stamp: list[tuple[int, int] | None] = [None]

        def reached() -> bool:
            now = self._metrics_stamp()
            if now is None or now != stamp[0]:   # None: not there yet, or not a local file
                stamp[0], seen[0] = now, self.last_step()
            return seen[0] >= step

        code, err = self.interrupt_when(reached, signum, *extra)
        return code, seen[0], err


@dataclass
class ExampleRun(ScriptRun):
    """One standalone run directory of examples/train_mlp.py (or another example with ``script``)."""

    flags: tuple[str, ...] = FLAGS

    def final_state(self) -> dict[str, Any]:
        return load_checkpoint(self.out)


def example_reference(shared_dir: Path) -> ExampleRun:
    """examples/train_mlp.py with :data:`FLAGS`, never interrupted: made once per session
    (:func:`made_once`) for every file that compares against it. Read only."""
    def train(out: Path) -> None:
        result = ExampleRun(out).complete()
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"done: step {TOTAL_STEPS}, final loss"), result.stdout

    return ExampleRun(made_once(shared_dir, "example-reference", train))


def assert_same_tree(a: Any, b: Any, where: str = "state") -> None:
    """Exact equality of nested state: tensors bit for bit (``torch.equal``), the rest with ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(run: ExampleRun, reference: ExampleRun) -> None:
    """What the product promises: the same weights and optimizer state bit for bit, the same
    loss and LR at every step, and exactly one metrics entry per step."""
    got, want = run.final_state(), reference.final_state()
    assert got["step"] == want["step"] == TOTAL_STEPS
    assert_same_tree(got["objects"]["model"], want["objects"]["model"], "model")
    assert_same_tree(got["objects"]["optimizer"], want["objects"]["optimizer"], "optimizer")
    entries = run.entries()
    assert [e["step"] for e in entries] == list(range(1, TOTAL_STEPS + 1))
    assert entries == reference.entries()


SIGKILL, SIGTERM = signal.SIGKILL, signal.SIGTERM


def interrupt_repeatedly(run: ExampleRun, signum: int, kills: int, seed: int, span: int = 20) -> list[int]:
    """Interrupt ``kills`` times at increasing random steps (each at most ``span`` past the last
    one logged), then let the run finish, which must resume; the steps hit."""
    rng = random.Random(seed)
    hit: list[int] = []
    for _ in range(kills):
        target = rng.randint(run.last_step() + 2, run.last_step() + span)
        code, seen, err = run.interrupt_at(target, signum)
        expected = PREEMPTED_EXIT if signum == SIGTERM else -SIGKILL
        assert code == expected, f"exit {code} after step {seen}, expected {expected}:\n{err}"
        hit.append(seen)
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "sweeprun: resumed from" in result.stderr
    return hit


def stop_the_launcher_mid_run_then_relaunch(sandbox: Any, sweep: Path, past_step: int) -> ExampleRun:
    """Under ``sweeprun launch``: SIGTERM to the launcher once its one run has logged
    ``past_step``; the run saves and exits 75 (interrupted, no attempt used); then the same
    command again, which must finish it in a second attempt. The run, for comparing."""
    from conftest import wait_for

    launcher = sandbox.sweeprun("launch", str(sweep), "--grace-s", "60")
    run = ExampleRun(sandbox.store / "t" / "runs" / "unknown")

    def mid_run() -> bool:
        found = list((sandbox.store / "t" / "runs").glob("*/metrics.jsonl"))
        if found:
            run.out = found[0].parent
        return bool(found) and run.last_step() >= past_step

    wait_for(mid_run, timeout=120, what=f"the run past step {past_step}")
    launcher.send_signal(SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, err
    (row,) = sandbox.status(sweep).values()
    assert (row["state"], row["failures"]) == ("interrupted", 0)
    log = (run.out / "logs" / "attempt-1.log").read_text()
    assert "SIGTERM received" in log, log[-2000:]

    result = sandbox.run("launch", str(sweep), timeout=300)
    assert result.returncode == 0, result.stderr
    (row,) = sandbox.status(sweep).values()
    assert (row["state"], row["attempts"]) == ("done", 2)
    assert (run.out / "DONE").exists()
    return run


def sweeprun_verify(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``python -m sweeprun verify ARGS`` from the repository root, its temporary folders under
    ``tmp``. For a ``sys.executable script.py`` command, verify and the script's starts fork
    from this test process's server (``tests/_verify_forked.py``: the same command, without
    importing torch again at every start); with ``--nproc``, torchrun starts the ranks fresh."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    env.pop("SWEEPRUN_RUN_DIR", None)
    split = args.index("--") if "--" in args else len(args)
    options, after = args[:split], args[split + 1:]
    script = next((REPO / a for a in after if a.endswith(".py")), None)   # relative: to REPO, verify's cwd
    ranked = bool({"--nproc", "--resume-nproc"} & set(options))
    server = None if script is None or ranked else server_for(script)
    if server is None:
        return subprocess.run([sys.executable, "-m", "sweeprun", "verify", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
    env[SERVER] = server
    command = [sys.executable, str(REPO / "tests" / "_verify_forked.py"), "verify", *args]
    proc = spawn(command, env, (), server=server, cwd=str(REPO))   # verify itself forks too
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()                            # as subprocess.run does (its scripts lead sessions of their own)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
