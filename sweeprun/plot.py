"""``sweeprun plot``: each run's curve of one metric, from its metrics in the store.

matplotlib is an optional extra (``pip install 'sweeprun[plot]'``), imported only here and
only when a plot is drawn; the figure is rendered off-screen (Agg), so it works over SSH,
in CI and in a notebook's terminal alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import SpecError, StoreError, SweeprunError
from .training.metrics import read_run_metrics

if TYPE_CHECKING:
    from .sweep import Sweep

#: Runs drawn at most: past that a plot is a blur, and reading every run's metrics slow.
MAX_RUNS = 500


@dataclass(frozen=True)
class Plotted:
    """What :func:`plot_sweep` drew."""

    path: str
    lines: int           # one per run that logged the metric
    skipped: list[str]   # runs without a single finite value of it
    colours: dict[str, str]  # value of ``by`` (as text) -> colour, when ``by`` was given


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SweeprunError("plot needs matplotlib: pip install 'sweeprun[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _points(entries: list[dict[str, Any]], metric: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, entry in enumerate(entries):
        value = entry.get(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        step = entry.get("step")
        xs.append(float(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else float(i))
        ys.append(float(value))
    return xs, ys


def plot_sweep(sweep: Sweep, metric: str, out: str, by: str | None = None,
               log_y: bool = False) -> Plotted:
    """Draw every run's ``metric`` against its step into the PNG ``out``, one colour per
    value of the parameter ``by`` (or per run). Reads the store only; writes only ``out``."""
    varying = sweep.spec.varying()
    if by is not None and by not in sweep.runs[0].params:
        raise SpecError(f"--by {by!r} is not a parameter of sweep {sweep.spec.name}; "
                        f"choose one of: {', '.join(varying) or ', '.join(sweep.runs[0].params)}")
    runs = sweep.runs[:MAX_RUNS]
    curves: list[tuple[str, Any, list[float], list[float]]] = []
    skipped: list[str] = []
    seen_metrics: set[str] = set()
    for run in runs:
        try:
            entries = read_run_metrics(sweep.paths.run(run.run_id))
        except (StoreError, FileNotFoundError):
            entries = []  # not started yet
        for entry in entries[-50:]:
            seen_metrics.update(k for k, v in entry.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step")
        xs, ys = _points(entries, metric)
        if not xs:
            skipped.append(run.run_id)
            continue
        curves.append((run.run_id, run.params.get(by) if by else None, xs, ys))
    if not curves:
        known = ", ".join(sorted(seen_metrics)) or "none yet"
        raise SpecError(f"no run of sweep {sweep.spec.name} logged {metric!r}; metrics logged: {known}")
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    colours: dict[str, str] = {}
    if by is not None:
        values = sorted({str(v) for _, v, _, _ in curves}, key=_natural)
        cmap = plt.get_cmap("tab10" if len(values) <= 10 else "viridis")
        for i, value in enumerate(values):
            rgba = cmap(i if len(values) <= 10 else i / max(1, len(values) - 1))
            colours[value] = "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])
    labelled: set[str] = set()
    for run_id, value, xs, ys in curves:
        if by is None:
            ax.plot(xs, ys, linewidth=1.2, label=run_id if len(curves) <= 12 else None)
            continue
        key = str(value)
        ax.plot(xs, ys, color=colours[key], linewidth=1.2, alpha=0.85,
                label=f"{by}={key}" if key not in labelled else None)
        labelled.add(key)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(f"{sweep.spec.name}: {metric}" + (f" by {by}" if by else ""))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(out, format="png")
    except OSError as exc:
        raise SweeprunError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return Plotted(path=out, lines=len(curves), skipped=skipped, colours=colours)


def _natural(text: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then text: a legend reads 0.001, 0.01, 0.1, not as strings."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)
