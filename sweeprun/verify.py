"""``sweeprun verify``: kill the script, resume it, and check that it really continued.

Every promise of exact resumption rests on the script tracking all of its state; one
forgotten piece (a scheduler, a generator, the position in the epoch) resumes without
an error and quietly trains something else. Reading the script cannot find that; running
it can. So the script runs standalone twice, each time in a fresh run directory given as
``SWEEPRUN_RUN_DIR``: once uninterrupted, and once interrupted from outside as a lost
machine would interrupt it (SIGTERM at one step, SIGKILL at another, seeded) and re-run
until it finishes. The two endings are then compared: every tensor of the final
checkpoint, every metrics line. Where they differ, the first differing step, measured
from the resume before it, says which piece was missing: a learning rate that differs at
the first resumed step is the scheduler; a loss that differs there with the same
learning rate is the data position or the RNG; a loss that differs only one step later is
the optimizer, whose update of that first step was computed from a fresh state.

Steps are observed the way ``sweeprun status`` sees them, from metrics.jsonl growing,
so kills land wherever the script happens to be, sometimes inside a save. torch is
imported only to compare, after both runs ended.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError, SweeprunError
from .procs import spawn
from .redact import redact
from .runenv import ATTEMPT, MTBI, PARAMS, PREEMPTED_EXIT, RUN_DIR, RUN_ID, SWEEP, TIME_LIMIT

#: How often metrics.jsonl is looked at: a step of a small model takes a few ms.
POLL_S = 0.005
#: Seconds a script gets to save and exit after SIGTERM before it is killed (as the launcher's grace).
GRACE_S = 60.0
#: Re-runs after the planned kills; a script that keeps exiting 75 on its own (a time
#: limit shorter than the run) would otherwise loop for ever.
MAX_RERUNS = 20
#: Metrics that measure the clock, not the training: never equal between two runs.
TIMING = re.compile(r"time|elapsed|duration|runtime|throughput|per_s(ec(ond)?)?\b|_s$|_ms$|_sec$",
                    re.IGNORECASE)
_LR = re.compile(r"(^|[^a-z])(lr|learning_rate)([^a-z]|$)", re.IGNORECASE)
_RESUMED = re.compile(rb"sweeprun: resumed from \S+ \(step (\d+)")
_SIGNALS = (signal.SIGTERM, signal.SIGKILL)


class ScriptFailed(SweeprunError):
    """The uninterrupted run did not end well: there is nothing to compare against."""


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


# -- running the script ----------------------------------------------------------------------

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

    def __init__(self, command: Sequence[str], root: Path) -> None:
        self.dir = root / "run"
        self.logs = root / "logs"
        self.metrics = self.dir / "metrics.jsonl"
        self.argv = [arg.replace("{run_dir}", str(self.dir)) for arg in command]
        self.attempts: list[Attempt] = []
        self._tail = (-1, 0)  # (size of metrics.jsonl, its last step) when last read
        self.dir.mkdir(parents=True)
        self.logs.mkdir()

    def _env(self, attempt: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (RUN_ID, PARAMS, SWEEP, TIME_LIMIT, MTBI)}
        return {**env, RUN_DIR: str(self.dir), ATTEMPT: str(attempt)}

    def complete(self) -> Attempt:
        return self.interrupt_at(None)

    def interrupt_at(self, kill: Kill | None) -> Attempt:
        """Start the script; with ``kill``, signal it once it has logged ``kill.step`` (or, after a
        resume that replays, once it is past anything logged before); wait for its end."""
        number = len(self.attempts) + 1
        attempt = Attempt(number, 0, self.logs / f"attempt-{number}.log")
        target = None if kill is None else max(kill.step, self.last_step() + 1)
        with open(attempt.log, "wb") as out:
            try:
                proc = spawn(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             env=self._env(number), start_new_session=True)
            except OSError as exc:
                raise SpecError(f"cannot start {self.argv[0]!r}: {exc.strerror or exc}; give the "
                                "command after --, e.g. sweeprun verify -- python train.py") from None
        try:
            while target is not None and proc.poll() is None:
                seen = self.last_step()
                if seen >= target:
                    assert kill is not None
                    _signal_group(proc, kill.signum)
                    attempt.sent, attempt.after_step = kill.name, seen
                    break
                time.sleep(POLL_S)
            if attempt.sent == "SIGTERM":
                try:
                    proc.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    attempt.note = f"; it did not exit within {GRACE_S:g} s of SIGTERM and was killed"
            attempt.exit_code = proc.wait()
        finally:
            if proc.returncode is None:  # verify itself is going down: take the script with it
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        found = _RESUMED.findall(attempt.log.read_bytes())
        attempt.resumed_from = int(found[-1]) if found else None
        attempt.during_save = attempt.sent == "SIGKILL" and self._save_was_cut()
        self.attempts.append(attempt)
        return attempt

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
        """A temporary file, or a data file without its manifest: the kill hit a save."""
        try:
            names = set(os.listdir(self.dir / "checkpoints"))
        except OSError:
            return False
        return any(n.startswith(".tmp-") or (n.endswith(".pt") and n[:-3] + ".json" not in names)
                   for n in names)


def _signal_group(proc: subprocess.Popen[Any], signum: int) -> None:
    """Signal the script's whole session. Only while the leader is not reaped: until then its
    pid, and so the group's number, cannot belong to anyone else."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass


