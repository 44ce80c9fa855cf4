"""Shared fixtures: an isolated sweep folder, a sweep-file writer and a launcher started as a real process."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings

import _zygote
from servers import mlflow_server, postgres_server, postgres_url, s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)

# A suite started in the background (`nohup ... &`, a CI step's job control) inherits SIGINT
# ignored, and so would every process the tests start, so Ctrl-C tests could never reach
# them: a handled signal is reset to its default in a child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Shared 2-core machines: a property test must fail on a wrong answer, never on a slow one.
settings.register_profile("sweeprun", deadline=None, derandomize=True)
settings.load_profile("sweeprun")


def pytest_configure(config: pytest.Config) -> None:
    """Hand the test files to pytest-xdist's workers in the order :func:`pytest_collection_modifyitems`
    gives them (heaviest first) rather than by number of tests: a few-test file that trains
    Lightning or Trainer runs, started last, would otherwise be the whole suite's tail.
    Byte-compile sweeprun's sources first (:func:`_compile_sources`)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if not hasattr(config, "workerinput"):     # once, in the process that starts the workers
        _compile_sources()


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    """Keep pytest's rewritten test modules between runs while they are collected: with
    ``PYTHONDONTWRITEBYTECODE`` set, each xdist worker rewrites the asserts of every test
    module again at each run (a worker's collection: 15 CPU-s, 12 with them kept). Only while
    collecting: a test that imports a module of its own from a temporary folder leaves no
    ``__pycache__`` there."""
    was = sys.dont_write_bytecode
    sys.dont_write_bytecode = False
    try:
        yield
    finally:
        sys.dont_write_bytecode = was


def _compile_sources() -> None:
    """Write the ``.pyc`` of every module of sweeprun and of the tests' helpers, once.

    Where ``PYTHONDONTWRITEBYTECODE`` is set (these machines set it), no process writes the
    ``.pyc`` of a module it compiles, and an editable install ships none: each of the
    thousands of processes the suite starts (launchers, ``status``, scripts, ranks) would
    compile every sweeprun module it imports again, a tenth of a second of CPU each
    (``sweeprun status``: 0.47 CPU-s against 0.36 with them). ``compileall`` writes them
    regardless; a module changed since is compiled again, as Python itself would."""
    import compileall
    import re

    compileall.compile_dir(str(REPO / "sweeprun"), quiet=2)
    # the helpers the tests' scripts import; a test module's own .pyc is pytest's (rewritten)
    compileall.compile_dir(str(REPO / "tests"), quiet=2, rx=re.compile(r"[/\\]test_[^/\\]*\.py$"))


#: Seconds each test file holds its worker (wall time, so a file that mostly waits on a
#: SLURM cluster counts as long as one that trains), fast and slow tests apart, as last
#: measured in a full run on a 2-core machine (``python tools/test_weights.py CPU_LOG`` writes
#: it from a run with ``SWEEPRUN_TEST_CPU_LOG``). Only the order of the files depends on it.
WEIGHTS = Path(__file__).with_name("cpu_weights.json")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that hold their worker longest first, each file's tests in their own order: with
    ``--dist loadscope`` a file runs in one worker, so the longest ones must start first
    (longest-processing-time-first scheduling). A file not measured yet counts as long (it
    is new, and may train), a test of a measured file as its kind's mean there."""
    known = json.loads(WEIGHTS.read_text()) if WEIGHTS.exists() else {}
    cost: dict[str, float] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        kind = "slow" if item.get_closest_marker("slow") is not None else "fast"
        seconds, tests = known.get(module, {}).get(kind, (60.0, 1))
        cost[module] = cost.get(module, 0.0) + seconds / max(tests, 1)
    items.sort(key=lambda item: -cost[item.nodeid.split("::")[0]])  # stable: a file keeps its order


def _cpu_s() -> tuple[float, float]:
    """CPU seconds of this process, and of the processes it waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    forked = _zygote.ended_children_cpu_s()   # scripts started by the fork server
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime + forked


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """With ``SWEEPRUN_TEST_CPU_LOG=FILE``: one JSON line per test with the CPU seconds it cost
    (this process and the processes it waited for; ``own_cpu_s`` the test process's part, as
    polling), to find what makes the suite slow on a shared machine, where wall time says
    little; and its wall seconds beside, to find the tests that mostly wait. Records only;
    nothing depends on it."""
    log = os.environ.get("SWEEPRUN_TEST_CPU_LOG")
    before, started = (_cpu_s(), time.monotonic()) if log else ((0.0, 0.0), 0.0)
    yield
    if log:
        own, children = (now - then for now, then in zip(_cpu_s(), before, strict=True))
        line = {"test": item.nodeid, "cpu_s": round(own + children, 2), "own_cpu_s": round(own, 2),
                "wall_s": round(time.monotonic() - started, 2),
                "slow": item.get_closest_marker("slow") is not None}
        with open(log, "a") as f:
            f.write(json.dumps(line) + "\n")


REPO = Path(__file__).resolve().parents[1]
STEPS_SCRIPT = REPO / "tests" / "scripts" / "steps.py"


@dataclass
class Sandbox:
    """One test's world: where the store, the ledger, the side log and the locks live."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def side_log(self) -> Path:
        return self.root / "side.log"

    @property
    def ledger(self) -> Path:
        return self.root / "state" / "ledger.sqlite"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SIDE_LOG=str(self.side_log), LOCK_DIR=str(self.root / "locks"),
                   SWEEPRUN_HOME=str(self.root / "state"), PYTHONPATH=str(REPO), **extra)
        return env

    def write_sweep(self, grid: dict[str, list[Any]], params: dict[str, Any] | None = None,
                    name: str = "t", command: str | None = None, **extra: Any) -> Path:
        spec = {"name": name,
                "command": command or f"python {STEPS_SCRIPT} --x 1",
                "store": str(self.store), "grid": grid, "params": params or {}, **extra}
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def sweeprun(self, *args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
        """Start ``sweeprun ARGS`` as its own process group, like a terminal would; ``env`` adds variables."""
        return subprocess.Popen([sys.executable, "-m", "sweeprun", *args, "--ledger", str(self.ledger)]
                                if args and args[0] in ("launch", "worker", "status") else
                                [sys.executable, "-m", "sweeprun", *args],
                                env=self.env(**(env or {})), cwd=self.root, text=True, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)

    def run(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        proc = self.sweeprun(*args, env=env)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def events(self) -> list[dict[str, Any]]:
        if not self.side_log.exists():
            return []
        return [json.loads(line) for line in self.side_log.read_text().splitlines() if line.strip()]

    def status(self, sweep: Path) -> dict[str, dict[str, Any]]:
        result = self.run("status", str(sweep), "--json")
        assert result.returncode == 0, result.stderr
        return {row["run_id"]: row for row in json.loads(result.stdout)}


@pytest.fixture(scope="session")
def shared_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this session sees (the session's base temporary folder;
    a worker's own is one level below it): deterministic results, such as an uninterrupted
    reference run, are made there once per session instead of once per worker or file.
    Use it through :func:`_training_helpers.made_once`, which locks and publishes atomically."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if hasattr(request.config, "workerinput") else base) / "shared"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    (tmp_path / "locks").mkdir()
    return Sandbox(tmp_path)


def wait_for(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition",
             poll_s: float = 0.05) -> None:
    """Poll until ``predicate()``; the timeout only guards against a hung test, it asserts nothing about speed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)
