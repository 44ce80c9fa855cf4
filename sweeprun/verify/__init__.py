"""``sweeprun verify``: kill the script, resume it, and check that it really continued.

Every promise of exact resumption rests on the script tracking all of its state; one
forgotten piece (a scheduler, a generator, the position in the epoch) resumes without
an error and quietly trains something else. Reading the script cannot find that; running
it can. So the script runs standalone twice, each time in a fresh run directory given as
``SWEEPRUN_RUN_DIR``: once uninterrupted, and once interrupted from outside as a lost
machine would interrupt it (SIGTERM at one step, SIGKILL at another, seeded) and re-run
until it finishes. The two endings are then compared: every tensor of the final
checkpoint (a sweeprun checkpoint, Lightning's inside it, or the Trainer's last sealed
folder, taken apart into pieces by :mod:`.endings`), every metrics line. Where they differ, the first differing step, measured
from the resume before it, says which piece was missing: a learning rate that differs at
the first resumed step is the scheduler; a loss that differs there with the same
learning rate is the data position or the RNG; a loss that differs only one step later is
the optimizer, whose update of that first step was computed from a fresh state.

Steps are observed the way ``sweeprun status`` sees them, from metrics.jsonl growing,
so kills land wherever the script happens to be, sometimes inside a save. torch is
imported only to compare, after both runs ended.
"""

from __future__ import annotations

import math
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError, SweeprunError
from ..redact import redact
from ..runenv import PREEMPTED_EXIT
from .attempts import Attempt, Kill, ScriptRun, plan_kills
from .compare import (
    Difference,
    MetricsDiff,
    compare_pieces,
    compare_states,
    count_tensors,
    diff_metrics,
    diff_trees,
    kind_of,
    summarize,
)
from .diagnose import diagnose
from .endings import Ending, load_ending

__all__ = ["Report", "ScriptFailed", "verify", "plan_kills", "diff_metrics", "diff_trees",
           "compare_states", "diagnose", "kind_of", "MetricsDiff", "Kill"]

#: Re-runs after the planned kills; a script that keeps exiting 75 on its own (a time
#: limit shorter than the run) would otherwise loop for ever.
MAX_RERUNS = 20
#: Without --timeout-s, each attempt of the interrupted run may take TIMEOUT_FACTOR times the
#: uninterrupted run's wall time, and at least MIN_TIMEOUT_S: a resumed attempt redoes at most
#: the whole run, plus a start and a checkpoint load; far past that it hangs.
TIMEOUT_FACTOR = 3.0
MIN_TIMEOUT_S = 60.0


class ScriptFailed(SweeprunError):
    """The uninterrupted run did not end well: there is nothing to compare against."""


@dataclass
class Report:
    exit_code: int                 # 0 exact, 1 not
    lines: list[str]
    kept: Path | None = None       # the run directories, kept for a look

    def __post_init__(self) -> None:
        # The lines quote what the script logged; a library caller prints them past no exit.
        self.lines = [redact(line) for line in self.lines]


