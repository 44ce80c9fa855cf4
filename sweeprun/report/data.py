"""What ``sweeprun report`` and ``sweeprun ui`` draw: one JSON object read from the store and
the ledger, the same for the file and the live page.

Read-only, and bounded for a big sweep: the runs' rows come from the listing ``status``
already makes, every attempt from one ledger query (:meth:`~sweeprun.ledger.base.Ledger.
every_attempt`), and each run's metrics from at most :data:`METRICS_BYTES` of its file's end,
with each curve cut to :func:`points_per_curve` points (the extremes of each stretch kept,
so a spike stays visible). No charting library is needed here: the page draws it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..numbers import finite
from ..redact import redact, redact_tree, redact_url

if TYPE_CHECKING:
    from ..ledger.base import AttemptRow
    from ..sweep import StatusRow, Sweep

#: How much of the end of each run's metrics a report reads (a longer file is drawn from
#: its end, and the page says so): ~100,000 lines, while 10,000 runs stay a few minutes' read.
METRICS_BYTES = 8 << 20
#: Points kept of all curves of one metric together; each curve keeps at least
#: :data:`MIN_POINTS` and at most :data:`MAX_POINTS` (the file of 10,000 runs stays small).
POINT_BUDGET = 400_000
MIN_POINTS, MAX_POINTS = 16, 1_000
#: Metrics whose best value is their largest (by name); any other metric is best at its lowest.
HIGHER_IS_BETTER = ("acc", "auc", "f1", "precision", "recall", "score", "reward", "bleu", "rouge",
                    "map", "iou", "dice", "r2", "return", "throughput")


@dataclass(frozen=True)
class Curve:
    """One run's values of one metric: steps and values, cut to at most ``points`` points."""

    steps: list[float]
    values: list[float]
    best: tuple[float, float] | None   # (value, step) of its lowest or highest, over every point read
    last: float | None


