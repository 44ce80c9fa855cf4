"""How long ``sweeprun --help`` takes, and what it imports.

Runs ``python -m sweeprun --help`` ``--repeat`` times (after one warm-up, so the files are in
the page cache), against ``python -c pass`` (the interpreter's own start) and
``python -c "import typer"`` (the CLI framework: the floor for any typer command),
then lists the heavy modules the help imported (issue 11: none of numpy, rich or fsspec)
and the slowest imports from ``python -X importtime``.

    python benchmarks/cli_help.py [--repeat 20]

A benchmark, not a test: the numbers depend on the machine (run it on an idle one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("numpy", "rich", "fsspec", "sqlite_utils", "torch", "psycopg", "s3fs", "yaml")


def wall(argv: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(argv, cwd=REPO, env=env, capture_output=True, check=True)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=REPO, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def imports() -> tuple[list[str], list[tuple[int, str]]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "sweeprun", "--help"], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True).stderr
    rows = []
    for line in out.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if parts[1].isdigit():
            rows.append((int(parts[1]), parts[2]))
    names = {name.strip() for _, name in rows}
    heavy = sorted(h for h in HEAVY if h in names)
    top = sorted(rows, reverse=True)[:8]
    return heavy, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    py = sys.executable
    bare = wall([py, "-c", "pass"], args.repeat)
    typer_s = wall([py, "-c", "import typer"], args.repeat)
    help_s = wall([py, "-m", "sweeprun", "--help"], args.repeat)
    heavy, top = imports()
    print("| command | median wall, s |")
    print("|---|---:|")
    print(f"| python -c pass | {bare:.3f} |")
    print(f"| python -c 'import typer' | {typer_s:.3f} |")
    print(f"| sweeprun --help | {help_s:.3f} |")
    print()
    print(f"heavy modules imported by --help: {', '.join(heavy) or 'none'}")
    print("slowest imports (cumulative us):", "; ".join(f"{name} {us}" for us, name in top))
    print(f"ratios: --help {help_s:.3f} s = {help_s / 0.15:.2f}x the 0.15 s target; "
          f"{help_s / typer_s:.2f}x importing typer alone")


if __name__ == "__main__":
    main()
