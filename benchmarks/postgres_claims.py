"""Claims against the PostgreSQL ledger: throughput, latency, and how fast a lost host's run moves.

Starts its own throwaway PostgreSQL server (tests/servers.py's PostgresServer, from
Debian's binaries under /usr/lib/postgresql) and measures, with 1, 4 and 16 worker
processes each looping claim + finish on one sweep:

- claims per second (all workers together, claim + finish each), and
- p50 / p99 latency of one ``claim()`` call;

then the time from a host that took a run and vanished (no heartbeat, ``lease_s`` 2 s) to
another host's claim of that run. With Optuna and SQLAlchemy installed it runs the
same loop on Optuna's RDB storage (``study.ask()`` + ``study.tell()``) on the same
server as the peer, and prints the ratios.

    python benchmarks/postgres_claims.py [--runs-per-worker 300] [--no-optuna]

A benchmark, not a test: the numbers depend on the machine (run it on an idle one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

WORKER_COUNTS = (1, 4, 16)
HOSTS = os.environ.get("BENCH_HOSTS") == "1"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- worker processes (this script, run with --role) ------------------------------------------

def sweeprun_worker(url: str, start_at: float) -> None:
    from sweeprun.ledger import Outcome, Policy, open_ledger
    from sweeprun.procs import ProcessRef

    led = open_ledger(url, "bench")
    me, policy = ProcessRef.me(), Policy()
    led.claim(me, policy, 600, "no-such-grid")  # connect and warm up before the clock starts
    time.sleep(max(0.0, start_at - time.time()))
    latencies = []
    while True:
        t0 = time.perf_counter()
        claim = led.claim(me, policy, 600)
        latencies.append(time.perf_counter() - t0)
        if claim is None:
            break
        led.finish(claim, Outcome.DONE, policy, 0)
    print(json.dumps({"latencies": latencies[:-1], "end": time.time()}))
    led.close()


def optuna_worker(url: str, start_at: float) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url)
    # RandomSampler: the cheapest sampler, so this measures the storage, not TPE
    study = optuna.load_study(study_name="bench", storage=storage,
                              sampler=optuna.samplers.RandomSampler())
    time.sleep(max(0.0, start_at - time.time()))
    latencies = []
    deadline = int(os.environ["BENCH_TRIALS"])
    while True:
        t0 = time.perf_counter()
        trial = study.ask()
        latencies.append(time.perf_counter() - t0)
        if trial.number >= deadline:  # Optuna has no "nothing left": stop at the sweeprun count
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            break
        trial.suggest_float("x", 0, 1)
        study.tell(trial, 0.0)
    print(json.dumps({"latencies": latencies[:-1], "end": time.time()}))


def lost_holder(url: str, lease_s: float) -> None:
    """Take the run and vanish without a word (the parent SIGKILLs us)."""
    from sweeprun.ledger import Policy, open_ledger
    from sweeprun.procs import ProcessRef

    led = open_ledger(url, "lost")
    claim = led.claim(ProcessRef.me(), Policy(), lease_s)
    print(json.dumps({"run_id": claim.run_id if claim else None, "at": led.now()}), flush=True)
    time.sleep(3600)


def reclaimer(url: str, lease_s: float) -> None:
    from sweeprun.ledger import Policy, open_ledger
    from sweeprun.procs import ProcessRef

    led = open_ledger(url, "lost")
    print("ready", flush=True)
    sys.stdin.readline()
    while (claim := led.claim(ProcessRef.me(), Policy(), lease_s)) is None:
        time.sleep(0.05)  # how often an idle launcher looks (its poll_s is 1 s by default)
    print(json.dumps({"run_id": claim.run_id, "took_over": claim.took_over, "at": led.now(),
                      "wall": time.time()}), flush=True)


# -- the parent -------------------------------------------------------------------------------

def spawn(role: str, url: str, *extra: str, env: dict[str, str] | None = None,
          **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--role", role, "--url", url, *extra],
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, text=True, **popen)  # type: ignore[call-overload]


def measure(role: str, url: str, workers: int, env: dict[str, str] | None = None) -> dict[str, float]:
    start_at = time.time() + 2.0 + 0.3 * workers  # every worker imported and connected by then
    procs = [spawn(role, url, "--start-at", repr(start_at),
                   env={**(env or {}), **({"SWEEPRUN_HOST": f"host-{i}"} if HOSTS else {})})
             for i in range(workers)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"a {role} worker failed (exit {p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    latencies = [x for r in results for x in r["latencies"]]
    elapsed = max(r["end"] for r in results) - start_at
    return {"claims": len(latencies), "per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 99)}


def bench_sweeprun(server: object, workers: int, runs: int) -> dict[str, float]:
    from sweeprun.identity import RunSpec
    from sweeprun.ledger import open_ledger

    url = server.database()  # type: ignore[attr-defined]
    led = open_ledger(url, "bench")
    led.sync([RunSpec.from_params({"i": i}, index=i) for i in range(runs)], set(), set())
    led.close()
    return measure("sweeprun", url, workers)


def bench_optuna(server: object, workers: int, runs: int) -> dict[str, float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = server.database().replace("postgresql://", "postgresql+psycopg://", 1)  # type: ignore[attr-defined]
    optuna.create_study(study_name="bench", storage=optuna.storages.RDBStorage(url))
    return measure("optuna", url, workers, env={"BENCH_TRIALS": str(runs)})


def bench_lost_holder(server: object, lease_s: float) -> dict[str, float]:
    from sweeprun.identity import RunSpec
    from sweeprun.ledger import open_ledger

    url = server.database()  # type: ignore[attr-defined]
    led = open_ledger(url, "lost")
    led.sync([RunSpec.from_params({"i": 0}, index=0)], set(), set())
    other = spawn("reclaimer", url, "--lease-s", str(lease_s), env={"SWEEPRUN_HOST": "host-b"},
                  stdin=subprocess.PIPE)
    assert other.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    holder = spawn("lost-holder", url, "--lease-s", str(lease_s), env={"SWEEPRUN_HOST": "host-a"})
    taken = json.loads(holder.stdout.readline())  # type: ignore[union-attr]
    holder.kill()
    killed_at = time.time()
    holder.wait()
    other.stdin.write("go\n")  # type: ignore[union-attr]
    other.stdin.flush()  # type: ignore[union-attr]
    again = json.loads(other.stdout.readline())  # type: ignore[union-attr]
    other.wait()
    led.close()
    assert again["run_id"] == taken["run_id"] and again["took_over"]
    return {"lease_s": lease_s, "claim_to_reclaim_s": again["at"] - taken["at"],
            "kill_to_reclaim_s": again["wall"] - killed_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--lease-s", type=float, default=2.0, help="lease of the lost holder")
    parser.add_argument("--runs-per-worker", type=int, default=300)
    parser.add_argument("--no-optuna", action="store_true", help="skip the Optuna comparison")
    args = parser.parse_args()
    roles = {"sweeprun": lambda: sweeprun_worker(args.url, args.start_at),
             "optuna": lambda: optuna_worker(args.url, args.start_at),
             "lost-holder": lambda: lost_holder(args.url, args.lease_s),
             "reclaimer": lambda: reclaimer(args.url, args.lease_s)}
    if args.role:
        roles[args.role]()
        return

    from servers import PostgresServer

    try:
        import optuna  # noqa: F401
        import sqlalchemy  # noqa: F401
        have_optuna = not args.no_optuna
    except ImportError:
        have_optuna = False
        if not args.no_optuna:
            print("(Optuna comparison skipped: pip install optuna sqlalchemy)")
    server = PostgresServer()
    try:
        print(f"PostgreSQL on loopback, {os.cpu_count()} CPUs; each worker loops claim + finish")
        header = f"{'workers':>7} {'claims':>7} {'claims/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
        if have_optuna:
            header += f"  | optuna: {'trials/s':>8} {'p50 ms':>7} {'p99 ms':>7}  {'speed x':>7}"
        print(header)
        for workers in WORKER_COUNTS:
            runs = max(200, args.runs_per_worker * workers)
            ours = bench_sweeprun(server, workers, runs)
            line = (f"{workers:>7} {ours['claims']:>7} {ours['per_s']:>9.0f} {ours['p50_ms']:>7.2f} "
                    f"{ours['p99_ms']:>7.2f}")
            if have_optuna:
                peer = bench_optuna(server, workers, runs)
                line += (f"  | {'':>7} {peer['per_s']:>8.0f} {peer['p50_ms']:>7.2f} "
                         f"{peer['p99_ms']:>7.2f}  {ours['per_s'] / peer['per_s']:>7.1f}")
            print(line, flush=True)
        lost = bench_lost_holder(server, args.lease_s)
        print(f"lost host (lease {lost['lease_s']:g} s, no heartbeat): its run claimed by another "
              f"host {lost['claim_to_reclaim_s']:.2f} s after it was taken "
              f"({lost['kill_to_reclaim_s']:.2f} s after the host was killed)")
    finally:
        server.close()


if __name__ == "__main__":
    main()
