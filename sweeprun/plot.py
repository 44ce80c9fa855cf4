"""``sweeprun plot``: each run's curve of one metric, from its metrics in the store.

matplotlib is an optional extra (``pip install 'sweeprun[plot]'``), imported only here and
only when a plot is drawn; the figure is rendered off-screen (Agg), so it works over SSH,
in CI and in a notebook's terminal alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import SpecError, StoreError, SweeprunError
from .numbers import finite
from .store import read_regular
from .training.checkpoints import warn
from .training.metrics import METRICS_MAX_BYTES, parse_entries

if TYPE_CHECKING:
    from .sweep import Sweep

#: Values (and steps) drawn at most this far from 0: matplotlib cannot lay out an axis whose
#: span overflows a float (-1e308 .. 1e308), so points past it are left out, with a warning.
ABS_MAX = 1e300


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


def _points(entries: list[dict[str, Any]], metric: str) -> tuple[list[float], list[float], int]:
    """The finite points of ``metric`` (x: the step, or the line's index without one), and how
    many were left out for lying past :data:`ABS_MAX`."""
    xs, ys, beyond = [], [], 0
    for i, entry in enumerate(entries):
        value = finite(entry.get(metric))
        if value is None:
            continue
        step = finite(entry.get("step"))
        x = step if step is not None else float(i)
        if abs(value) > ABS_MAX or abs(x) > ABS_MAX:
            beyond += 1
            continue
        xs.append(x)
        ys.append(value)
    return xs, ys, beyond


def _run_metrics(sweep: Sweep) -> dict[str, list[dict[str, Any]]]:
    """Every run's metrics entries, found from one listing of the sweep's folder (no request
    per run that has none); only regular files are read, never a named pipe. A file that
    cannot be read is one warning, and its run is drawn without it."""
    fs = sweep.store.fs
    listing = sweep.paths.listing()
    out: dict[str, list[dict[str, Any]]] = {}
    for run in sweep.runs:
        path = sweep._metrics_path(run.run_id, listing.get(run.run_id, {}))
        if path is None:
            continue  # not started yet
        try:
            blob = read_regular(fs, path, METRICS_MAX_BYTES, tail=True)
        except StoreError as exc:
            warn(f"{exc}; run {run.run_id} is left out of the plot")
            continue
        if len(blob) == METRICS_MAX_BYTES:
            warn(f"{path} is larger than {METRICS_MAX_BYTES} bytes; only its end is drawn")
            blob = blob[blob.find(b"\n") + 1:]
        out[run.run_id] = parse_entries(blob, path)
    return out


def plot_sweep(sweep: Sweep, metric: str, out: str, by: str | None = None,
               log_y: bool = False) -> Plotted:
    """Draw every run's ``metric`` against its step into the PNG ``out``, one colour per
    value of the parameter ``by`` (or per run). Reads the store only; writes only ``out``."""
    varying = sweep.spec.varying()
    if by is not None and by not in sweep.runs[0].params:
        raise SpecError(f"--by {by!r} is not a parameter of sweep {sweep.spec.name}; "
                        f"choose one of: {', '.join(varying) or ', '.join(sweep.runs[0].params)}")
    curves: list[tuple[str, Any, list[float], list[float]]] = []
    skipped: list[str] = []
    seen_metrics: set[str] = set()
    beyond = 0
    metrics = _run_metrics(sweep)
    for run in sweep.runs:
        entries = metrics.get(run.run_id, [])
        for entry in entries[-50:]:
            seen_metrics.update(k for k, v in entry.items() if k != "step" and finite(v) is not None)
        xs, ys, left_out = _points(entries, metric)
        beyond += left_out
        if not xs:
            skipped.append(run.run_id)
            continue
        curves.append((run.run_id, run.params.get(by) if by else None, xs, ys))
    if beyond:
        warn(f"left out {beyond} point(s) of {metric!r} beyond ±{ABS_MAX:g} (or at a step "
             "beyond it), which a plot cannot draw")
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
