"""Dispatching a 200-run grid of 20-50 ms runs at 1, 2, 4 and 8 workers: sweeprun, Optuna, a floor.

Every run is the same short process (``python -c`` that sleeps 20, 30, 40 or 50 ms and
appends its grid point to a shared log, so a point executed twice is counted). Three ways:

- ``floor``: a thread pool of N slots, each running the next command with ``subprocess.run``:
  nothing but the processes themselves;
- ``sweeprun``: ``sweeprun launch --workers N`` on a fresh store and SQLite ledger;
- ``optuna``: N processes, each ``study.optimize`` on one Optuna study on SQLite with
  ``GridSampler`` over the same grid, the objective running the same command (Optuna's
  documented way to run a grid with parallel workers).

Printed: wall time, overhead per run (extra slot-time per run over the floor:
``(wall - floor wall) * N / runs``), grid points executed more than once, and sweeprun's
tail: from the last run's end (the log's last write) to the launcher's exit.

    python benchmarks/dispatch.py [--workers 1,2,4,8] [--runs 200] [--no-optuna]

A benchmark, not a test: the numbers depend on the machine (run it on an idle one).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUN = ("import sys, time, os; time.sleep(0.02 + int(sys.argv[1]) % 4 * 0.01); "
       "fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT); "
       "os.write(fd, (sys.argv[1] + chr(10)).encode()); os.close(fd)")


def command(i: int, log: Path) -> list[str]:
    return [sys.executable, "-c", RUN, str(i), str(log)]


def duplicates(log: Path, runs: int) -> tuple[int, int]:
    counts = collections.Counter(log.read_text().split())
    missing = sum(1 for i in range(runs) if counts[str(i)] == 0)
    return sum(1 for c in counts.values() if c > 1), missing


def floor(root: Path, runs: int, workers: int) -> float:
    log = root / "floor.log"
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda i: subprocess.run(command(i, log), check=True), range(runs)))
    return time.perf_counter() - t0


def sweeprun(root: Path, runs: int, workers: int) -> tuple[float, Path, float]:
    import yaml

    log = root / "sweeprun.log"
    spec = root / "sweep.yaml"
    cmd = " ".join(f"'{part}'" for part in [sys.executable, "-c", RUN]) + f" {{i}} '{log}'"
    spec.write_text(yaml.safe_dump({"name": "dispatch", "command": cmd, "store": str(root / "store"),
                                    "grid": {"i": list(range(runs))}}, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "SWEEPRUN_HOME": str(root / "home")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sweeprun", "launch", str(spec), "--workers", str(workers),
                           "--ledger", str(root / "ledger.sqlite")], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"sweeprun launch failed ({proc.returncode}): {proc.stderr[-800:]}")
    return wall, log, ended - log.stat().st_mtime


OPTUNA_WORKER = """
import subprocess, sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, runs, log, run = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
grid = {"i": list(range(runs))}
study = optuna.load_study(study_name="dispatch", storage=url, sampler=optuna.samplers.GridSampler(grid))
def objective(trial):
    i = trial.suggest_categorical("i", grid["i"])
    subprocess.run([sys.executable, "-c", run, str(i), log], check=True)
    return 0.0
study.optimize(objective)
"""


def optuna(root: Path, runs: int, workers: int) -> tuple[float, Path]:
    import optuna as opt

    opt.logging.set_verbosity(opt.logging.WARNING)
    url = f"sqlite:///{root / 'optuna.db'}"
    opt.create_study(study_name="dispatch", storage=url)
    log = root / "optuna.log"
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", OPTUNA_WORKER, url, str(runs), str(log), RUN])
             for _ in range(workers)]
    for p in procs:
        p.wait(timeout=1800)
    return time.perf_counter() - t0, log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--no-optuna", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in [int(w) for w in args.workers.split(",")]:
        with tempfile.TemporaryDirectory(prefix="sweeprun-dispatch-") as tmp:
            root = Path(tmp)
            base = floor(root, args.runs, n)
            wall, log, tail = sweeprun(root, args.runs, n)
            row = {"workers": n, "floor": base, "sweeprun": wall, "sweeprun_dup": duplicates(log, args.runs),
                   "tail": tail}
            if not args.no_optuna:
                owall, olog = optuna(root, args.runs, n)
                row.update(optuna=owall, optuna_dup=duplicates(olog, args.runs))
            rows.append(row)
            print(row, flush=True)

    def over(wall: float, r: dict) -> float:
        return (wall - r["floor"]) * r["workers"] / args.runs * 1e3

    print()
    print("| workers | floor wall, s | sweeprun wall, s | sweeprun overhead/run, ms | sweeprun dup | sweeprun tail, s "
          "| Optuna wall, s | Optuna overhead/run, ms | Optuna dup (missing) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o = (f"{r['optuna']:.2f} | {over(r['optuna'], r):.1f} | {r['optuna_dup'][0]} ({r['optuna_dup'][1]})"
             if "optuna" in r else "- | - | -")
        print(f"| {r['workers']} | {r['floor']:.2f} | {r['sweeprun']:.2f} | {over(r['sweeprun'], r):.1f} | "
              f"{r['sweeprun_dup'][0]} | {r['tail']:.2f} | {o} |")
    if all("optuna" in r for r in rows):
        print("ratios: sweeprun wall / Optuna wall = " + ", ".join(
            f"{r['sweeprun'] / r['optuna']:.2f}x at {r['workers']}" for r in rows)
            + "; sweeprun wall / floor = " + ", ".join(
            f"{r['sweeprun'] / r['floor']:.2f}x at {r['workers']}" for r in rows))


if __name__ == "__main__":
    main()