def points_per_curve(runs: int) -> int:
    """Points per curve for a sweep of ``runs`` runs (:data:`POINT_BUDGET` shared among them)."""
    return max(MIN_POINTS, min(MAX_POINTS, POINT_BUDGET // max(1, runs)))


def higher_is_better(metric: str) -> bool:
    """Whether ``metric``'s best value is its largest, guessed from its name (``val_acc``: yes;
    ``loss``: no); the page can be told otherwise."""
    name = metric.lower()
    return any(word in name for word in HIGHER_IS_BETTER)


def downsample(steps: list[float], values: list[float], points: int) -> tuple[list[float], list[float]]:
    """At most ``points`` of the curve, in order: in each of ``points // 2`` equal stretches its
    lowest and its highest value (a spike that a stride would step over stays), the last kept."""
    n = len(steps)
    if n <= points:
        return steps, values
    buckets = max(1, points // 2)
    out_s: list[float] = []
    out_v: list[float] = []
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if lo >= hi:
            continue
        low = min(range(lo, hi), key=values.__getitem__)
        high = max(range(lo, hi), key=values.__getitem__)
        for i in sorted({low, high}):
            out_s.append(steps[i])
            out_v.append(values[i])
    if out_s[-1] != steps[-1]:
        out_s[-1], out_v[-1] = steps[-1], values[-1]
    return out_s, out_v


def curves_of(entries: list[dict[str, Any]], points: int) -> dict[str, Curve]:
    """Each metric's curve from a run's metrics entries (x: the step; a metric logged twice at
    one step, as a resume that replays a step may, keeps its later value)."""
    series: dict[str, dict[float, float]] = {}
    for i, entry in enumerate(entries):
        step = finite(entry.get("step"))
        x = step if step is not None else float(i)
        for name, raw in entry.items():
            if name == "step" or not isinstance(name, str):
                continue
            value = finite(raw)
            if value is not None and abs(value) < 1e300:
                series.setdefault(name, {})[x] = value
    out = {}
    for name, by_step in series.items():
        steps = sorted(by_step)
        values = [by_step[s] for s in steps]
        pick = max if higher_is_better(name) else min
        best_i = pick(range(len(values)), key=values.__getitem__)
        xs, ys = downsample(steps, values, points)
        out[name] = Curve(xs, ys, (values[best_i], steps[best_i]), values[-1])
    return out


def _entries(sweep: Sweep, path: str | None) -> tuple[list[dict[str, Any]], bool]:
    """The run's entries in the last :data:`METRICS_BYTES` of its metrics, and whether its start
    was cut off; none for a run with no metrics or whose file cannot be read."""
    if path is None:
        return [], False
    entries, whole = sweep._tail_entries(path, METRICS_BYTES)
    return entries, not whole


def _attempts(sweep: Sweep) -> dict[str, list[AttemptRow]]:
    """Every run's attempts from the ledger, in one query; none where this machine's ledger
    never saw the sweep (then the table's counts still come from the store, and the timeline
    is empty)."""
    with sweep.read_ledger() as ledger:
        return ledger.every_attempt() if ledger is not None else {}


def _row(row: StatusRow, curves: dict[str, Curve], attempts: list[AttemptRow], cut: bool) -> dict[str, Any]:
    """One run as the page's table and charts read it."""
    return {
        "id": row.run_id,
        "params": _json_safe(redact_tree(row.params)),
        "state": row.state.value,
        "attempts": row.attempts,
        "failures": row.failures,
        "max_attempts": row.max_attempts,
        "resumes": max(row.attempts - 1, 0),  # each start after the first goes on from the latest checkpoint
        "rollbacks": row.rollbacks.count if row.rollbacks else 0,
        "nproc": row.nproc,
        "step": row.step if row.step is not None else _last_step(curves),
        "checkpoint_age_s": finite(row.checkpoint_age_s),
        "worker": redact(row.worker) if row.worker else None,
        "approximate": row.approximate_resume is not None,
        "cut": cut,
        "best": {m: {"value": c.best[0], "step": c.best[1]} for m, c in curves.items() if c.best},
        "last": {m: c.last for m, c in curves.items()},
        "timeline": [{"attempt": a.attempt, "start": finite(a.started_at), "end": finite(a.ended_at),
                      "outcome": a.outcome or ("running" if a.ended_at is None else None),
                      "worker": redact(a.worker) if a.worker else None, "exit_code": a.exit_code}
                     for a in attempts],
    }


def _json_safe(value: Any) -> Any:
    """A parameter as JSON can hold it: ``nan`` and ``inf`` (YAML's ``.nan``, ``.inf``) as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _last_step(curves: dict[str, Curve]) -> int | None:
    steps = [c.steps[-1] for c in curves.values() if c.steps]
    return int(max(steps)) if steps else None


def collect(sweep: Sweep) -> dict[str, Any]:
    """The report's data for ``sweep``: every run's row, curves and attempts. Read-only."""
    rows = sweep.status()
    attempts = _attempts(sweep)
    points = points_per_curve(len(rows))
    now = time.time()
    runs, curves, metrics = [], {}, {}
    for row in rows:
        entries, cut = _entries(sweep, row.metrics_path)
        found = curves_of(entries, points)
        runs.append(_row(row, found, attempts.get(row.run_id, []), cut))
        curves[row.run_id] = {m: [c.steps, c.values] for m, c in found.items()}
        for name in found:
            metrics[name] = metrics.get(name, 0) + 1
    varying = [k for k in sweep.spec.varying() if any(k in r["params"] for r in runs)]
    return {
        "sweep": redact(sweep.spec.name),
        "store": redact_url(str(sweep.spec.store)),
        "generated_at": now,
        "params": varying or sorted({k for r in runs for k in r["params"]}),
        "metrics": sorted(metrics, key=lambda m: (m != "loss", -metrics[m], m)),  # the first is shown first
        "higher_is_better": {m: higher_is_better(m) for m in metrics},
        "points_per_curve": points,
        "runs": runs,
        "curves": curves,
    }
