"""Which piece of state was not restored: read from where two runs' metrics diverge relative
to the resumes before it, and from what the final state tracks.

Apart from :mod:`.compare` (which only compares) because it reads an
:class:`~.endings.Ending`, and endings use the comparison's names: one direction, no cycle."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from .compare import MetricsDiff
from .endings import Ending, native_ending

_LR = re.compile(r"(^|[^a-z])(lr|learning_rate)([^a-z]|$)", re.IGNORECASE)


def diagnose(metrics: MetricsDiff, resumes: Sequence[int], resumed_steps: Sequence[int],
             state: Any, differ: Collection[str] = ()) -> list[str]:
    """The pieces of state that were most likely not restored, from where the metrics diverge
    relative to a resume before it, and from what the final state holds (an
    :class:`~.endings.Ending`, or a sweeprun checkpoint as :func:`load_checkpoint` reads it).
    ``differ`` names the pieces of the final state that ended different.

    Resumes are tried oldest first: a state restored wrongly at one resume is saved again by
    that attempt, so a later resume from it inherits the fault without causing it."""
    ending = state if isinstance(state, Ending) or state is None else native_ending(state)
    kinds = dict(ending.kinds) if ending else {}
    missing = dict(ending.missing) if ending else {}
    if metrics.same:
        return _only_at_the_end(max(resumes), differ, kinds) if resumes and differ else []
    step = metrics.step if metrics.step is not None else math.inf
    before = sorted(r for r in set(resumes) if r < step)
    if not before:
        return [f"the runs differ from step {metrics.step}, before any resume: the script is not "
                "deterministic even uninterrupted (an unseeded RNG, nondeterministic GPU kernels: "
                "seed it, or allow a tolerance with --atol)"]
    causes = []
    a_lines, b_lines = metrics.lines
    if a_lines != b_lines:
        how = "trained part of an epoch twice" if b_lines > a_lines else "skipped part of an epoch"
        fix = missing.get("data position") or (
            f"{kinds['data position']!r} is tracked: {ending.loop_hint}"
            if ending and ending.loop_hint and "data position" in kinds else "")
        causes.append(f"the data position was not restored: the resumed run logged {b_lines} metric "
                      f"lines where the uninterrupted one logged {a_lines}, so it {how}"
                      + (f"; {fix}" if fix else ""))
    if metrics.absent:
        # not a value that drifted but a line that logged something else: what the script
        # decided to do at that step (evaluate, log) came out otherwise, from a counter
        return [*causes, f"the runs log different metrics at step {metrics.step} "
                f"({', '.join(metrics.absent)} in one run only), {step - before[-1]:g} steps after "
                f"resuming from step {before[-1]}: a counter that decides what runs when (an "
                "evaluation every n optimizer steps, an epoch count, a best metric) was not "
                "restored: keep it in run.extras, or derive it from run.step"]
    for c in before:
        cause = _at_resume(c, step, metrics.keys, sorted({s for s in resumed_steps if s > c}),
                           kinds, missing, same_length=a_lines == b_lines)
        if cause:
            return [*causes, cause]
    if causes:
        return causes
    return [f"the runs diverge at step {metrics.step}, {step - before[-1]:g} steps after resuming "
            f"from step {before[-1]}: state that acts only later was not restored (a counter or a "
            "best metric kept outside run.extras, an object not passed to run.track?)"]


def _at_resume(c: int, step: float, keys: Sequence[str], after: Sequence[int],
               kinds: Mapping[str, str], missing: Mapping[str, str], same_length: bool) -> str | None:
    """The cause, if the divergence at ``step`` has the signature of a piece missing at resume ``c``."""
    first = after[0] if after else None
    second = after[1] if len(after) > 1 else None
    since = f"resuming from step {c}"
    if step == first and any(_LR.search(k) for k in keys):
        return (f"the LR scheduler was not restored: the learning rate differs from the first step "
                f"after {since}" + _hint(kinds, "LR scheduler", "run.track(scheduler=scheduler)",
                                         "is the learning rate also set outside it?"))
    if step == first and same_length:
        if "RNG" in missing:
            return (f"the RNG state was not restored: the loss differs from the first step after "
                    f"{since} while the learning rate matches; {missing['RNG']}")
        if "data position" in missing:
            return (f"the data position was not restored: the first step after {since} already "
                    f"differs, with the same learning rate; {missing['data position']}")
        return (f"random numbers or data differ from the first step after {since}: is a generator "
                "of the script's own (torch.Generator, numpy Generator, random.Random) or a second "
                "data loader left untracked?")
    if step == second and first == c + 1 and same_length:
        return (f"the optimizer was not restored: the first step after {since} matches and the "
                "next one does not, as when momentum or Adam's averages (exp_avg) start again "
                "from zero" + _hint(kinds, "optimizer", "run.track(optimizer=optimizer)",
                                    "a second optimizer, or one built after run.restore()?"))
    return None


def _only_at_the_end(last: int, differ: Collection[str], kinds: Mapping[str, str]) -> list[str]:
    """The cause when every logged metric matches and the final state does not: the fault acted
    only on the last update(s). A kill that lands late (a loaded machine signals a few steps
    after the step it aimed at) leaves the resumed attempt a step or two, too few for a loss
    to show it, while the weights it updated already differ."""
    since = f"every logged metric matches, and the final state differs ({', '.join(differ)}) after resuming from step {last}"
    scheduler = kinds.get("LR scheduler")
    if scheduler in differ:
        return [f"the LR scheduler was not restored: {since}, with the learning rate in it"
                + _hint(kinds, "LR scheduler", "", "is the learning rate also set outside it?")]
    if kinds.get("optimizer") in differ or ("model" in differ and "optimizer" not in kinds):
        return [f"the optimizer was not restored: {since}, as when the first updates after it "
                "start momentum or Adam's averages (exp_avg) again from zero"
                + _hint(kinds, "optimizer", "run.track(optimizer=optimizer)",
                        "a second optimizer, or one built after run.restore()?")]
    return [f"{since}: too few steps after it to tell which piece from the metrics; verify with "
            "another --seed to interrupt earlier in the run"]


def _hint(kinds: Mapping[str, str], kind: str, fix: str, tracked: str) -> str:
    if kind not in kinds:
        return f"; no {kind} is tracked: {fix}"
    return f"; {kinds[kind]!r} is tracked: {tracked}" if tracked else ""
