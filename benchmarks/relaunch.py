"""Relaunching and looking at a finished sweep of 1,000 and 10,000 runs, against Optuna.

For each size a finished sweep is built directly (not run: that would take minutes):
every run folder with ``params.json``, a log, a small ``metrics.jsonl`` and ``DONE`` (written
as the launcher writes it, done-index entry included), and a SQLite ledger that knows them
all as done, as the last launch left it. Then, each timed as a fresh process:

- ``relaunch``: ``sweeprun launch`` of the same file (must start nothing);
- ``status --json`` and ``status`` (the table, drawn to a file).

The peer is an Optuna study on SQLite with the same number of finished trials
(GridSampler over the same grid): ``relaunch`` is a process that loads it and calls
``optimize`` (GridSampler sees the grid is finished), ``status`` one that loads it and
reads every trial (``get_trials()``; ``trials_dataframe()`` needs pandas). With
``--profile`` the relaunch of the largest size is run once more under cProfile and the
top entries printed.

    python benchmarks/relaunch.py [--sizes 1000,10000] [--repeat 3] [--profile]

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
sys.path[:0] = [str(REPO)]


def build_sweeprun(root: Path, n: int) -> Path:
    import yaml

    from sweeprun import Sweep, load_spec
    from sweeprun.store import atomic_write

    spec_path = root / f"sweep-{n}.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": f"bench-{n}", "command": f"{sys.executable} -c pass", "store": str(root / "store"),
        # a product of short lists, as sweep files are written (a 10,000-line list would time PyYAML)
        "grid": {"i": list(range(n // 100)), "j": list(range(10)), "k": list(range(10))},
        "params": {"lr": 0.01}}, sort_keys=False))
    sweep = Sweep(load_spec(spec_path), str(root / f"ledger-{n}.sqlite"))
    led = sweep.prepare()  # the first launch: sweep id, ledger rows
    fs = sweep.store.fs
    for run in sweep.runs:
        paths = sweep.paths.run(run.run_id)
        atomic_write(fs, paths.params, json.dumps(run.params).encode())
        atomic_write(fs, paths.log(1), b"done\n")
        atomic_write(fs, paths.metrics, b"".join(
            json.dumps({"step": s, "loss": 1 / (s + 1)}).encode() + b"\n" for s in range(20)))
        paths.write_done({"attempt": 1})
    led.sync(sweep.runs, done={r.run_id for r in sweep.runs}, started=set())
    led.close()
    return spec_path


def build_optuna(root: Path, n: int) -> str:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{root / f'optuna-{n}.db'}"
    grid = {"i": list(range(n))}
    study = optuna.create_study(study_name="bench", storage=url, sampler=optuna.samplers.GridSampler(grid))
    dist = {"i": optuna.distributions.CategoricalDistribution(list(range(n)))}
    study.add_trials([optuna.trial.create_trial(params={"i": i}, distributions=dist, value=1.0 / (i + 1),
                                                system_attrs={"grid_id": i, "search_space": grid})
                      for i in range(n)])
    return url


OPTUNA_RELAUNCH = """
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
n = int(sys.argv[2])
study = optuna.load_study(study_name="bench", storage=sys.argv[1],
                          sampler=optuna.samplers.GridSampler({"i": list(range(n))}))
study.optimize(lambda t: t.suggest_categorical("i", list(range(n))) * 0.0, n_trials=1)
"""

OPTUNA_STATUS = """
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="bench", storage=sys.argv[1])
print(len(study.get_trials(deepcopy=False)))
"""


def timed(argv: list[str], repeat: int, env: dict[str, str], out: Path | None = None) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with open(out or os.devnull, "w") as sink:
            proc = subprocess.run(argv, env=env, stdout=sink, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{argv[:4]} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-optuna", action="store_true")
    ap.add_argument("--optuna-max", type=int, default=1000,
                    help="largest size built as an Optuna study (building 10,000 trials took over 10 min here)")
    args = ap.parse_args()
    py = sys.executable
    results = []
    with tempfile.TemporaryDirectory(prefix="sweeprun-relaunch-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(REPO), "SWEEPRUN_HOME": str(root / "home"),
               "COLUMNS": "160"}
        for n in [int(s) for s in args.sizes.split(",")]:
            spec = build_sweeprun(root, n)
            ledger = str(root / f"ledger-{n}.sqlite")
            r = {"n": n,
                 "relaunch": timed([py, "-m", "sweeprun", "launch", str(spec), "--ledger", ledger],
                                   args.repeat, env),
                 "status_json": timed([py, "-m", "sweeprun", "status", str(spec), "--ledger", ledger,
                                       "--json"], args.repeat, env),
                 "status": timed([py, "-m", "sweeprun", "status", str(spec), "--ledger", ledger],
                                 args.repeat, env, out=root / "table.txt")}
            if not args.no_optuna and n <= args.optuna_max:
                url = build_optuna(root, n)
                r["optuna_relaunch"] = timed([py, "-c", OPTUNA_RELAUNCH, url, str(n)], args.repeat, env)
                r["optuna_status"] = timed([py, "-c", OPTUNA_STATUS, url], args.repeat, env)
            results.append(r)
            print(json.dumps(r), flush=True)
            last = (spec, ledger, env)
        if args.profile:
            spec, ledger, env = last
            prof = root / "relaunch.prof"
            subprocess.run([py, "-m", "cProfile", "-o", str(prof), "-m", "sweeprun", "launch", str(spec),
                            "--ledger", ledger], env=env, capture_output=True)
            import pstats

            print(f"\ncProfile of the relaunch of {results[-1]['n']:,} runs (cumulative, top 18):")
            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(18)
    print()
    print("| finished runs | sweeprun relaunch, s | Optuna relaunch, s | sweeprun status --json, s "
          "| sweeprun status (table), s | Optuna get_trials, s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n']:,} | {r['relaunch']:.2f} | {r.get('optuna_relaunch', float('nan')):.2f} | "
              f"{r['status_json']:.2f} | {r['status']:.2f} | {r.get('optuna_status', float('nan')):.2f} |")
    big = results[-1]
    if "optuna_relaunch" in big:
        print(f"ratios at {big['n']:,}: relaunch {big['relaunch'] / big['optuna_relaunch']:.2f}x Optuna; "
              f"status --json {big['status_json'] / big['optuna_status']:.2f}x Optuna get_trials; "
              f"table {big['status'] / big['optuna_status']:.2f}x")


if __name__ == "__main__":
    main()
