"""The ``sweeprun`` command: parse flags, call the library, render, exit code.

Exit codes (SPEC): 0 all runs done; 1 some run failed for good; 2 bad input,
printed as one line with no traceback; 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import math
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import settings
from .errors import SpecError, SweeprunError
from .limits import RANGES
from .redact import print_json, redact, redacted_console

if TYPE_CHECKING:
    from .slurm.submit import Task
    from .spec import SweepSpec

# Everything else (rich, fsspec, the ledger, the runner) is imported by the command that
# uses it: `sweeprun --help` must answer at once (issue 11: under 0.15 s), and a typo in a
# flag is an error before any of it loads.

try:  # typer >= 0.20 vendors its own click; older releases use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import ClickException  # type: ignore[no-redef]

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Idempotent hyperparameter sweeps: run the same command again after any interruption.")

SweepFile = Annotated[Path, typer.Argument(help="The sweep file (YAML).", show_default=False, metavar="SWEEP.yaml")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="Store path or fsspec URL; overrides the file.")]
LedgerOpt = Annotated[str | None, typer.Option(
    "--ledger", help="A SQLite file on local disk or a postgresql:// URL; overrides SWEEPRUN_LEDGER "
                     "and the file (default: a SQLite file per store under $SWEEPRUN_HOME, "
                     "~/.local/state/sweeprun).")]
GraceOpt = Annotated[float | None, typer.Option(
    "--grace-s", min=RANGES["grace_s"][0], max=RANGES["grace_s"][1],
    help="Seconds a run gets to checkpoint and exit after SIGTERM (default 30).")]
LeaseOpt = Annotated[float | None, typer.Option(
    "--lease-s", min=RANGES["lease_s"][0], max=RANGES["lease_s"][1],
    help="Seconds a claim lives without a heartbeat before another worker may take it (default 60).")]
AttemptsOpt = Annotated[int | None, typer.Option(
    "--max-attempts", min=RANGES["max_attempts"][0], max=RANGES["max_attempts"][1],
    help="Real failures before a run is marked failed; overrides the file.")]
TimeLimitOpt = Annotated[str | None, typer.Option(
    "--time-limit", metavar="DURATION",
    help="This worker must be gone after DURATION (11h, 90m, 1h30m, seconds): it stops claiming "
         "in time and its runs checkpoint and exit before it. Exit 75 if runs remain.")]
MoveLedgerOpt = Annotated[bool, typer.Option(
    "--move-ledger", help="The sweep is coordinated by another ledger: move it to this one "
                          "(stop its workers first, `sweeprun stop`).")]
NoticeOpt = Annotated[str | None, typer.Option(
    "--notice", metavar="PROVIDER[=URL]",
    help="On a spot VM: watch the provider's termination notice (aws, gcp, azure; =URL for "
         "another metadata endpoint); on one, the runs save at once and the worker drains.")]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", "-w", min=RANGES["workers"][0], max=RANGES["workers"][1], help="Runs in parallel on this machine.")]


def _spec(path: Path, **overrides: object) -> SweepSpec:
    from .spec import load_spec

    return load_spec(path).with_overrides(**overrides)


def _parse_gpus(gpus: str | None) -> list[str] | None:
    if gpus is None:
        return None
    items = [g.strip() for g in gpus.split(",")]
    # ASCII digits only: str.isdigit() also accepts '²', which no CUDA runtime understands.
    if not items or any(not re.fullmatch(r"[0-9]{1,6}", g) for g in items):
        raise SpecError(f"--gpus {gpus!r}: give GPU indices separated by commas, e.g. --gpus 0,1")
    if len(set(items)) != len(items):
        raise SpecError(f"--gpus {gpus!r} names a GPU twice")
    if len(items) > RANGES["workers"][1]:
        raise SpecError(f"--gpus names {len(items)} GPUs; at most {RANGES['workers'][1]:g} slots run at once")
    return items


def _launch(spec: SweepSpec, ledger: str | None, workers: int, gpus: str | None,
            time_limit: str | None = None, move_ledger: bool = False, task: Task | None = None,
            notice: str | None = None) -> int:
    """Run the sweep's worker here; ``task``: as a SLURM array task (one lane, requeued on
    SLURM's warning, the missing jobs submitted when it ends)."""
    from rich.console import Console

    from .fleet import parse_duration
    from .notices import parse_notice
    from .ranks import check_launchable
    from .runner import Launcher, LaunchOptions
    from .sweep import Sweep

    gpu_list = _parse_gpus(gpus)
    limit_s = parse_duration(time_limit) if time_limit is not None else None
    watch = parse_notice(notice) if notice is not None else None
    check_launchable(spec, gpu_list)
    sweep = Sweep(spec, ledger)
    if task is not None:
        why = task.check(sweep)
        if why is not None:
            print(f"[sweeprun] {spec.name}: {why}", flush=True)
            return 0
    led = sweep.prepare(move_ledger=move_ledger)
    console = Console(stderr=False)
    try:
        done = len(sweep.done_at_start)
        from .render import make_events

        options = LaunchOptions(workers=workers, gpus=gpu_list, time_limit_s=limit_s, notice=watch)
        if task is not None:
            options = task.begin(sweep, led, options)
        events = make_events(console, len(sweep.runs), done)
        try:
            launcher = Launcher(sweep, led, options, events)
            result = launcher.run()
        finally:
            events.close()
        code = result.exit_code if task is None else task.end(sweep, led, launcher, result)
    finally:
        led.close()
    summary = ", ".join(f"{n} {s}" for s, n in sorted(result.states.items()))
    console.print(f"[sweeprun] {spec.name}: {summary}; {result.started} process(es) started; "
                  f"exit {code}", markup=False, highlight=False)
    return code


