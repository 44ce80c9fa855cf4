"""Claims against the SQLite ledger as the sweep grows: does a claim cost the same at any size?

For 200, 10,000 and 100,000 pending runs, on a fresh ledger file in a temporary folder:

- ``sync``: building the sweep (``Ledger.sync`` of every run), in ms per run;
- ``claim p50 / p99``: one ``claim()`` call, measured over ``--claims`` claims (made on top of
  the pending runs, so that as many are still pending after them), each followed by
  its ``finish()`` (a worker's loop), with as many runs held by live workers of this host as
  ``--held`` says (they are passed over on every claim, as the launcher's own slots are);
- ``claims/s``: claim + finish pairs per second by one process, then by ``--procs`` processes
  at once (the write lock is what they share).

The last line gives the ratio of the claim latency at the largest size to the smallest
(issue 11's target: within 2x from 200 to 100,000).

    python benchmarks/claims.py [--sizes 200,10000,100000] [--claims 300] [--procs 4]

A benchmark, not a test: the numbers depend on the machine (run it on an idle one).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def make_runs(n: int) -> list:
    from sweeprun.identity import RunSpec

    # params of a realistic size: the old claim fetched and decoded them for every pending row
    return [RunSpec.from_params({"lr": 10 ** -(1 + i % 5), "wd": (i // 5) % 7 * 1e-4,
                                 "seed": i, "optimizer": "adamw", "epochs": 20}, index=i)
            for i in range(n)]


def claim_loop(path: str, sweep: str, grid: str, claims: int, start_at: float) -> dict:
    """Claim + finish ``claims`` times; returns latencies and the wall time of the loop."""
    from sweeprun.ledger import Outcome, Policy, open_ledger
    from sweeprun.procs import ProcessRef

    led = open_ledger(path, sweep)
    me, policy = ProcessRef.me(), Policy()
    led.claim(me, policy, 600, "no-such-grid")  # connect before the clock starts
    time.sleep(max(0.0, start_at - time.time()))
    latencies = []
    t0 = time.perf_counter()
    for _ in range(claims):
        t = time.perf_counter()
        claim = led.claim(me, policy, 600, grid)
        latencies.append(time.perf_counter() - t)
        if claim is None:
            break
        led.finish(claim, Outcome.DONE, policy, 0)
    wall = time.perf_counter() - t0
    led.close()
    return {"latencies": latencies, "wall": wall, "n": len(latencies)}


def fresh_ledger(n: int, claims: int, held: int, folder: Path, name: str) -> tuple[str, str, float]:
    """A ledger of ``n + claims + held`` pending runs: ``n`` are still pending after the claims."""
    from sweeprun.ledger import Policy, grid_key, open_ledger
    from sweeprun.procs import ProcessRef

    runs = make_runs(n + claims + held)
    grid = grid_key(runs)
    path = str(folder / f"ledger-{n}-{name}.sqlite")
    led = open_ledger(path, "bench")
    t0 = time.perf_counter()
    led.sync(runs, done=set(), started=set())
    sync_s = time.perf_counter() - t0
    me = ProcessRef.me()
    for _ in range(held):  # runs held by this host's live workers (this process): skipped by claims
        led.claim(me, Policy(), 3600, grid)
    led.close()
    # Fold the build's WAL into the database now, or its first checkpoint (tens of MB at
    # 100,000 runs) lands inside the timed claims.
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path, grid, sync_s / len(runs)


def measure(n: int, claims: int, procs: int, held: int, folder: Path) -> dict:
    path, grid, sync_per_run = fresh_ledger(n, claims, held, folder, "one")
    one = claim_loop(path, "bench", grid, claims, time.time())
    # many processes at once, on a ledger of the same size: each claims its share
    path, grid, _ = fresh_ledger(n, claims, held, folder, "many")
    start_at = time.time() + 1.0
    children = [subprocess.Popen([sys.executable, __file__, "--role", "worker", path, grid,
                                  str(claims // procs), str(start_at)], stdout=subprocess.PIPE, text=True)
                for _ in range(procs)]
    outs = [json.loads(c.communicate(timeout=600)[0]) for c in children]
    total = sum(o["n"] for o in outs)
    wall = max(o["wall"] for o in outs)
    lat = one["latencies"]
    return {"n": n, "sync_ms_per_run": sync_per_run * 1e3, "sync_s": sync_per_run * (n + claims + held),
            "p50_ms": statistics.median(lat) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "cps_1": one["n"] / one["wall"], "cps_many": total / wall}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1:3] == ["--role", "worker"]:
        path, grid, claims, start_at = sys.argv[3:7]
        print(json.dumps(claim_loop(path, "bench", grid, int(claims), float(start_at))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,10000,100000")
    ap.add_argument("--claims", type=int, default=300)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--held", type=int, default=8)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="sweeprun-claims-") as tmp:
        for n in sizes:
            r = measure(n, args.claims, args.procs, args.held, Path(tmp))
            results.append(r)
            print(f"pending {r['n']:>7,}: sync {r['sync_s']:7.2f} s ({r['sync_ms_per_run']:.3f} ms/run), "
                  f"claim p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:6.2f} ms, "
                  f"claims/s {r['cps_1']:6.0f} (1 proc) {r['cps_many']:6.0f} ({args.procs} procs)",
                  flush=True)
    print()
    print(f"| pending | sync ms/run | claim p50 ms | claim p99 ms | claims/s, 1 proc | claims/s, {args.procs} procs |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n']:,} | {r['sync_ms_per_run']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['cps_1']:.0f} | {r['cps_many']:.0f} |")
    first, last = results[0], results[-1]
    print(f"ratios: claim p50 at {last['n']:,} / at {first['n']:,} pending = "
          f"{last['p50_ms'] / first['p50_ms']:.2f}x; claims/s ({args.procs} procs) "
          f"{last['cps_many'] / first['cps_many']:.2f}x")


if __name__ == "__main__":
    main()