def verify(command: Sequence[str], *, seed: int = 0, kills: int = 2, atol: float = 0.0,
           ignore: Sequence[str] = (), keep: bool = False, timeout_s: float | None = None,
           nproc: int | None = None, resume_nproc: int | None = None,
           say: Callable[[str], None] = lambda line: None) -> Report:
    """Run ``command`` uninterrupted, then interrupted ``kills`` times and resumed, and compare
    the endings. Bad input and an uninterrupted run that fails raise (exit 2).

    ``timeout_s`` bounds every attempt, the uninterrupted run's too; without it the
    uninterrupted run has no bound (how long a script trains is its own business) and each
    attempt of the interrupted run gets :data:`TIMEOUT_FACTOR` times the uninterrupted run's
    time, at least :data:`MIN_TIMEOUT_S`. An attempt past its bound is killed with its process
    group; in the interrupted run that is the verdict (it hangs where the uninterrupted run
    finished), in the uninterrupted run an error.

    ``nproc``: the script runs as that many ranks through torchrun (one too), as ``nproc:``
    in a sweep file starts it; ``resume_nproc``: the interrupted run's later attempts at
    another world size, whose resume cannot be exact in its RNG states and data position (the
    verdict says so, apart from anything else it finds)."""
    if not command:
        raise SpecError("no command to verify: give it after --, e.g. "
                        "sweeprun verify -- python train.py --epochs 2")
    if kills < 1 or not math.isfinite(atol) or atol < 0:
        raise SpecError("--kills must be at least 1 and --atol a number >= 0")
    for name, value in (("--nproc", nproc), ("--resume-nproc", resume_nproc)):
        if value is not None and not 1 <= value <= 1024:
            raise SpecError(f"{name} {value}: give a number of processes from 1 to 1024")
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
        raise SpecError(f"--timeout-s {timeout_s!r}: give a number of seconds above 0")
    root = Path(tempfile.mkdtemp(prefix="sweeprun-verify-"))
    kept = keep
    try:
        reference = ScriptRun(command, root / "uninterrupted", nproc)
        say(f"uninterrupted run in {reference.dir} ...")
        first = reference.complete(timeout_s)
        for _ in range(MAX_RERUNS):   # a loss-spike rollback exits 75 to be started again, as the launcher does
            if first.exit_code != PREEMPTED_EXIT or not _new_rollback(reference, first):
                break
            say(f"uninterrupted: rolled back after a loss spike ({_spikes_text(_rollbacks(reference.dir)[-1:])}); "
                "started again, as the launcher does")
            first = reference.complete(timeout_s)
        if first.timed_out is not None:
            kept = True
            raise ScriptFailed(f"the uninterrupted run did not exit within {first.timed_out:g} s "
                               "(--timeout-s) and was killed with its process group, so there is "
                               f"nothing to compare; give a larger --timeout-s or a shorter run; its "
                               f"last line: {first.last_line()!r}; its log: {first.log}")
        entries = _entries(reference.metrics)
        if first.exit_code != 0 or not entries:
            kept = True
            why = (f"exited with {first.exit_code}" if first.exit_code != 0 else
                   f"logged no steps to {reference.metrics}: does it call run.end_step(loss=...)?")
            raise ScriptFailed(f"the uninterrupted run {why}, so there is nothing to compare; its "
                               f"last line: {first.last_line()!r}; its log: {first.log}")
        plan = plan_kills(_steps(reference.metrics), kills, seed)
        say(f"uninterrupted: exit 0, {len(entries)} metric lines, last step {entries[-1]['step']}; "
            f"interrupting at (seed {seed}): " + ", ".join(f"{k.name} after step {k.step}" for k in plan))
        resumed = ScriptRun(command, root / "interrupted", nproc, resume_nproc)
        bound = (timeout_s, "--timeout-s") if timeout_s is not None else (
            max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * first.wall_s),
            f"{TIMEOUT_FACTOR:g}x the uninterrupted run's {first.wall_s:.1f} s, at least "
            f"{MIN_TIMEOUT_S:g} s; --timeout-s sets it")
        failure = _interrupt(resumed, plan, say, bound)
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


def _steps(path: Path) -> list[int]:
    """The steps of the lines of a metrics.jsonl, in order."""
    return [int(e["step"]) for e in _entries(path) if isinstance(e.get("step"), int)]


def _entries(path: Path) -> list[dict[str, Any]]:
    from ..training.metrics import parse_entries

    try:
        return parse_entries(path.read_bytes())
    except FileNotFoundError:
        return []