@app.command()
def launch(
    sweep_file: SweepFile,
    workers: WorkersOpt = 1,
    gpus: Annotated[str | None, typer.Option(
        "--gpus", help="Comma-separated GPU indices: each run takes nproc of them, listed in its CUDA_VISIBLE_DEVICES.")] = None,
    store: StoreOpt = None, ledger: LedgerOpt = None, grace_s: GraceOpt = None,
    lease_s: LeaseOpt = None, max_attempts: AttemptsOpt = None, time_limit: TimeLimitOpt = None,
    move_ledger: MoveLedgerOpt = False, notice: NoticeOpt = None,
    on: Annotated[str | None, typer.Option(
        "--on", metavar="slurm", help="Submit the sweep to a scheduler instead (slurm: requeueable "
                                      "array jobs, set in the file's slurm: section) and return.")] = None,
) -> None:
    """Run every run that is not done: skip done, resume interrupted, retry failed.

    Safe to start several times at once; after any interruption, run the same command again.
    """
    spec = _spec(sweep_file, store=store, ledger=ledger, grace_s=grace_s, lease_s=lease_s,
                 max_attempts=max_attempts)
    if on is not None:
        if on != "slurm":
            raise SpecError(f"--on {on!r}: the scheduler sweeprun submits to is slurm (--on slurm)")
        here = {"--workers": workers != 1, "--gpus": gpus, "--time-limit": time_limit, "--notice": notice}
        if any(here.values()):
            raise SpecError(f"--on slurm with {', '.join(k for k, v in here.items() if v)}: those are for a "
                            "worker on this machine; a SLURM task's are set in the file's slurm: section "
                            "(cpus_per_task, gpus_per_run, time)")
        from .slurm.submit import launch_on_slurm

        overrides = _task_overrides(spec, grace_s, lease_s, max_attempts)
        for line in launch_on_slurm(spec, ledger, str(sweep_file), overrides, move_ledger):
            print(f"[sweeprun] {spec.name}: {line}", flush=True)
        raise typer.Exit(0)
    raise typer.Exit(_launch(spec, ledger, workers, gpus, time_limit, move_ledger, notice=notice))


def _task_overrides(spec: SweepSpec, grace_s: float | None, lease_s: float | None,
                    max_attempts: int | None) -> list[str]:
    """The flags a SLURM task is started with: the store as resolved here (a task runs on
    another node, maybe in another folder), and the settings given on this command line. A
    ``--ledger`` given here reaches the tasks in their environment (``SWEEPRUN_LEDGER``), never
    in their command line, which ``ps`` and ``scontrol`` show; the file's is read by each task."""
    given = {"--grace-s": grace_s, "--lease-s": lease_s, "--max-attempts": max_attempts}
    return [f"--store={spec.store}", *(f"{k}={v}" for k, v in given.items() if v is not None)]


@app.command("slurm-task", hidden=True)
def slurm_task(
    sweep_file: SweepFile,
    lane: Annotated[str, typer.Option("--lane", help="main or fallback.")] = "main",
    sweep_id: Annotated[str, typer.Option("--sweep-id", help="The id the store must hold.")] = "",
    stop_seen: Annotated[str, typer.Option("--stop-seen", help="The stop request current at submission.")] = "none",
    store: StoreOpt = None, grace_s: GraceOpt = None, lease_s: LeaseOpt = None,
    max_attempts: AttemptsOpt = None,
) -> None:
    """One array task of a sweep submitted with `launch --on slurm` (run by its batch script)."""
    from .slurm.submit import Task

    spec = _spec(sweep_file, store=store, grace_s=grace_s, lease_s=lease_s, max_attempts=max_attempts)
    task = Task(spec, lane, str(sweep_file), _task_overrides(spec, grace_s, lease_s, max_attempts),
                ident=sweep_id, stop_seen=None if stop_seen == "none" else stop_seen)
    try:
        code = _launch(spec, None, 1, task.gpus(), None, False, task=task)
    except SweeprunError as exc:
        _error(str(exc))
        code = task.failed(exc)
    raise typer.Exit(code)


@app.command()
def worker(
    sweep_file: SweepFile,
    workers: WorkersOpt = 1,
    gpus: Annotated[str | None, typer.Option("--gpus", help="Comma-separated GPU indices; each run takes nproc of them.")] = None,
    store: StoreOpt = None, ledger: LedgerOpt = None, grace_s: GraceOpt = None,
    lease_s: LeaseOpt = None, max_attempts: AttemptsOpt = None, time_limit: TimeLimitOpt = None,
    move_ledger: MoveLedgerOpt = False, notice: NoticeOpt = None,
) -> None:
    """Join a running sweep as one more worker, from a second notebook, a VM or a SLURM task.

    With nothing to claim it waits while runs are held elsewhere (a lost one may need it)
    and exits when the sweep is settled.
    """
    spec = _spec(sweep_file, store=store, ledger=ledger, grace_s=grace_s, lease_s=lease_s,
                 max_attempts=max_attempts)
    raise typer.Exit(_launch(spec, ledger, workers, gpus, time_limit, move_ledger, notice=notice))


@app.command()
def stop(sweep_file: SweepFile, store: StoreOpt = None) -> None:
    """Drain every worker of this sweep, on every machine: their runs checkpoint and exit.

    Workers look for the request every few seconds; they then exit 75, and running the
    same launch or worker command later resumes the sweep.
    """
    from .fleet import StopRequests
    from .sweep import Sweep

    spec = _spec(sweep_file, store=store)
    sweep = Sweep(spec)
    sweep.store.check_writable()
    StopRequests(sweep.paths).request()
    print(f"[sweeprun] {spec.name}: asked every running worker to checkpoint its runs and exit",
          flush=True)
    from .slurm.submit import cancel

    said = cancel(sweep)
    if said is not None:
        print(f"[sweeprun] {spec.name}: {said}", flush=True)


@app.command()
def status(
    sweep_file: SweepFile,
    store: StoreOpt = None, ledger: LedgerOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")] = False,
    every: Annotated[bool, typer.Option("--all", help="List every run, however many.")] = False,
) -> None:
    """Show each run's state, attempts, progress, checkpoint age and worker. Writes nothing.

    A sweep of more runs than fit a screen shows a summary and the runs that need
    attention (failed, running, interrupted); --all or --json gives every run."""
    from .sweep import Sweep

    spec = _spec(sweep_file, store=store, ledger=ledger)
    sweep = Sweep(spec, ledger, ephemeral_ok=True)
    if as_json:
        rows = sweep.status()  # reading writes nothing anywhere
        print_json([_finite(r.as_json()) for r in rows], row_per_line=True)
        return
    from rich.console import Console
    from rich.markup import escape

    from .render import SCREEN_ROWS, attention, status_table

    title = escape(redact(f"sweep {spec.name} · {spec.store}"))  # before rich wraps it
    if every or len(sweep.runs) <= SCREEN_ROWS:
        Console().print(status_table(sweep.status(), title=title))
    else:
        rows = sweep.status(summary=True)
        Console().print(status_table(sweep.with_progress(attention(rows)), title=title, everything=rows))
    from .slurm.submit import status_line

    line = status_line(sweep)
    if line is not None:
        print(line, flush=True)


# -- show, reset, gc (issue 12): one run up close, and changing a sweep after the fact ----------

DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Say what would be done; change nothing.")]


@app.command()
def show(
    sweep_file: SweepFile,
    run: Annotated[str, typer.Argument(help="A run id, or any unique part of it (the hash status prints).",
                                       show_default=False, metavar="RUN")],
    store: StoreOpt = None, ledger: LedgerOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")] = False,
) -> None:
    """Show one run: params, every attempt, checkpoints (verified or not), last metrics, log tail.

    Writes nothing."""
    from .manage import resolve_run, run_detail
    from .sweep import Sweep

    spec = _spec(sweep_file, store=store, ledger=ledger)
    sweep = Sweep(spec, ledger, ephemeral_ok=True)
    sweep.store.check_present()
    detail = run_detail(sweep, resolve_run(sweep, run))
    if as_json:
        print_json(_finite({**detail.as_json(), "nproc": detail.row.nproc}), indent=1)
        return
    from rich.console import Console

    from .render import run_view

    Console(highlight=False).print(run_view(detail))


@app.command()
def reset(
    sweep_file: SweepFile,
    runs: Annotated[list[str] | None, typer.Argument(
        help="Run ids, or unique parts of them.", show_default=False, metavar="[RUN]...")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every run that failed for good.")] = False,
    dry_run: DryRunOpt = False,
    delete: Annotated[bool, typer.Option(
        "--delete", help="Delete their old results instead of keeping them in <sweep>/trash/.")] = False,
    store: StoreOpt = None, ledger: LedgerOpt = None,
) -> None:
    """Make runs run again from the start at the next launch.

    Their old folders are kept aside in <sweep>/trash/<run id>-<time>/ (or deleted with
    --delete). Refuses while one of them is running."""
    from .manage import reset as reset_runs
    from .sweep import Sweep

    spec = _spec(sweep_file, store=store, ledger=ledger)
    report = reset_runs(Sweep(spec, ledger), runs or [], failed=failed, dry_run=dry_run, delete=delete,
                        note=_note)
    if not report.run_ids:
        print(f"[sweeprun] {spec.name}: no failed runs; nothing to reset", flush=True)
        return
    verb = "would reset" if dry_run else "reset"
    for run_id, dest in report.moved.items():
        if run_id not in report.had_folder:
            where = "it had no folder; its failures are forgotten"
        else:
            where = f"old results kept in {dest}" if dest else "its folder deleted"
        print(f"[sweeprun] {verb} {run_id}: {where}", flush=True)
    if not dry_run:
        print(f"[sweeprun] {spec.name}: {len(report.run_ids)} run(s) pending; the next launch runs them",
              flush=True)


@app.command()
def gc(
    sweep_file: SweepFile,
    dry_run: DryRunOpt = False,
    best: Annotated[str | None, typer.Option(
        "--best", help="Keep the best checkpoint by this metric (default: by the metric the script "
                       "chose; for checkpoints from before sweeprun recorded it, by every metric, "
                       "lowest and highest).")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="With --best: min or max (default: both).")] = None,
    damaged: Annotated[bool, typer.Option(
        "--damaged", help="Also remove Trainer checkpoint folders that never sealed or do not verify, "
                          "and .sweeprun-rejected/ (kept by default: they show what went wrong).")] = False,
    store: StoreOpt = None, ledger: LedgerOpt = None,
) -> None:
    """Free space in done runs: checkpoints beyond the latest and the best, stray temp files.

    Keeps what load_checkpoint(run, "latest") and load_checkpoint(run, "best") load (the
    best as the script chose it), and in a Hugging Face Trainer run the newest sealed
    folder that verifies and the Trainer's best. Refuses while one of those runs is still held."""
    from .manage import gc as collect
    from .render import format_bytes
    from .sweep import Sweep

    if mode is not None and mode not in ("min", "max"):
        raise SpecError(f"--mode {mode!r}: give min or max")
    spec = _spec(sweep_file, store=store, ledger=ledger)
    report = collect(Sweep(spec, ledger), dry_run=dry_run, best=best, mode=mode, damaged=damaged, note=_note)
    verb = "would remove" if dry_run else "removed"
    for item in report.runs:
        what = []
        if item.checkpoints:
            what.append(f"{len(item.checkpoints)} checkpoint(s)")
        if item.temp_files:
            what.append(f"{len(item.temp_files)} temp file(s)")
        print(f"[sweeprun] {item.run_id}: {verb} {' and '.join(what) or 'nothing'} "
              f"({format_bytes(item.bytes_freed)}); kept {', '.join(item.kept) or 'none'}", flush=True)
        if item.damaged:
            print(f"[sweeprun] {item.run_id}: left {', '.join(item.damaged)} (damaged or set aside; "
                  "look inside, then --damaged removes them)", flush=True)
    print(f"[sweeprun] {spec.name}: {verb} {report.files} file(s), "
          f"{'would free' if dry_run else 'freed'} {format_bytes(report.bytes_freed)}", flush=True)


def _note(message: str) -> None:
    """What a command is waiting for, on stderr (its results go to stdout)."""
    print(f"[sweeprun] {message}", file=sys.stderr, flush=True)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``: JSON has no spelling for them, and scripts choke on ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- verify (issue 12) ----------------------------------------------------------------------

@app.command()
def plot(
    sweep_file: SweepFile,
    metric: Annotated[str, typer.Option("--metric", "-m", help="The metric to draw, as the script logs it.")] = "loss",
    by: Annotated[str | None, typer.Option("--by", help="One colour per value of this parameter.")] = None,
    out: Annotated[Path, typer.Option("--output", "-o", help="The PNG to write.")] = Path("curves.png"),
    log_y: Annotated[bool, typer.Option("--log-y", help="A logarithmic y axis.")] = False,
    store: StoreOpt = None,
) -> None:
    """Draw each run's curve of one metric into a PNG (needs the plot extra: matplotlib)."""
    from .plot import plot_sweep
    from .sweep import Sweep

    spec = _spec(sweep_file, store=store)
    result = plot_sweep(Sweep(spec, None, ephemeral_ok=True), metric, str(out), by=by, log_y=log_y)
    skipped = f"; {len(result.skipped)} run(s) have not logged it yet" if result.skipped else ""
    print(f"wrote {result.path}: {result.lines} run(s){skipped}")


@app.command()
def report(
    sweep_file: SweepFile,
    out: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the page to this local file instead of the sweep's folder.")] = None,
    store: StoreOpt = None, ledger: LedgerOpt = None,
) -> None:
    """Write one self-contained HTML page of the sweep (table, parameters against a metric,
    curves, each run's attempts) into its folder in the store, and print where. Opens offline
    (needs the ui extra: plotly)."""
    from .report import write_report
    from .sweep import Sweep

    spec = _spec(sweep_file, store=store, ledger=ledger)
    written = write_report(Sweep(spec, ledger, ephemeral_ok=True), None if out is None else str(out))
    print(f"wrote {redact(written.url)}: {written.runs} run(s), {written.size / 1e6:.1f} MB")