# -- comparing -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    path: tuple[Any, ...]
    detail: str
    max_abs: float | None = None


def diff_trees(a: Any, b: Any, atol: float = 0.0, path: tuple[Any, ...] = ()) -> Iterator[Difference]:
    """Where two saved states differ: tensors and arrays element by element (exactly, or within
    ``atol`` for floating point), numbers within ``atol``, everything else with ``==``."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            yield Difference(path, f"{type(a).__name__} vs {type(b).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            yield Difference(path, f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif a.is_floating_point() or a.is_complex():
            if not torch.allclose(a, b, rtol=0.0, atol=atol, equal_nan=True):
                gap = (a.double() - b.double()).abs().nan_to_num(nan=math.inf).max().item() if a.numel() else 0.0
                yield Difference(path, f"differs by up to {gap:.3g}", gap)
        elif not torch.equal(a, b):
            yield Difference(path, "differs")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or not np.array_equal(a, b):
            yield Difference(path, "differs")
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in a.keys() - b.keys():
            yield Difference((*path, key), "only in the uninterrupted run")
        for key in b.keys() - a.keys():
            yield Difference((*path, key), "only in the resumed run")
        for key in a:
            if key in b:
                yield from diff_trees(a[key], b[key], atol, (*path, key))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from diff_trees(x, y, atol, (*path, i))
    elif not _same_value(a, b, atol):
        gap = abs(a - b) if isinstance(a, float) and isinstance(b, float) else None
        yield Difference(path, f"{a!r} vs {b!r}", gap)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same_value(a: Any, b: Any, atol: float) -> bool:
    if _number(a) and _number(b):
        return a == b or abs(a - b) <= atol or (a != a and b != b)  # NaN logged by both
    return bool(a == b)


def count_tensors(tree: Any) -> int:
    import torch

    if isinstance(tree, torch.Tensor):
        return 1
    if isinstance(tree, Mapping):
        return sum(count_tensors(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(count_tensors(v) for v in tree)
    return 0


def kind_of(state: Any) -> str | None:
    """What a tracked object is, from the shape of its state: enough to say what is missing."""
    if isinstance(state, Mapping):
        keys = {k for k in state if isinstance(k, str)}
        if {"state", "param_groups"} <= keys:
            return "optimizer"
        if "last_epoch" in keys or "_last_lr" in keys:
            return "LR scheduler"
        if {"scale", "growth_factor"} <= keys:
            return "grad scaler"
        if {"epoch", "offset"} <= keys or any("yielded" in k or "sampler" in k for k in keys):
            return "data position"
        if "bit_generator" in keys:
            return "generator"
    if type(state).__name__ == "Tensor" and str(getattr(state, "dtype", "")) == "torch.uint8":
        return "generator"
    return None


@dataclass
class MetricsDiff:
    lines: tuple[int, int]                    # (uninterrupted, resumed)
    index: int | None = None                  # first differing line
    step: int | None = None                   # its step
    keys: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def same(self) -> bool:
        return self.index is None


def diff_metrics(a: list[dict[str, Any]], b: list[dict[str, Any]], atol: float = 0.0,
                 ignore: Collection[str] = ()) -> MetricsDiff:
    """The first line where the two runs' metrics differ, and in which keys; metrics in
    ``ignore`` and those named like a clock (:data:`TIMING`) are not compared."""
    result = MetricsDiff((len(a), len(b)))
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        keys = sorted(k for k in x.keys() | y.keys()
                      if k != "step" and k not in ignore and not TIMING.search(k)
                      and (k not in x or k not in y or not _same_value(x[k], y[k], atol)))
        if keys or x.get("step") != y.get("step"):
            keys = keys or ["step"]
            shown = [f"{k} {x.get(k, '-')!r} vs {y.get(k, '-')!r}" for k in keys[:3]]
            result.index, result.step, result.keys = i, x.get("step"), keys
            result.detail = "; ".join(shown) + (f"; +{len(keys) - 3} more" if len(keys) > 3 else "")
            return result
    if len(a) != len(b):
        i = min(len(a), len(b))
        result.index, result.step = i, (a if len(a) > len(b) else b)[i].get("step")
        result.detail = f"{len(a)} lines vs {len(b)}"
    return result


def _leaf(path: tuple[Any, ...]) -> str:
    names = [str(p) for p in path if not isinstance(p, int)]
    if names[:1] == ["state"]:  # an optimizer's per-parameter state: exp_avg, momentum_buffer...
        names = names[1:]
    return ".".join(names) or "(value)"


def summarize(differences: list[Difference]) -> str:
    """``exp_avg, exp_avg_sq, step differ (largest difference 0.021)``."""
    leaves = list(dict.fromkeys(_leaf(d.path) for d in differences))
    gaps = [d.max_abs for d in differences if d.max_abs is not None]
    shown = ", ".join(leaves[:5]) + (f", +{len(leaves) - 5} more" if len(leaves) > 5 else "")
    text = f"{shown} differ{'s' if len(leaves) == 1 else ''}"
    if len(differences) == 1 and not gaps:
        text += f" ({differences[0].detail})"
    return text + (f" (largest difference {max(gaps):.3g})" if gaps else "")


def _group(path: tuple[Any, ...]) -> str:
    """The piece of state a difference belongs to, as the user named it in ``run.track``."""
    if path[:1] == ("objects",) and len(path) > 1:
        return str(path[1])
    return {"rng": "global RNGs", "extras": "run.extras"}.get(str(path[0]), str(path[0])) if path else "state"


def compare_states(a: Mapping[str, Any], b: Mapping[str, Any], atol: float = 0.0) -> dict[str, list[Difference]]:
    """The differences between two final checkpoints, by piece of state (``model``,
    ``optimizer``, ``global RNGs``...); bookkeeping (format, metrics file length) is left out."""
    keep = ("objects", "step", "epoch", "extras", "rng")
    found: dict[str, list[Difference]] = {}
    for d in diff_trees({k: a.get(k) for k in keep}, {k: b.get(k) for k in keep}, atol):
        inner = d.path[2:] if d.path[:1] == ("objects",) else d.path[1:]
        found.setdefault(_group(d.path), []).append(Difference(inner or d.path, d.detail, d.max_abs))
    return found


def diagnose(metrics: MetricsDiff, resumes: Sequence[int], resumed_steps: Sequence[int],
             state: Mapping[str, Any] | None) -> list[str]:
    """The pieces of state that were most likely not restored, from where the metrics diverge
    relative to the resume before it, and from what the checkpoint holds."""
    if metrics.same:
        return []
    kinds = {kind_of(v): name for name, v in (state or {}).get("objects", {}).items()}
    rng_captured = bool(state) and state.get("rng") is not None  # type: ignore[union-attr]
    step = metrics.step if metrics.step is not None else math.inf
    c = max((r for r in resumes if r < step), default=None)
    if c is None:
        return [f"the runs differ from step {metrics.step}, before any resume: the script is not "
                "deterministic even uninterrupted (an unseeded RNG, nondeterministic GPU kernels: "
                "seed it, or allow a tolerance with --atol)"]
    after = sorted({s for s in resumed_steps if s > c})
    first = after[0] if after else None
    second = after[1] if len(after) > 1 else None
    since = f"resuming from step {c}"
    causes = []
    a_lines, b_lines = metrics.lines
    if a_lines != b_lines:
        how = "trained part of an epoch twice" if b_lines > a_lines else "skipped part of an epoch"
        causes.append(f"the data position was not restored: the resumed run logged {b_lines} metric "
                      f"lines where the uninterrupted one logged {a_lines}, so it {how}"
                      + _hint(kinds, "data position", "run.track(data=sampler) (a ResumableSampler "
                              "or a StatefulDataLoader)", "is the epoch loop started from run.epoch?"))
    if step == first and any(_LR.search(k) for k in metrics.keys):
        causes.append(f"the LR scheduler was not restored: the learning rate differs from the first "
                      f"step after {since}" + _hint(kinds, "LR scheduler", "run.track(scheduler=scheduler)",
                                                      "is the learning rate also set outside it?"))
    elif step == first and a_lines == b_lines:
        if not rng_captured:
            causes.append(f"the RNG state was not restored: the loss differs from the first step after "
                          f"{since} while the learning rate matches; dropout and augmentation draw from "
                          "the global RNGs, which init(rng=False) leaves out of checkpoints")
        elif "data position" not in kinds:
            causes.append(f"the data position was not restored: the first step after {since} already "
                          "differs, with the same learning rate"
                          + _hint(kinds, "data position", "run.track(data=sampler)", ""))
        else:
            causes.append(f"random numbers or data differ from the first step after {since}: is a "
                          "generator of the script's own (torch.Generator, numpy Generator, "
                          "random.Random) or a second data loader left untracked?")
    elif step == second and first == c + 1 and a_lines == b_lines:
        causes.append(f"the optimizer was not restored: the first step after {since} matches and the "
                      "next one does not, as when momentum or Adam's averages (exp_avg) start again "
                      "from zero" + _hint(kinds, "optimizer", "run.track(optimizer=optimizer)",
                                          "a second optimizer, or one built after run.restore()?"))
    if not causes:
        causes.append(f"the runs diverge at step {metrics.step}, {step - c:g} steps after {since}: "
                      "state that acts only later was not restored (a counter or a best metric kept "
                      "outside run.extras, an object not passed to run.track?)")
    return causes


def _hint(kinds: Mapping[str | None, str], kind: str, fix: str, tracked: str) -> str:
    if kind not in kinds:
        return f"; no {kind} is tracked: {fix}"
    return f"; {kinds[kind]!r} is tracked: {tracked}" if tracked else ""


# -- the command -----------------------------------------------------------------------------

@dataclass
class Report:
    exit_code: int                 # 0 exact, 1 not
    lines: list[str]
    kept: Path | None = None       # the run directories, kept for a look


def verify(command: Sequence[str], *, seed: int = 0, kills: int = 2, atol: float = 0.0,
           ignore: Sequence[str] = (), keep: bool = False,
           say: Callable[[str], None] = lambda line: None) -> Report:
    """Run ``command`` uninterrupted, then interrupted ``kills`` times and resumed, and compare
    the endings. Bad input and an uninterrupted run that fails raise (exit 2)."""
    if not command:
        raise SpecError("no command to verify: give it after --, e.g. "
                        "sweeprun verify -- python train.py --epochs 2")
    if kills < 1 or not math.isfinite(atol) or atol < 0:
        raise SpecError("--kills must be at least 1 and --atol a number >= 0")
    root = Path(tempfile.mkdtemp(prefix="sweeprun-verify-"))
    kept = keep
    try:
        reference = ScriptRun(command, root / "uninterrupted")
        say(f"uninterrupted run in {reference.dir} ...")
        first = reference.complete()
        entries = _entries(reference.metrics)
        if first.exit_code != 0 or not entries:
            kept = True
            why = (f"exited with {first.exit_code}" if first.exit_code != 0 else
                   f"logged no steps to {reference.metrics}: does it call run.end_step(loss=...)?")
            raise ScriptFailed(f"the uninterrupted run {why}, so there is nothing to compare; its "
                               f"last line: {first.last_line()!r}; its log: {first.log}")
        plan = plan_kills([int(e["step"]) for e in entries], kills, seed)
        say(f"uninterrupted: exit 0, {len(entries)} metric lines, last step {entries[-1]['step']}; "
            f"interrupting at (seed {seed}): " + ", ".join(f"{k.name} after step {k.step}" for k in plan))
        resumed = ScriptRun(command, root / "interrupted")
        failure = _interrupt(resumed, plan, say)
        report = _verdict(reference, resumed, failure, atol, ignore)
        kept = kept or report.exit_code != 0
    finally:
        if not kept:
            shutil.rmtree(root, ignore_errors=True)
    if kept:
        report.kept = root
        report.lines.append(f"both runs are kept in {root}: uninterrupted/ and interrupted/ "
                            "(run directory and a log per attempt)")
    return report


def _entries(path: Path) -> list[dict[str, Any]]:
    from .training.metrics import parse_entries

    try:
        return parse_entries(path.read_bytes())
    except FileNotFoundError:
        return []


def _interrupt(run: ScriptRun, plan: Sequence[Kill], say: Callable[[str], None]) -> str | None:
    """Interrupt the run as planned, then re-run it until it finishes; what went wrong, if anything."""
    for kill in plan:
        attempt = run.interrupt_at(kill)
        say(attempt.describe())
        expected = {"SIGKILL": {-signal.SIGKILL}, "SIGTERM": {PREEMPTED_EXIT, -signal.SIGTERM}}
        if attempt.exit_code == 0:
            return None  # finished before (or as) the signal landed: nothing left to interrupt
        if attempt.exit_code not in expected.get(attempt.sent or "", {PREEMPTED_EXIT}):
            return _failed(attempt)
        if attempt.exit_code == -signal.SIGTERM:
            attempt.note += ("; SIGTERM ended it without a save (exit 75 expected): is "
                             "sweeprun.init called before training starts?")
    for _ in range(MAX_RERUNS):
        attempt = run.complete()
        say(attempt.describe())
        if attempt.exit_code == 0:
            return None
        if attempt.exit_code != PREEMPTED_EXIT:
            return _failed(attempt)
    return f"the interrupted run did not finish in {MAX_RERUNS} re-runs: each exited {PREEMPTED_EXIT}"


def _failed(attempt: Attempt) -> str:
    return (f"{attempt.describe()}: the resumed run failed where the uninterrupted one finished; "
            f"its last line: {attempt.last_line()!r}; its log: {attempt.log}")


def _verdict(reference: ScriptRun, resumed: ScriptRun, failure: str | None, atol: float,
             ignore: Sequence[str]) -> Report:
    interruptions = [a for a in resumed.attempts if a.sent]
    resumes = [a.resumed_from for a in resumed.attempts if a.resumed_from is not None]
    if failure:
        return Report(1, [f"NOT EXACT: {failure}"])
    if not interruptions:
        return Report(1, ["NOT VERIFIED: the script finished before any interruption landed"])
    if not resumes:
        return Report(1, ["NOT EXACT: no attempt resumed from a checkpoint; each started again from "
                          "step 0: does the script call run.restore() after run.track(...)?"])
    metrics = diff_metrics(_entries(reference.metrics), _entries(resumed.metrics), atol, set(ignore))
    from .errors import CheckpointError
    from .training import load_checkpoint

    try:
        want: dict[str, Any] | None = load_checkpoint(reference.dir)
    except CheckpointError:
        want = None
    got = load_checkpoint(resumed.dir) if want is not None else None
    states = compare_states(want, got, atol) if want is not None and got is not None else {}
    rng = states.pop("global RNGs", None)
    how = ", ".join(f"{a.sent} after step {a.after_step}" for a in interruptions)
    lines = []
    if metrics.same and not states:
        tolerance = "bit for bit" if atol == 0 else f"within --atol {atol:g}"
        what = ("the final state" + (f" at step {want['step']}" if want else "")
                + f" equal {tolerance} ({', '.join(p for p in _pieces(want) if not (rng and p == 'global RNGs'))}: "
                f"{count_tensors(want)} tensors)"
                if want is not None else "no sweeprun checkpoint to compare (only metrics were)")
        lines.append(f"EXACT: interrupted {len(interruptions)} time(s) ({how}) and resumed from "
                     f"step(s) {', '.join(map(str, resumes))}, it ended as the uninterrupted run: "
                     f"the same {metrics.lines[0]} metric lines, {what}")
        if rng:
            lines.append(f"  warning: the global RNGs {summarize(rng)} at the end, though nothing "
                         "drawn from them changed the result: unseeded (random.seed, "
                         "np.random.seed), or drawn a different number of times after a resume; "
                         "a script that draws from them would not be exact")
        return Report(0, [redact(line) for line in lines])
    lines.append(f"NOT EXACT: interrupted {len(interruptions)} time(s) ({how}) and resumed from "
                 f"step(s) {', '.join(map(str, resumes))}, it did not end as the uninterrupted run")
    resumed_steps = [int(e["step"]) for e in _entries(resumed.metrics) if _number(e.get("step"))]
    for cause in diagnose(metrics, resumes, resumed_steps, want):
        lines.append(f"  likely: {cause}")
    if not metrics.same:
        lines.append(f"  metrics: first differ at step {metrics.step} (uninterrupted vs resumed: "
                     f"{metrics.detail}); {metrics.lines[0]} vs {metrics.lines[1]} lines")
    for piece, differences in states.items():
        shown = differences[0].detail if piece in ("step", "epoch") else summarize(differences)
        lines.append(f"  {piece}: {shown}")
    if rng:
        lines.append(f"  global RNGs: {summarize(rng)} (as they do whenever a script leaves one unseeded)")
    if want is not None and states:
        equal = [p for p in _pieces(want) if p not in states and not (rng and p == "global RNGs")]
        if equal:
            lines.append(f"  equal: {', '.join(equal)}")
    return Report(1, [redact(line) for line in lines])


def _pieces(state: Mapping[str, Any] | None) -> list[str]:
    if state is None:
        return []
    pieces = [str(name) for name in state.get("objects", {})]
    return pieces + (["global RNGs"] if state.get("rng") is not None else [])
