"""Rows and events to rich tables, live progress or plain lines. Decides nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .ledger import RunState
from .redact import redact
from .sweep import StatusRow

STATE_STYLE = {RunState.PENDING: "dim", RunState.RUNNING: "cyan", RunState.INTERRUPTED: "yellow",
               RunState.FAILED: "red", RunState.DONE: "green"}


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def totals_line(rows: Sequence[StatusRow]) -> str:
    counts = Counter(r.state for r in rows)
    parts = [f"{counts[s]} {s.value}" for s in RunState if counts[s]]
    return f"{len(rows)} runs: " + ", ".join(parts)


#: More rows than this and ``status`` shows a summary and the runs that need attention.
SCREEN_ROWS = 40

#: What a user should look at first: in this order, before the rest.
_ATTENTION = (RunState.FAILED, RunState.RUNNING, RunState.INTERRUPTED)


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
    for name in ("params", "state", "attempts", "progress", "ckpt age", "worker"):
        table.add_column(name, overflow="fold")
    for r in rows:
        progress = "-"
        if r.step is not None:
            progress = f"step {r.step}"
            if r.metric:
                progress += f" · {r.metric[0]} {r.metric[1]:.4g}"
        # As max_attempts counts them: real failures of the allowed number. Starts that
        # ended in a preemption or a lost machine cost nothing (`status --json` has them).
        attempts = f"{r.failures}/{r.max_attempts} failed"
        table.add_row(escape(r.run_id.rsplit("-", 1)[-1]), escape(" ".join(f"{k}={_value(v)}" for k, v in r.params.items())),
                      f"[{STATE_STYLE[r.state]}]{r.state.value}[/]", attempts, escape(progress),
                      format_age(r.checkpoint_age_s),
                      escape(r.worker or "-") + (" [red]lease contested[/]" if r.contested else ""))
    table.caption = totals_line(everything if everything is not None else rows)
    if everything is not None and len(everything) > len(rows):
        listed = {r.run_id for r in rows}
        hidden = Counter(r.state for r in everything if r.run_id not in listed)
        what = ", ".join(f"{hidden[s]} {s.value}" for s in RunState if hidden[s])
        table.caption += (f"\n{sum(hidden.values())} runs not listed ({what}); "
                          "`status --all` lists every run")
    if any(r.contested for r in rows):
        table.caption += ("\nlease contested: two machines claimed one run at once and the store showed "
                          "it late; it may have run twice. Raise `lease_settle_s:` in the sweep file, "
                          "or use a bucket or a PostgreSQL ledger")
    table.caption_justify = "left"
    return table


class PlainEvents:
    """One line per event, for logs and pipes (and the tests)."""

    def __init__(self, console: Console, total: int, done: int) -> None:
        self.console = console
        self.total = total
        self.done = done
        self._lock = threading.Lock()

    def _print(self, text: str) -> None:
        text = redact(text)  # a child may print its store URL; credentials stay out of logs
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

    def close(self) -> None:
        pass


class LiveEvents(PlainEvents):
    """A progress bar for terminals: runs done of total, running, failed, ETA; output scrolls above."""

    def __init__(self, console: Console, total: int, done: int) -> None:
        super().__init__(console, total, done)
        self.running = 0
        self.failed = 0
        self.progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.task = self.progress.add_task("runs", total=total, completed=done, detail="")
        self.started_at = time.monotonic()
        self.progress.start()

    def _refresh(self) -> None:
        self.progress.update(self.task, completed=self.done,
                             detail=f"{self.running} running · {self.failed} failed")

    def started(self, run_id: str, attempt: int, slot: int) -> None:
        self.running += 1
        self._refresh()
        super().started(run_id, attempt, slot)

    def ended(self, run_id: str, attempt: int, state: RunState | None, exit_code: int | None,
              elapsed_s: float) -> None:
        self.running -= 1
        self.failed += state is RunState.FAILED
        super().ended(run_id, attempt, state, exit_code, elapsed_s)
        self._refresh()

    def close(self) -> None:
        self.progress.stop()


def make_events(console: Console, total: int, done: int) -> PlainEvents:
    return (LiveEvents if console.is_terminal else PlainEvents)(console, total, done)
