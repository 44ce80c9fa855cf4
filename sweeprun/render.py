"""Rows and events to rich tables, live progress or plain lines. Decides nothing."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, ConsoleOptions, Group
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .ledger import RunState
from .redact import redact
from .sweep import StatusRow

if TYPE_CHECKING:
    from .manage import RunDetail

STATE_STYLE = {RunState.PENDING: "dim", RunState.RUNNING: "cyan", RunState.INTERRUPTED: "yellow",
               RunState.FAILED: "red", RunState.DONE: "green", RunState.DIVERGED: "magenta"}


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if not math.isfinite(seconds):  # an age from a file's time of 1e308 or NaN
        return "?"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


#: Eight heights of a text sparkline, lowest first.
SPARK_CHARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float]) -> str:
    """``values`` as a row of block characters scaled between their min and max; non-finite
    points (a diverged loss) are a space. One point, or a flat series, is a flat line."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    top = len(SPARK_CHARS) - 1
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(" ")
        elif high == low:
            out.append(SPARK_CHARS[top // 2])
        else:
            # high - low of finite values may overflow (-1e308 .. 1e308): then halve both sides.
            frac = ((v - low) / (high - low) if math.isfinite(high - low)
                    else (v / 2 - low / 2) / (high / 2 - low / 2))
            out.append(SPARK_CHARS[round(frac * top)])
    return "".join(out)


class Sparkline:
    """A sparkline cell that gives way in a narrow table: it asks for one column per point
    and draws the latest points that fit the width it gets (at least :attr:`MIN_POINTS`)."""

    MIN_POINTS = 5

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(len(self.values), self.MIN_POINTS), len(self.values))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Any:
        yield Text(sparkline(self.values[-max(1, options.max_width):]), no_wrap=True)


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover - the loop returns


def totals_line(rows: Sequence[StatusRow]) -> str:
    counts = Counter(r.state for r in rows)
    parts = [f"{counts[s]} {s.value}" for s in RunState if counts[s]]
    return f"{len(rows)} runs: " + ", ".join(parts)


#: More rows than this and ``status`` shows a summary and the runs that need attention.
SCREEN_ROWS = 40

#: What a user should look at first: in this order, before the rest.
_ATTENTION = (RunState.FAILED, RunState.DIVERGED, RunState.RUNNING, RunState.INTERRUPTED)


def attention(rows: Sequence[StatusRow], limit: int = SCREEN_ROWS) -> list[StatusRow]:
    """The rows worth a line when there are too many for a screen: failed, running,
    interrupted and contested runs (in that order), at most ``limit``. The others are
    counted in the caption (see :func:`status_table`)."""
    picked = [r for state in _ATTENTION for r in rows if r.state is state]
    picked += [r for r in rows if r.contested and r.state not in _ATTENTION]
    return picked[:limit]


def status_table(rows: Sequence[StatusRow], title: str, everything: Sequence[StatusRow] | None = None) -> Table:
    """``rows`` as a table; ``everything`` (all rows, when only some are shown) makes the
    caption count them all and say how to see the rest."""
    # Nothing needs attention in a big sweep: the title and the counts say it all.
    quiet = not rows and everything is not None
    table = Table(title=title, title_justify="left", box=None if quiet else box.HEAVY_HEAD,
                  show_header=not quiet)
    # The run column shows the id's hash (the readable part repeats the params column);
    # `status --json` has the full folder names.
    table.add_column("run", no_wrap=True)
    # The world size, only in a sweep that has runs of several processes: one row per run,
    # however many ranks it has.
    procs = any(r.nproc > 1 for r in [*rows, *(everything or ())])
    for name in ("params", *(("procs",) if procs else ()), "state", "attempts", "progress", "ckpt age", "worker"):
        table.add_column(name, overflow="fold")
    # The shown metric's last points, one character each; the column appears only when a
    # run has two points or more, and never wraps (a folded sparkline reads as two).
    trends = any(r.metric and len(r.trend) > 1 for r in rows)
    if trends:
        table.add_column("trend")
    for r in rows:
        progress = progress_text(r.step, r.metric)
        extra = [Sparkline(r.trend) if r.metric and len(r.trend) > 1 else ""] if trends else []
        # As max_attempts counts them: real failures of the allowed number. Starts that
        # ended in a preemption or a lost machine cost nothing (`status --json` has them).
        attempts = f"{r.failures}/{r.max_attempts} failed"
        resumed = r.approximate_resume
        if resumed is not None:  # the caption explains the mark; `show` tells the whole resume
            mark = f"~resumed {resumed.saved_world_size}→{resumed.world_size or '?'} procs"
            progress = mark if progress == "-" else f"{progress} {mark}"
        if r.rollbacks is not None and r.rollbacks.count:
            mark = f"↺{r.rollbacks.count}"
            progress = mark if progress == "-" else f"{progress} {mark}"
        table.add_row(escape(r.run_id.rsplit("-", 1)[-1]), escape(" ".join(f"{k}={_value(v)}" for k, v in r.params.items())),
                      *((str(r.nproc),) if procs else ()), f"[{STATE_STYLE[r.state]}]{r.state.value}[/]", attempts, escape(progress),
                      format_age(r.checkpoint_age_s),
                      escape(r.worker or "-") + (f" ({escape(r.job)})" if r.job else "")
                      + (" [red]lease contested[/]" if r.contested else ""), *extra)
    table.caption = totals_line(everything if everything is not None else rows)
    if everything is not None and len(everything) > len(rows):
        listed = {r.run_id for r in rows}
        hidden = Counter(r.state for r in everything if r.run_id not in listed)
        what = ", ".join(f"{hidden[s]} {s.value}" for s in RunState if hidden[s])
        table.caption += (f"\n{sum(hidden.values())} runs not listed ({what}); "
                          "`status --all` lists every run")
    if any(r.approximate_resume for r in rows):
        table.caption += ("\n~resumed a→b procs: the run resumed a checkpoint saved at another world "
                          "size and goes on from it; model and optimizer exact, RNG and data position "
                          "approximate (`sweeprun show RUN`)")
    if any(r.rollbacks and r.rollbacks.count for r in rows):
        table.caption += ("\n↺n: the run rolled back n times after a loss spike (`sweeprun show RUN`); "
                          "from its first rollback on it is not bit-exact with a run that never spiked")
    if any(r.state is RunState.DIVERGED for r in rows):
        table.caption += ("\ndiverged: its loss spiked again after its last allowed rollback; relaunching "
                          "skips it; `sweeprun reset RUN` starts it over")
    if any(r.contested for r in rows):
        table.caption += ("\nlease contested: two machines claimed one run at once and the store showed "
                          "it late; it may have run twice. Raise `lease_settle_s:` in the sweep file, "
                          "or use a bucket or a PostgreSQL ledger")
    table.caption_justify = "left"
    return table


#: How an attempt ended, in words, by the ledger's outcome.
_OUTCOME = {"done": "done", "interrupted": "interrupted (resumable)", "failed": "failed",
            "lost": "lost with its worker", "lost-limit": "failed: lost with its worker too often",
            "rolled-back": "rolled back (loss spike)", "diverged": "diverged (loss spike past max_rollbacks)",
            "oom": "out of memory"}


def format_time(t: float | None) -> str:
    if t is None:
        return "-"
    try:  # a time read from a file in the store may be 1e308 or NaN
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return "?"


def run_view(detail: RunDetail) -> Group:
    """``sweeprun show``: the run's state and params, then its attempts, checkpoints, last
    metrics and the tail of its newest log, each under a heading."""
    row = detail.row
    parts: list[Any] = []
    head = Text.assemble(("run ", "bold"), (row.run_id, "bold"), " · ",
                         (row.state.value, STATE_STYLE[row.state]))
    if row.worker:
        head.append(f" on {row.worker}")
    if row.nproc > 1:
        head.append(f" · {row.nproc} processes (torchrun)")
    parts.append(head)
    parts.append(Text("params: " + (" ".join(f"{k}={_value(v)}" for k, v in detail.params.items()) or "-")))

    attempts = Table(title=f"attempts (from the {detail.attempts_from})", title_justify="left",
                     box=box.SIMPLE_HEAD)
    # The world size each attempt ran at, where the training API recorded it.
    procs = any(s.world_size for s in detail.started.values())
    for name in ("#", "worker", *(("procs",) if procs else ()), "started", "ended", "exit", "how it ended"):
        attempts.add_column(name, overflow="fold", no_wrap=name in ("started", "ended"))
    last = detail.attempts[-1].attempt if detail.attempts else None
    for a in detail.attempts:
        if a.outcome:
            how = _OUTCOME.get(a.outcome, a.outcome)
        elif a.attempt == last and row.state is RunState.RUNNING:
            how = "running"
        else:
            how = "-" if detail.attempts_from == "store" else "unknown"
        size = detail.started[a.attempt].world_size if a.attempt in detail.started else None
        attempts.add_row(str(a.attempt), escape(a.worker or "-"), *((str(size or "-"),) if procs else ()),
                         format_time(a.started_at),
                         format_time(a.ended_at), "-" if a.exit_code is None else str(a.exit_code), how)
    parts.append(attempts if detail.attempts else Text("attempts: none yet", style="dim"))
    for n, started in sorted(detail.started.items()):
        if started.resume is not None:
            parts.append(Text(f"attempt {n}: {started.resume.text()}", style="yellow"))
        elif started.problem is not None:
            parts.append(Text(f"attempt {n}: its start record did not read ({started.problem}); "
                              "its world size is not known", style="dim"))

    if detail.rollbacks:
        parts.append(Text("rollbacks (loss spikes; the run is not bit-exact with one that never spiked "
                          "from the first on)", style="bold"))
        for record in detail.rollbacks:
            parts.append(Text(f"  {record.number}. attempt {record.attempt}: {record.text()}",
                              style="magenta" if record.diverged else "yellow"))
    if detail.oom is not None:
        parts.append(Text(f"out of memory: {detail.oom}", style="red"))

    if detail.checkpoints:
        ckpts = Table(title="checkpoints", title_justify="left", box=box.SIMPLE_HEAD)
        for name in ("file", "step", "size", "age", "verified"):
            ckpts.add_column(name, overflow="fold")
        for c in detail.checkpoints:
            verified = "[green]yes[/]" if c.verified else f"[red]no[/]: {escape(c.problem or '')}"
            ckpts.add_row(escape(c.data), str(c.step), format_bytes(c.size),
                          format_age(detail.now - c.created), verified)
        parts.append(ckpts)
    else:
        parts.append(Text("checkpoints: none", style="dim"))

    if detail.metrics:
        parts.append(Text("last metrics", style="bold"))
        for entry in detail.metrics:
            parts.append(Text("  " + " · ".join(f"{k} {_value(v)}" for k, v in entry.items())))
    else:
        parts.append(Text("metrics: none yet", style="dim"))
    if detail.log:
        parts.append(Text(f"{detail.log} (last {len(detail.log_tail)} lines)", style="bold"))
        parts.extend(Text("  " + line) for line in detail.log_tail)
    return Group(*parts)


class PlainEvents:
    """One line per event, for logs and pipes (and the tests)."""

    wants_progress = False  # see LiveEvents

    def __init__(self, console: Console, total: int, done: int) -> None:
        self.console = console
        self.total = total
        self.done = done
        self._lock = threading.Lock()

    def _print(self, text: str) -> None:
        with self._lock:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def started(self, run_id: str, attempt: int, slot: int) -> None:
        self._print(f"[sweeprun] start {run_id} (attempt {attempt}, slot {slot})")

    def output(self, run_id: str, line: str) -> None:
        self._print(f"[{run_id}] {line}")

    def ended(self, run_id: str, attempt: int, state: RunState | None, exit_code: int | None,
              elapsed_s: float) -> None:
        if state is RunState.DONE:
            self.done += 1
        what = state.value if state else "lost the lease (another worker owns it)"
        self._print(f"[sweeprun] {run_id} {what} (exit {exit_code}, {elapsed_s:.1f} s) "
                    f"[{self.done}/{self.total} done]")

    def note(self, message: str) -> None:
        self._print(f"[sweeprun] {message}")

    def progress(self, run_id: str, step: int | None, metric: tuple[str, float] | None) -> None:
        """A running run's step and latest metric (from the launcher's heartbeat). Not a line
        of its own in logs: it would repeat every few seconds for every run."""

    def close(self) -> None:
        pass


def progress_text(step: int | None, metric: tuple[str, float] | None) -> str:
    """``step 120 · loss 0.5312`` as status shows it; ``-`` before the first step is logged."""
    if step is None:
        return "-"
    text = f"step {step}"
    if metric:
        text += f" · {metric[0]} {metric[1]:.4g}"
    return text


class _SweepProgress(Progress):
    """The sweep's bar with the running runs' progress below it, redrawn together."""

    def __init__(self, *columns: Any, runs_view: Any, **kwargs: Any) -> None:
        self._runs_view = runs_view  # first: the constructor draws once
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Any:
        yield self.make_tasks_table(self.tasks)
        view = self._runs_view()
        if view is not None:
            yield view


class LiveEvents(PlainEvents):
    """A progress bar for terminals: runs done of total, running, failed, ETA, and a line per
    running run with its step and latest metric; output scrolls above."""

    wants_progress = True

    #: Running runs listed under the bar; more are counted in one line.
    RUNS_SHOWN = 12

    def __init__(self, console: Console, total: int, done: int) -> None:
        super().__init__(console, total, done)
        self.running = 0
        self.failed = 0
        #: run id -> (attempt, step, metric) of each running run, in the order they started
        self.runs: dict[str, tuple[int, int | None, tuple[str, float] | None]] = {}
        # Not the print lock: the display's refresh thread reads the runs while holding the
        # console's, and a print holds the print lock while it waits for the console's.
        self._runs_lock = threading.Lock()
        self.bar = _SweepProgress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                                  console=console, transient=False, runs_view=self.runs_view)
        self.task = self.bar.add_task("runs", total=total, completed=done, detail="")
        self.started_at = time.monotonic()
        self.bar.start()

    def _refresh(self) -> None:
        self.bar.update(self.task, completed=self.done,
                        detail=f"{self.running} running · {self.failed} failed")

    def started(self, run_id: str, attempt: int, slot: int) -> None:
        with self._runs_lock:
            self.running += 1
            self.runs[run_id] = (attempt, None, None)
        self._refresh()
        super().started(run_id, attempt, slot)

    def progress(self, run_id: str, step: int | None, metric: tuple[str, float] | None) -> None:
        with self._runs_lock:
            if run_id in self.runs:  # a late report of a run that ended is dropped
                self.runs[run_id] = (self.runs[run_id][0], step, metric)
        self.bar.refresh()

    def ended(self, run_id: str, attempt: int, state: RunState | None, exit_code: int | None,
              elapsed_s: float) -> None:
        with self._runs_lock:
            self.running -= 1
            self.failed += state is RunState.FAILED
            self.runs.pop(run_id, None)
        super().ended(run_id, attempt, state, exit_code, elapsed_s)
        self._refresh()

    def runs_view(self) -> Table | None:
        """One line per running run: its id, attempt, step and latest metric."""
        with self._runs_lock:
            runs = list(self.runs.items())
        if not runs:
            return None
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True, overflow="ellipsis", max_width=60)
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)
        for run_id, (attempt, step, metric) in runs[:self.RUNS_SHOWN]:
            # redacted before rich cuts it to the column: a cut URL no longer looks like one
            table.add_row(escape(redact(run_id)), f"attempt {attempt}", escape(progress_text(step, metric)))
        if len(runs) > self.RUNS_SHOWN:
            table.add_row(f"… and {len(runs) - self.RUNS_SHOWN} more running", "", "")
        return table

    def close(self) -> None:
        self.bar.stop()


def make_events(console: Console, total: int, done: int) -> PlainEvents:
    return (LiveEvents if console.is_terminal else PlainEvents)(console, total, done)