def _interrupt(run: ScriptRun, plan: Sequence[Kill], say: Callable[[str], None],
               bound: tuple[float, str] = (math.inf, "")) -> str | None:
    """Interrupt the run as planned, then re-run it until it finishes, each attempt within
    ``bound`` (seconds, and where that number comes from); what went wrong, if anything."""
    timeout_s = None if math.isinf(bound[0]) else bound[0]
    for kill in plan:
        for _ in range(MAX_RERUNS):  # a rollback before the signal landed is no interruption: again
            attempt = run.interrupt_at(kill, timeout_s)
            if attempt.timed_out is not None:
                return _hung(attempt, bound)
            if attempt.sent == "SIGTERM" and attempt.exit_code == -signal.SIGTERM:
                attempt.note += (f"; not {PREEMPTED_EXIT}: the script did not save on SIGTERM (is "
                                 "sweeprun.init called before training?), or a wrapper died of it "
                                 "first (exec the script from wrapper scripts)")
            say(attempt.describe())
            if attempt.exit_code == 0:
                return None  # finished before (or as) the signal landed: nothing left to interrupt
            rolled_back = attempt.exit_code == PREEMPTED_EXIT and _new_rollback(run, attempt)
            if not (rolled_back and attempt.sent is None):
                break
        expected = {"SIGKILL": {-signal.SIGKILL}, "SIGTERM": {PREEMPTED_EXIT, -signal.SIGTERM}}
        if not rolled_back and attempt.exit_code not in expected.get(attempt.sent or "", {PREEMPTED_EXIT}):
            return _failed(attempt)
    for _ in range(MAX_RERUNS):
        attempt = run.complete(timeout_s)
        if attempt.timed_out is not None:
            return _hung(attempt, bound)
        say(attempt.describe())
        if attempt.exit_code == 0:
            return None
        if attempt.exit_code != PREEMPTED_EXIT:
            return _failed(attempt)
    return f"the interrupted run did not finish in {MAX_RERUNS} re-runs: each exited {PREEMPTED_EXIT}"


def _hung(attempt: Attempt, bound: tuple[float, str]) -> str:
    start = f"resumed from step {attempt.resumed_from}" if attempt.resumed_from is not None else "from step 0"
    return (f"attempt {attempt.number}: {start}; it did not exit within {bound[0]:g} s ({bound[1]}) "
            "and was killed with its process group, where the uninterrupted run finished; its last "
            f"line: {attempt.last_line()!r}; its log: {attempt.log}")


def _failed(attempt: Attempt) -> str:
    return (f"{attempt.describe()}: the resumed run failed where the uninterrupted one finished; "
            f"its last line: {attempt.last_line()!r}; its log: {attempt.log}")


def _rollbacks(folder: Path) -> list[tuple[int, int, int, bool]]:
    """A run's loss-spike rollbacks as verify compares them: (spike start, step confirmed,
    step restored, diverged) each."""
    import fsspec

    from ..rollbacks import read_rollbacks

    records = read_rollbacks(fsspec.filesystem("file"), str(folder / "rollbacks"))
    return [(r.start, r.step, r.restored_step, r.diverged) for r in records]


def _new_rollback(run: ScriptRun, attempt: Attempt) -> bool:
    """Did ``attempt`` end by rolling back after a loss spike (a record of its own)?"""
    import fsspec

    from ..rollbacks import attempt_rollback, read_rollbacks

    records = read_rollbacks(fsspec.filesystem("file"), str(run.dir / "rollbacks"))
    return attempt_rollback(records, attempt.number) is not None