@app.command()
def ui(
    sweep_file: SweepFile,
    host: Annotated[str, typer.Option("--host", help="The address to serve on (loopback unless you say otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="The port (0: any free one).")] = 8765,
    store: StoreOpt = None, ledger: LedgerOpt = None,
) -> None:
    """Serve the report's page live, read-only, until Ctrl-C: it redraws as runs progress."""
    from .report import collect
    from .report.serve import make_server
    from .sweep import Sweep

    spec = _spec(sweep_file, store=store, ledger=ledger)
    sweep = Sweep(spec, ledger, ephemeral_ok=True)
    sweep.store.check_present()
    try:
        server = make_server(lambda: collect(sweep), host=host, port=port)
    except OSError as exc:
        raise SweeprunError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"serving sweep {redact(spec.name)} on http://{shown}:{server.server_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()            # Ctrl-C: exit 130, as every command
    finally:
        server.server_close()


@app.command(context_settings={"allow_interspersed_args": False})
def verify(
    command: Annotated[list[str], typer.Argument(
        help="The training command, after --; {run_dir} in it becomes the run directory.",
        show_default=False, metavar="-- COMMAND")] = [],  # noqa: B006 - typer reads it, never mutated
    seed: Annotated[int, typer.Option("--seed", help="Fixes the steps the kills land at.")] = 0,
    kills: Annotated[int, typer.Option("--kills", min=1, max=50,
                                       help="Interruptions: SIGTERM, SIGKILL, SIGTERM, ...")] = 2,
    atol: Annotated[float, typer.Option("--atol", min=0.0, help=(
        "Allowed absolute difference, for nondeterministic GPU kernels (default: bit for bit)."))] = 0.0,
    ignore: Annotated[list[str], typer.Option("--ignore", metavar="METRIC", help=(
        "A metric not to compare (repeatable); metrics named like time, *_s, *_per_second "
        "never are."))] = [],  # noqa: B006
    keep: Annotated[bool, typer.Option("--keep", help="Keep both run directories, even when exact.")] = False,
    timeout_s: Annotated[float | None, typer.Option("--timeout-s", metavar="SECONDS", help=(
        "Seconds any one attempt may run before it is killed with its processes, the "
        "uninterrupted run's too. Default: no bound for the uninterrupted run, and for each "
        "attempt of the interrupted one 3x the uninterrupted run's time, at least 60 s. An "
        "interrupted attempt past it is NOT EXACT (exit 1); the uninterrupted run past it, "
        "exit 2."), show_default=False)] = None,
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, max=1024, metavar="N", help=(
        "Run the script as N ranks through torchrun, as nproc: N in a sweep file."),
        show_default=False)] = None,
    resume_nproc: Annotated[int | None, typer.Option("--resume-nproc", min=1, max=1024, metavar="N", help=(
        "Resume the interrupted run at another world size: the verdict names what cannot be "
        "exact then (RNG states, data position)."), show_default=False)] = None,
) -> None:
    """Check that a training script resumes exactly: run it uninterrupted, then again under kills.

    Both runs are standalone, in a temporary directory given as SWEEPRUN_RUN_DIR. The
    second is SIGTERMed and SIGKILLed at random steps and re-run until it finishes; the
    endings are compared (every tensor of the final checkpoint, every metrics line) and
    the verdict names what was not restored. Exit 0 exact, 1 not, 2 bad input or an
    uninterrupted run that fails. Give it a short configuration: it trains twice.
    """
    from .verify import verify as run_verify

    def say(line: str) -> None:
        print(f"[verify] {line}", flush=True)

    report = run_verify(command, seed=seed, kills=kills, atol=atol, ignore=ignore, keep=keep,
                        timeout_s=timeout_s, nproc=nproc, resume_nproc=resume_nproc, say=say)
    for line in report.lines:
        print(line, flush=True)
    raise typer.Exit(report.exit_code)


def main(argv: list[str] | None = None) -> int:
    """Entry point: every user mistake becomes one line on stderr and exit code 2; Ctrl-C
    at any moment, even while an error is being printed, is exit 130 and no traceback.
    Everything the command prints passes the redactor (the console is one of its exits),
    a bug's traceback too: it is printed here, exit 1, while the redacting streams are still
    in place (the interpreter would print it after they are gone)."""
    try:
        with redacted_console():
            try:
                return _main(argv)
            except Exception:
                if sys.stderr is not None:  # print_exc would fall back to stdout
                    traceback.print_exc(file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        return 130


def _main(argv: list[str] | None) -> int:
    command = typer.main.get_command(app)
    try:
        settings.check()  # a bad SWEEPRUN_* value is refused now, not by a worker mid-sweep
        rc = command.main(args=argv, prog_name="sweeprun", standalone_mode=False)
    except SweeprunError as exc:
        _error(str(exc))
        return 2
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `sweeprun`: the help, as written
            sys.stderr.write(exc.format_message() + "\n")
        else:
            _error(exc.format_message())
        return 2
    except (typer.Abort, KeyboardInterrupt):
        # Ctrl-C before the launcher's own handlers exist (loading a big sweep, opening
        # the store): nothing was started, so the exit code says "interrupted" and no more.
        return 130
    return rc if isinstance(rc, int) else 0


def _error(message: str) -> None:
    """One red line on stderr. Redacted here too, before rich lays it out: the line is
    printed before :func:`main`'s redacting streams exist when a test calls this directly,
    and a URL that rich wraps would no longer look like one."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[red]error:[/] {escape(redact(' '.join(message.split())))}")


if __name__ == "__main__":
    raise SystemExit(main())
