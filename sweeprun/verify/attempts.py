"""Running the script as a lost machine would: started in a run directory, signalled at a
step seen in metrics.jsonl, started again until it finishes."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import settings
from ..errors import SpecError
from ..procs import spawn
from ..ranks import Processes, agent_argv
from ..runenv import ATTEMPT, MTBI, PARAMS, RUN_DIR, RUN_ID, SWEEP, TIME_LIMIT
from ..store import layout

#: How often metrics.jsonl is looked at: a step of a small model takes a few ms.
POLL_S = 0.005
#: Seconds a script gets to save and exit after SIGTERM before it is killed (as the launcher's grace).
GRACE_S = 60.0
#: What a resume prints: the training API says "resumed from", the Trainer integration
#: "resuming from" (before the Trainer has loaded anything), a start after a loss-spike
#: rollback "rolled back: ...; going on from step N"; a path may hold spaces.
_RESUMED = re.compile(rb"sweeprun: (?:resum(?:ed|ing) from [^\n]*? \(step (\d+)"
                      rb"|rolled back: [^\n]*?; going on from step (\d+))")
_SIGNALS = (signal.SIGTERM, signal.SIGKILL)


@dataclass(frozen=True)
class Kill:
    step: int
    signum: int

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def plan_kills(steps: Sequence[int], kills: int, seed: int) -> list[Kill]:
    """``kills`` logged steps to interrupt at, one drawn in each of ``kills`` equal stretches
    of the run (so later kills still have training left to hit), SIGTERM first: its save
    makes sure the SIGKILL after it resumes from a checkpoint even in a script that saves
    only every few minutes."""
    candidates = sorted(set(steps))[:-1]  # never after the last step: a kill must land mid-training
    if len(candidates) < kills:
        raise SpecError(f"the uninterrupted run logged {len(candidates) + 1 if steps else 0} step(s) "
                        f"to metrics.jsonl; {kills} interruption(s) need at least {kills + 1}: give "
                        "the script more steps, or fewer --kills")
    rng = random.Random(seed)
    bounds = [len(candidates) * i // kills for i in range(kills + 1)]
    return [Kill(candidates[rng.randrange(bounds[i], bounds[i + 1])], _SIGNALS[i % 2])
            for i in range(kills)]


@dataclass
class Attempt:
    number: int
    exit_code: int
    log: Path
    sent: str | None = None            # the signal verify sent, if any
    after_step: int | None = None      # the last logged step when it was sent
    resumed_from: int | None = None    # the step the script said it resumed from
    during_save: bool = False          # a SIGKILL left a checkpoint half written
    note: str = ""
    wall_s: float = 0.0                # from its start to its end
    timed_out: float | None = None     # the bound it ran past, when it did (it was killed)

    def describe(self) -> str:
        start = f"resumed from step {self.resumed_from}" if self.resumed_from is not None else "from step 0"
        if self.sent:
            end = f"{self.sent} after step {self.after_step}"
            end += " (inside a save)" if self.during_save else ""
            end += f", exit {self.exit_code}"
        else:
            end = f"exit {self.exit_code}"
        return f"attempt {self.number}: {start}; {end}{self.note}"

    def last_line(self) -> str:
        try:
            lines = self.log.read_bytes()[-4000:].decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""


class ScriptRun:
    """One run directory of the user's script, started as often as needed, as the launcher would:
    ``SWEEPRUN_RUN_DIR`` and ``SWEEPRUN_ATTEMPT`` set, in a session of its own, so a signal
    reaches a wrapper's children too (``bash train.sh``, ``uv run``)."""

    def __init__(self, command: Sequence[str], root: Path, nproc: int | None = None,
                 resume_nproc: int | None = None) -> None:
        """With ``nproc``, that many ranks through torchrun, as ``nproc:`` in a sweep file starts
        them (one rank too); every attempt after the first with ``resume_nproc`` of them."""
        self.ranked = nproc is not None or resume_nproc is not None
        self.nproc = nproc or 1
        self.resume_nproc = resume_nproc or self.nproc
        self._processes = Processes(self.nproc, "", "", ranked=self.ranked)  # the current attempt's
        self.dir = root / "run"
        self.logs = root / layout.LOGS
        self.metrics = self.dir / layout.METRICS
        self.argv = [arg.replace("{run_dir}", str(self.dir)) for arg in command]
        self.attempts: list[Attempt] = []
        self._tail = (-1, 0)  # (size of metrics.jsonl, its last step) when last read
        self.dir.mkdir(parents=True)
        self.logs.mkdir()

    def _env(self, attempt: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (RUN_ID, PARAMS, SWEEP, TIME_LIMIT, MTBI)}
        ranks = {settings.NPROC.name: str(self.nproc_of(attempt))} if self.ranked else {}
        return {**env, RUN_DIR: str(self.dir), ATTEMPT: str(attempt), **ranks}

    def nproc_of(self, attempt: int) -> int:
        return self.nproc if attempt == 1 else self.resume_nproc

    def complete(self, timeout_s: float | None = None) -> Attempt:
        return self.interrupt_at(None, timeout_s)

    def interrupt_at(self, kill: Kill | None, timeout_s: float | None = None) -> Attempt:
        """Start the script; with ``kill``, signal it once it has logged ``kill.step`` (or, after a
        resume that replays, once it is past anything logged before); wait for its end. An
        attempt still running ``timeout_s`` after its start is killed with its process group
        (``timed_out``)."""
        number = len(self.attempts) + 1
        attempt = Attempt(number, 0, self.logs / layout.log_name(number))
        target = None if kill is None else max(kill.step, self.last_step() + 1)
        nproc = self.nproc_of(number)
        argv = agent_argv(self.argv, nproc, GRACE_S) if self.ranked else self.argv
        self._processes = Processes(nproc, str(self.dir), "", ranked=self.ranked)
        with open(attempt.log, "wb") as out:
            try:
                proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             env=self._env(number), start_new_session=True)
            except OSError as exc:
                raise SpecError(f"cannot start {self.argv[0]!r}: {exc.strerror or exc}; give the "
                                "command after --, e.g. sweeprun verify -- python train.py") from None
        started = time.monotonic()
        try:
            self._watch(proc, attempt, kill, target, timeout_s)
        finally:
            attempt.wall_s = time.monotonic() - started
            if proc.returncode is None:  # verify itself is going down: take the script with it
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        found = _RESUMED.findall(attempt.log.read_bytes())
        attempt.resumed_from = int(b"".join(found[-1])) if found else None
        attempt.during_save = attempt.sent == "SIGKILL" and self._save_was_cut()
        self.attempts.append(attempt)
        return attempt

    def _watch(self, proc: subprocess.Popen[Any], attempt: Attempt, kill: Kill | None,
               target: int | None, timeout_s: float | None = None) -> None:
        """Signal at ``target``, wait for the leader, then for anything it left running (a
        wrapper that died of SIGTERM while the script inside still saves): the next attempt
        must not start while the last one still writes. The leader stays unreaped until then,
        so the group's number cannot pass to another process."""
        deadline = math.inf
        bound = math.inf if timeout_s is None else time.monotonic() + timeout_s
        while not _exited(proc.pid):
            if kill is not None and target is not None and attempt.sent is None:
                seen = self.last_step()
                if seen >= target:
                    self._signal(proc, kill.signum)
                    attempt.sent, attempt.after_step = kill.name, seen
                    deadline = time.monotonic() + GRACE_S
            if time.monotonic() > deadline:
                self._signal(proc, signal.SIGKILL)
                attempt.note += f"; it did not exit within {GRACE_S:g} s of {attempt.sent} and was killed"
                deadline = math.inf
            if time.monotonic() > bound:
                self._signal(proc, signal.SIGKILL)
                attempt.timed_out, bound = timeout_s, math.inf
            time.sleep(POLL_S if attempt.sent is None and target is not None else 0.05)
        deadline = time.monotonic() + GRACE_S
        while _members(proc.pid):
            if time.monotonic() > deadline:
                _signal_group(proc, signal.SIGKILL)
                attempt.note += f"; processes it started were still running {GRACE_S:g} s later and were killed"
                deadline = math.inf
            time.sleep(0.02)
        attempt.exit_code = proc.wait()

    def _signal(self, proc: subprocess.Popen[Any], signum: int) -> None:
        """The script's whole session; with ranks, as the launcher signals them (SIGTERM to each
        rank, which saves together with its peers; SIGKILL to torchrun and every rank)."""
        if self._processes.ranked and proc.returncode is None:
            self._processes.signal(proc, signum)
        else:
            _signal_group(proc, signum)

    def last_step(self) -> int:
        """The step of the last whole line of metrics.jsonl (0 before any), reading only its end."""
        try:
            with open(self.metrics, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == self._tail[0]:
                    return self._tail[1]
                f.seek(max(0, size - 65536))
                lines = f.read().split(b"\n")[:-1]  # after the last newline: a line being written
        except FileNotFoundError:
            return 0
        step = 0
        for line in reversed(lines):
            try:
                step = int(json.loads(line)["step"])
                break
            except (ValueError, KeyError, TypeError):
                continue
        self._tail = (size, step)
        return step

    def _save_was_cut(self) -> bool:
        """A temporary file, a data file without its manifest, or a Trainer folder without its
        seal: the kill hit a save."""
        from ..training.sealed import SEAL, checkpoint_folders

        if any(not os.path.exists(os.path.join(path, SEAL))
               for _, path in checkpoint_folders(str(self.dir / layout.TRAINER))):
            return True
        try:
            names = set(os.listdir(self.dir / layout.CHECKPOINTS))
        except OSError:
            return False
        return any(n.startswith(layout.TEMP_PREFIX)
                   or ((c := layout.CheckpointName.parse(n)) is not None and n == c.data and c.manifest not in names)
                   for n in names)


def _exited(pid: int) -> bool:
    """Whether the leader has exited, without reaping it (``WNOWAIT``)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
    except ChildProcessError:
        return True


def _members(pgid: int) -> list[int]:
    """The live processes of a group (Linux; none known elsewhere)."""
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []
    found = []
    for name in names:
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            found.append(int(name))
    return found


def _signal_group(proc: subprocess.Popen[Any], signum: int) -> None:
    """Signal the script's whole session. Only while the leader is not reaped: until then its
    pid, and so the group's number, cannot belong to anyone else."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass


