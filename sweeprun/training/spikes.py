"""Loss spikes: what counts as one (:class:`Spikes`, the policy a script passes to
``sweeprun.init(spikes=...)``) and the detector that watches each step (:class:`Detector`).

A value of a watched metric that is NaN or infinite is a spike at once. A finite value is
one when it is above ``factor`` times the mean of the last ``window`` values that were not
spikes, after ``warmup`` values were seen, for ``patience`` steps in a row; its first step
is the spike's start. The detector's state is saved with every checkpoint (its window
too), so a run resumed after a kill finds the same spike at the same step as the run never
interrupted. Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .sampler import ResumableSampler

T = TypeVar("T")

if TYPE_CHECKING:
    from .checkpoints import Manifest
    from .ranks import Ranks
    from .writer import CheckpointWriter


@dataclass(frozen=True)
class Spikes:
    """What ``sweeprun.init(spikes=Spikes(...))`` (or ``spikes=True`` for these defaults) does
    about a loss spike: roll back to a checkpoint at least ``margin`` steps older than the
    spike's start, pass over the batches from there to the step it was confirmed at plus
    ``skip`` more, and go on; after ``max_rollbacks`` rollbacks the next spike ends the run
    ``diverged``."""

    watch: tuple[str, ...] = ("loss",)
    """The metrics of ``run.end_step(...)`` watched (NaN/Inf in any of them is a spike)."""
    factor: float = 2.0
    window: int = 20
    patience: int = 1
    warmup: int | None = None
    """Values seen before a finite value can be a spike; ``None``: ``window``."""
    margin: int = 1
    skip: int = 0
    max_rollbacks: int = 3

    def __post_init__(self) -> None:
        watch = (self.watch,) if isinstance(self.watch, str) else tuple(self.watch)
        object.__setattr__(self, "watch", watch)
        if not watch or not all(isinstance(w, str) and w for w in watch):
            raise ValueError(f"spikes: watch must name one metric or more, got {self.watch!r}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or \
                not (math.isfinite(self.factor) and self.factor > 1):
            raise ValueError(f"spikes: factor must be a number above 1, got {self.factor!r}")
        for name, low in (("window", 1), ("patience", 1), ("margin", 1), ("skip", 0), ("max_rollbacks", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"spikes: {name} must be an integer of at least {low}, got {value!r}")
        if self.warmup is not None and (isinstance(self.warmup, bool) or not isinstance(self.warmup, int)
                                        or self.warmup < 1):
            raise ValueError(f"spikes: warmup must be a positive integer, got {self.warmup!r}")

    @property
    def warmup_steps(self) -> int:
        return self.window if self.warmup is None else self.warmup

    @classmethod
    def of(cls, value: bool | Spikes | Mapping[str, Any] | None) -> Spikes | None:
        """``init(spikes=...)``: ``None``/``False`` (off, the default), ``True``, a
        :class:`Spikes`, or a dict of its fields (from a config file)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"spikes: unknown setting(s) {', '.join(map(str, unknown))}; "
                                 f"known: {', '.join(cls.__dataclass_fields__)}")
            return cls(**value)
        raise ValueError(f"spikes must be True, a sweeprun.Spikes or a dict, got {type(value).__name__}")


@dataclass(frozen=True)
class Spike:
    """A spike confirmed at ``step``, which began at ``start``."""

    start: int
    step: int
    metric: str
    value: float
    reason: str          # "not finite" or "spike"


@dataclass
class Detector:
    """Watches each step's metrics for a spike of :class:`Spikes`; its state is checkpointed."""

    policy: Spikes
    history: dict[str, list[float]] = field(default_factory=dict)
    seen: int = 0
    run_start: int | None = None      # the first step of the current run of high values
    run_length: int = 0

    def observe(self, step: int, metrics: Mapping[str, Any]) -> Spike | None:
        """The spike that ``step``'s metrics confirm, or ``None``. Values that are not
        numbers are passed over; a step that logs no watched metric changes nothing."""
        values = {n: float(metrics[n]) for n in self.policy.watch
                  if isinstance(metrics.get(n), (int, float)) and not isinstance(metrics.get(n), bool)}
        values.update({n: _item(metrics[n]) for n in self.policy.watch
                       if n in metrics and n not in values and _item(metrics[n]) is not None})
        if not values:
            return None
        for name, value in values.items():
            if not math.isfinite(value):
                return Spike(self.run_start if self.run_start is not None else step, step, name, value,
                             "not finite")
        high = next(((n, v) for n, v in values.items() if self._high(n, v)), None)
        self.seen += 1
        if high is None:
            self.run_start, self.run_length = None, 0
            for name, value in values.items():
                window = self.history.setdefault(name, [])
                window.append(value)
                del window[:-self.policy.window]
            return None
        self.run_start = step if self.run_start is None else self.run_start
        self.run_length += 1
        if self.run_length >= self.policy.patience:
            return Spike(self.run_start, step, high[0], high[1], "spike")
        return None

    def _high(self, name: str, value: float) -> bool:
        window = self.history.get(name)
        if self.seen < self.policy.warmup_steps or not window:
            return False
        mean = sum(window) / len(window)
        return value > mean + (self.policy.factor - 1) * abs(mean)

    @property
    def suspected(self) -> int | None:
        """The first step of a run of high values not yet long enough to count (or ``None``):
        retention keeps a checkpoint older than it meanwhile."""
        return self.run_start

    def state_dict(self) -> dict[str, Any]:
        return {"history": {n: list(v) for n, v in self.history.items()}, "seen": self.seen,
                "run_start": self.run_start, "run_length": self.run_length}

    def load_state_dict(self, state: Any) -> None:
        """A checkpoint's detector state; one without (written with spikes off) starts afresh."""
        if not isinstance(state, dict):
            return
        self.history = {str(n): [float(x) for x in v][-self.policy.window:]
                        for n, v in dict(state.get("history") or {}).items()}
        self.seen = int(state.get("seen") or 0)
        start = state.get("run_start")
        self.run_start = int(start) if start is not None else None
        self.run_length = int(state.get("run_length") or 0)


class Guard:
    """A run's spike watch: the :class:`Detector` (checkpointed), the samplers' pace (for
    ``skip``), and what retention keeps meanwhile. Inert when the run has no policy."""

    def __init__(self, policy: Spikes | None, step: Callable[[], int], every_steps: int | None,
                 writer: CheckpointWriter) -> None:
        self.policy = policy
        self.detector = Detector(policy) if policy is not None else None
        self.positions = Positions()
        self._step, self._every_steps = step, every_steps
        #: The earliest start of a run of high values another rank suspects (rank 0 prunes
        #: for every rank: :meth:`~.ranks.Ranks.agree` brings it each step).
        self.suspected_elsewhere: int | None = None
        writer.protect = self.protect

    def observe(self, step: int, metrics: Mapping[str, Any], objects: Mapping[str, Any]) -> Spike | None:
        if self.detector is None or self.policy is None:
            return None
        if self.policy.skip:
            self.positions.observe(objects)
        return self.detector.observe(step, metrics)

    def protect(self, manifests: Sequence[Manifest]) -> list[Manifest]:
        """What retention keeps besides the last ``keep_last`` (:meth:`needed`)."""
        return self.needed(sorted(manifests, key=lambda m: m.name), self._step(), self._every_steps)

    def needed(self, ordered: Sequence[T], step: int, every_steps: int | None) -> list[T]:
        """Of ``ordered`` checkpoints (oldest first, each with a ``step``), at ``step``: what a
        spike starting now (one suspected on any rank: before its start) would go back to, and
        every one since, which a spike starting later may need (``margin`` wider than the save
        interval). Kept by sweeprun's retention and by the Trainer's rotation alike."""
        if self.detector is None or self.policy is None:
            return []
        suspected = [s for s in (self.detector.suspected, self.suspected_elsewhere) if s is not None]
        limit = (min(suspected) if suspected else step + 1) - self.policy.margin
        good = target(ordered, limit, every_steps)
        return [c for c in ordered if c.step > limit or c is good]  # type: ignore[attr-defined]

    @property
    def suspected(self) -> int | None:
        return self.detector.suspected if self.detector is not None else None

    def state_dict(self) -> dict[str, Any] | None:
        return self.detector.state_dict() if self.detector is not None else None

    def load_state_dict(self, state: Any) -> None:
        if self.detector is not None:
            self.detector.load_state_dict(state)


def combined(mine: Spike | None, start: int | None, step: int, ranks: Ranks) -> Spike | None:
    """The spike every rank rolls back for, given the earliest start any rank saw (``start``,
    from :meth:`~.ranks.Ranks.agree`): with the metric and value of the rank that saw it
    first (a collective when there is one)."""
    if start is None:
        return None
    first = min((s for s in ranks.gather(mine) if s is not None), key=lambda s: s.start)
    return Spike(start, step, first.metric, first.value, first.reason)


def target(ordered: Sequence[T], limit: int, every_steps: int | None) -> T | None:
    """The checkpoint a rollback restores, of ``ordered`` (oldest first; each has a ``step``):
    the newest at or before step ``limit``. With a step cadence, only one on it: a save a
    SIGTERM made off it (step 15 of every 4) must not make a run that was interrupted roll
    back elsewhere than one that was not."""
    eligible = [c for c in ordered if c.step <= limit  # type: ignore[attr-defined]
                and (every_steps is None or c.step % every_steps == 0)]  # type: ignore[attr-defined]
    return eligible[-1] if eligible else None


class Positions:
    """How many indices each tracked :class:`~.sampler.ResumableSampler` hands out per step,
    as last seen: what ``skip`` more batches are in indices."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}
        self.per_step: dict[str, int] = {}

    def observe(self, objects: Mapping[str, Any]) -> None:
        for name, obj in objects.items():
            if isinstance(obj, ResumableSampler):
                now, before = (obj.epoch, obj.offset), self._last.get(name)
                if before is not None and before[0] == now[0] and now[1] > before[1]:
                    self.per_step[name] = now[1] - before[1]
                self._last[name] = now

    def after(self, name: str, obj: Any, skip: int) -> Any:
        """``obj``'s state as a rollback leaves it: ``skip`` more batches on for a ResumableSampler
        whose pace is known (within its epoch), else as it is."""
        per_step = self.per_step.get(name)
        if skip and per_step and isinstance(obj, ResumableSampler):
            return obj.state_dict_after(skip * per_step)
        return obj.state_dict()


def _item(value: Any) -> float | None:
    """A one-element tensor or numpy number as a float (``loss.item()`` forgotten); else None."""
    item = getattr(value, "item", None)
    if not callable(item):
        return None
    try:
        found = item()
    except (TypeError, ValueError, RuntimeError):
        return None
    return float(found) if isinstance(found, (int, float)) and not isinstance(found, bool) else None