def _spikes_text(found: list[tuple[int, int, int, bool]]) -> str:
    return ", ".join(f"at step {step} to step {restored}" if not diverged else f"diverged at step {step}"
                     for _, step, restored, diverged in found)


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
    steps = _steps(reference.metrics)
    if steps and min(resumes) >= steps[-1]:
        # Aimed before the last step, a signal can land after it on a fast script (verify reads
        # metrics.jsonl every POLL_S): the resume then had nothing left to train, so proves nothing.
        sent = ", ".join(f"{a.sent} after step {a.after_step}" for a in interruptions)
        return Report(1, [f"NOT VERIFIED: every interruption took effect after the last step ({sent}; "
                          f"resumed from step {', '.join(map(str, resumes))}, the last): the resumed "
                          "run had nothing left to train; give the script more steps, or another "
                          "--seed to interrupt earlier"])
    metrics = diff_metrics(_entries(reference.metrics), _entries(resumed.metrics), atol, set(ignore))
    from ..errors import CheckpointError

    try:
        want: Ending | None = load_ending(reference.dir)
    except CheckpointError:
        want = None  # its checkpoints do not verify: its metrics are all there is to compare
    states: dict[str, list[Difference]] = {}
    if want is not None:
        try:
            got = load_ending(resumed.dir)
        except CheckpointError as exc:
            got, states = None, {"final checkpoint": [Difference((), f"none in the resumed run ({exc})")]}
        if got is None and not states:
            states = {"final checkpoint": [Difference((), f"none in the resumed run, where the "
                                                          f"uninterrupted one ended with a {want.what}")]}
        elif got is not None:
            states = compare_pieces(want.pieces, got.pieces, atol)
    rng = next((states.pop(p) for p in _RNG_PIECES if p in states), None)
    how = ", ".join(f"{a.sent} after step {a.after_step}" for a in interruptions)
    lines = []
    spikes = _rollbacks(reference.dir), _rollbacks(resumed.dir)
    if metrics.same and not states:
        tolerance = "bit for bit" if atol == 0 else f"within --atol {atol:g}"
        pieces = [p for p in want.shown() if not (rng and p in _RNG_PIECES)] if want else []
        source = "" if want is None or want.what == "sweeprun checkpoint" else f"{want.what}: "
        what = (f"the final state at step {want.step} equal {tolerance} "
                + (f"({source}{', '.join(pieces)}: {count_tensors(want.pieces)} tensors)" if pieces
                   else "(no objects tracked)")
                if want is not None else "no sweeprun checkpoint to compare (only metrics were)")
        lines.append(f"EXACT: interrupted {len(interruptions)} time(s) ({how}) and resumed from "
                     f"step(s) {', '.join(map(str, resumes))}, it ended as the uninterrupted run: "
                     f"the same {metrics.lines[0]} metric lines, {what}")
        if spikes[0]:
            lines.append(f"  both runs rolled back after the same loss spike(s) ({_spikes_text(spikes[0])}): "
                         "compared as they rolled back")
        if rng:
            lines.append(f"  warning: the global RNGs {summarize(rng)} at the end, though nothing "
                         "drawn from them changed the result: unseeded (random.seed, "
                         "np.random.seed), or drawn a different number of times after a resume; "
                         "a script that draws from them would not be exact")
        return Report(0, lines)
    after_resume = metrics.step is None or any(r < metrics.step for r in resumes)
    if want is not None and not metrics.same and after_resume and _training_equal(want, states):
        # The weights, optimizer, schedule and data position ended equal: the training was the
        # same, and what differs is what was logged (or kept from what was logged). Blaming a
        # piece of training state here would send the user after the wrong fix.
        lines = _logging_verdict(want, metrics, states, resumes,
                                 f"interrupted {len(interruptions)} time(s) ({how})")
        if rng:
            lines.append(f"  global RNGs: {summarize(rng)} (as they do whenever a script leaves one unseeded)")
        return Report(1, lines)
    lines.append(f"NOT EXACT: interrupted {len(interruptions)} time(s) ({how}) and resumed from "
                 f"step(s) {', '.join(map(str, resumes))}, it did not end as the uninterrupted run")
    resumed_steps = _steps(resumed.metrics)
    if resumed.resume_nproc != resumed.nproc:  # what differs then is no fault of the script's
        causes = [f"it resumed at another world size ({resumed.nproc} -> {resumed.resume_nproc} processes): "
                  "the model and optimizer were resharded, but the RNG states and the data position "
                  "cannot be exact (each rank drew and read its own, and an epoch has another number "
                  "of steps); the run records the resume as approximate. Verify at one world size "
                  "for an exact verdict"]
    elif spikes[0] != spikes[1]:   # a rollback is no fault of the resume: say that, not a piece
        causes = [f"the runs rolled back differently after loss spikes (uninterrupted: "
                  f"{_spikes_text(spikes[0]) or 'none'}; interrupted: {_spikes_text(spikes[1]) or 'none'}): "
                  "from its first rollback on a run is not bit-exact with one that did not roll back "
                  "there, so the difference after it is not a resume fault; a spike that comes and "
                  "goes with a resume is itself worth a look (an unseeded draw, or data order)"]
    else:
        causes = diagnose(metrics, resumes, resumed_steps, want, differ=list(states))
    for cause in causes:
        lines.append(f"  likely: {cause}")
    if not metrics.same:
        lines.append(f"  metrics: first differ at step {metrics.step} (uninterrupted vs resumed: "
                     f"{metrics.detail}); {metrics.lines[0]} vs {metrics.lines[1]} lines")
    scalars = (*want.scalars, "final checkpoint") if want else ("final checkpoint",)
    for piece, differences in states.items():
        shown = differences[0].detail if piece in scalars else summarize(differences)
        lines.append(f"  {piece}: {shown}")
    if rng:
        lines.append(f"  global RNGs: {summarize(rng)} (as they do whenever a script leaves one unseeded)")
    if want is None:
        lines.append("  final state: not compared, the uninterrupted run left no sweeprun checkpoint")
    elif states:
        equal = [p for p in want.shown() if p not in states and not (rng and p in _RNG_PIECES)]
        if equal:
            lines.append(f"  equal: {', '.join(equal)}")
    return Report(1, lines)


