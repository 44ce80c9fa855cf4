"""``sweeprun report`` on a finished sweep of 1,000 and 10,000 runs: time and file size,
against the page an Optuna user makes for the same number of trials.

The sweep is built directly, as ``benchmarks/relaunch.py`` builds it (every run folder with
params, a log, 20 metrics lines and ``DONE``; a SQLite ledger that knows them all), with one
attempt per run recorded in the ledger so the timeline has a bar per run. ``report`` is timed
as a fresh process (what a user waits for), with the size of the HTML it writes.

The peer: an Optuna study (in memory) with the same trials, each with 20 intermediate values,
and the figures a user would save to see it, ``plot_parallel_coordinate`` and
``plot_intermediate_values`` written with ``write_html(include_plotlyjs=True)`` (one file
each, as a page that opens offline; the same plotly bundle inlined). Timed in-process from
the built study: its build is left out.

With ``--browser``, each page is also opened in headless Chromium (``tests/_browser.py``;
Debian's chromium and chromium-driver) and timed until its last chart is drawn.

    python benchmarks/report.py [--sizes 1000,10000] [--repeat 3] [--browser]

A benchmark, not a test: the numbers depend on the machine (run it on an idle one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from relaunch import build_sweeprun  # noqa: E402


def record_attempts(spec_path: Path, ledger: str) -> None:
    """One done attempt per run in the ledger (what a launch would have left)."""
    import sqlite3

    from sweeprun import Sweep, load_spec

    sweep = Sweep(load_spec(spec_path), ledger)
    key = sweep.ledger_key()
    now = time.time()
    with sqlite3.connect(ledger) as db:
        db.executemany("INSERT OR IGNORE INTO attempts (sweep, run_id, attempt, worker, started_at, ended_at, "
                       "outcome, exit_code) VALUES (?, ?, 1, 'bench:1', ?, ?, 'done', 0)",
                       [(key, run.run_id, now - 60 - i * 0.01, now - i * 0.01) for i, run in enumerate(sweep.runs)])


def timed_report(spec: Path, ledger: str, out: Path, repeat: int, env: dict[str, str]) -> tuple[float, int]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "sweeprun", "report", str(spec), "--ledger", ledger,
                               "-o", str(out)], env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"report failed: {proc.stderr.strip()[-500:]}")
    return statistics.median(times), out.stat().st_size


def opened_s(page: Path) -> float:
    """Seconds from asking headless Chromium for the page until its timeline is drawn."""
    sys.path.insert(0, str(REPO / "tests"))
    from _browser import browser

    with browser() as driver:
        t0 = time.perf_counter()
        driver.get(page.as_uri())
        while not driver.execute_script("return document.querySelectorAll('#timeline .bars .point').length"):
            time.sleep(0.05)
        return time.perf_counter() - t0


def optuna_pages(n: int, folder: Path, repeat: int) -> tuple[float, int] | None:
    try:
        import optuna
    except ImportError:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    dist = {"i": optuna.distributions.IntDistribution(0, 99), "j": optuna.distributions.IntDistribution(0, 9),
            "k": optuna.distributions.IntDistribution(0, 9)}
    study.add_trials([optuna.trial.create_trial(
        params={"i": t // 100, "j": (t // 10) % 10, "k": t % 10}, distributions=dist, value=1.0 / 20,
        intermediate_values={s: 1 / (s + 1) for s in range(20)}) for t in range(n)])
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        optuna.visualization.plot_parallel_coordinate(study).write_html(folder / "parallel.html", include_plotlyjs=True)
        optuna.visualization.plot_intermediate_values(study).write_html(folder / "curves.html", include_plotlyjs=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (folder / "parallel.html").stat().st_size + (folder / "curves.html").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--browser", action="store_true", help="also time opening each page in headless Chromium")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sweeprun-report-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(REPO), "SWEEPRUN_HOME": str(root / "home")}
        for n in [int(s) for s in args.sizes.split(",")]:
            spec = build_sweeprun(root, n)
            ledger = str(root / f"ledger-{n}.sqlite")
            record_attempts(spec, ledger)
            seconds, size = timed_report(spec, ledger, root / f"report-{n}.html", args.repeat, env)
            row = {"n": n, "report_s": round(seconds, 2), "report_mb": round(size / 1e6, 2)}
            if args.browser:
                row["opened_s"] = round(opened_s(root / f"report-{n}.html"), 2)
            peer = optuna_pages(n, root, args.repeat)
            if peer is not None:
                row.update(optuna_s=round(peer[0], 2), optuna_mb=round(peer[1] / 1e6, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| runs | sweeprun report, s | file, MB | Optuna's two pages, s | files, MB | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['report_s'] / r['optuna_s']:.2f}x" if r.get("optuna_s") else "n/a"
        print(f"| {r['n']:,} | {r['report_s']:.2f} | {r['report_mb']:.1f} | {r.get('optuna_s', float('nan')):.2f} | "
              f"{r.get('optuna_mb', float('nan')):.1f} | {ratio} |")


if __name__ == "__main__":
    main()
