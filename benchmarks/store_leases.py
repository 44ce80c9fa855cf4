"""Store leases (sweeprun.leases): requests and latency per claim and per heartbeat, and how
long a lost holder's run takes to move, on a local folder and on an S3 server (moto).

Starts its own moto server on loopback (as tests/servers.py does). For each store:

- requests (S3 only, counted as s3fs sends them) and p50 latency of: claiming a free run,
  one heartbeat, a look at a held run, and a takeover;
- the time from a holder's last beat to another worker's takeover, with ``lease_s`` 2 s
  and the taker looking every ``lease_s / 4``; the floor is ``lease_s``.

    python benchmarks/store_leases.py [--runs 200]

A benchmark, not a test: the numbers depend on the machine (run it on an idle one).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


def p50_ms(fn: Callable[[int], Any], n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(url: str, runs: int) -> dict[str, Any]:
    from sweeprun.leases import StoreLeases
    from sweeprun.store import open_store

    store = open_store(url)
    sent: Counter[str] = Counter()
    if store.fs.protocol[0] not in ("file", "local"):
        store.fs.connect()
        store.fs.s3.meta.events.register("before-call.s3", lambda model, **_: sent.update([model.name]))
    run = [f"{store.root}/sweep/runs/r{i}" for i in range(runs)]
    holder = StoreLeases(store.fs, lease_s=60, host="a", worker="a:1")
    taker = StoreLeases(store.fs, lease_s=60, host="b", worker="b:1")
    out: dict[str, Any] = {}

    def step(name: str, fn: Callable[[int], Any]) -> None:
        sent.clear()
        ms = p50_ms(fn, runs)
        out[name] = {"p50_ms": round(ms, 2), "requests": round(sum(sent.values()) / runs, 2) if sent else None,
                     "kinds": dict(sent)}

    leases: list[Any] = []
    step("claim free run", lambda i: leases.append(holder.take(run[i])))
    step("heartbeat", lambda i: holder.renew(leases[i]))
    step("first look at held run", lambda i: taker.take(run[i]))
    step("later look at held run", lambda i: taker.take(run[i]))
    for lease in leases:
        holder.release(lease)
    step("take released run", lambda i: taker.take(run[i]))

    # A holder that stops beating: real clock, lease_s 2 s, the taker looks every 0.5 s.
    lease_s, moves = 2.0, []
    for k in range(3):
        name = f"{store.root}/sweep/runs/lost{k}"
        a = StoreLeases(store.fs, lease_s=lease_s, host="a", worker="a:1")
        b = StoreLeases(store.fs, lease_s=lease_s, host="b", worker="b:1")
        held = a.take(name)
        b.take(name)
        a.renew(held)
        last_beat = time.monotonic()
        while b.take(name) is None:
            time.sleep(lease_s / 4)
        moves.append(time.monotonic() - last_beat)
    out["lost holder -> taken over (s)"] = {"lease_s": lease_s, "median": round(statistics.median(moves), 2),
                                            "max": round(max(moves), 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            for label, url in (("local folder", f"{tmp}/store"), ("S3 (moto)", "s3://bench/store")):
                print(f"== {label}")
                for name, row in measure(url, args.runs).items():
                    print(f"  {name:32s} {row}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