def _training_equal(want: Ending, states: dict[str, list[Difference]]) -> bool:
    """Whether every piece that trains (model, optimizer, LR scheduler, data position, the
    RNG states a resume restores) ended equal, so any difference left is in what the run
    logged or derived from it (a callback's best score, the Trainer's log history). The
    global RNGs alone differing is the unseeded case the EXACT verdict warns about."""
    training = {*want.kinds.values(), "model", "RNG", "step", "epoch", "final checkpoint"}
    return not any(piece in training for piece in states)


def _logging_verdict(want: Ending, metrics: MetricsDiff, states: dict[str, list[Difference]],
                     resumes: Sequence[int], interrupted: str) -> list[str]:
    """The verdict when the training ended equal and the logged metrics did not."""
    before = [r for r in sorted(set(resumes)) if metrics.step is None or r < metrics.step]
    keys = [k for k in metrics.keys if k != "step"] or ["the number of lines"]
    where = (f"first at step {metrics.step}, after resuming from step {before[-1]}" if before
             else f"first at step {metrics.step}")
    trained = [p for p in want.shown() if p not in states and p not in _RNG_PIECES]
    lines = [f"NOT EXACT: {interrupted}, it trained exactly as the uninterrupted run (the final state "
             f"at step {want.step} equal bit for bit: {', '.join(trained) or 'no objects tracked'}), "
             "but its logged metrics differ",
             f"  likely: a logged value spans the resume: {', '.join(keys[:5])} differ {where}; a value "
             "averaged over several steps (an epoch mean, a running loss since the last log) lost the "
             "steps before the resume, or a metric draws from a random source outside training "
             "(pass --ignore NAME to leave a metric out)"]
    lines.append(f"  metrics: {metrics.detail}; {metrics.lines[0]} vs {metrics.lines[1]} lines")
    for piece, differences in states.items():
        lines.append(f"  {piece}: {summarize(differences)} (values derived from the logged metrics)")
    return lines


#: The pieces that hold the global RNGs: when they alone differ and every result is equal, the
#: script left one unseeded, or draws from it a varying number of times, without effect (a warning).
_RNG_PIECES = ("global RNGs",)
