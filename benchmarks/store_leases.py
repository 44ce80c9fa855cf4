"""Store leases (sweeprun.leases): requests and latency per claim and per heartbeat, and how
long a lost holder's run takes to move, on a local folder and on an S3 server (moto).

Starts its own moto server on loopback (as tests/servers.py does). For each store:

- requests (S3 only, counted as s3fs sends them) and p50 latency of: claiming a free run,
  one heartbeat, a look at a held run, and a takeover;
- the time from a holder's last beat to another worker's takeover, with ``lease_s`` 2 s
  and the taker looking every ``lease_s / 4``; the floor is ``lease_s``;
- end to end, with real launchers (``sweeprun worker`` processes, each its own simulated
  machine with its own SQLite ledger): the store requests a whole sweep of no-op runs
  costs per run (S3, counted at the server), and the time from SIGKILLing a machine that
  runs a run to the run's take by a fresh machine (``lease_s`` 4 s).

    python benchmarks/store_leases.py [--runs 200]

A benchmark, not a test: the numbers depend on the machine (run it on an idle one).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import statistics
import subprocess
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


class RequestCounter(logging.Handler):
    """Counts the requests moto's server answers (it logs one line per request)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def machine(tmp: str, host: str, *args: str) -> subprocess.Popen[bytes]:
    home = f"{tmp}/hosts/{host}"
    env = {**os.environ, "SWEEPRUN_HOST": host, "SWEEPRUN_HOME": f"{home}/state", "HOME": home,
           "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "sweeprun", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def sweep_file(tmp: str, store: str, name: str, runs: int, command: str, lease_s: float) -> str:
    path = f"{tmp}/{name}.yaml"
    Path(path).write_text(f"name: {name}\nstore: {store}\ncommand: {command}\nlease_s: {lease_s}\n"
                          f"grid:\n  i: {list(range(runs))}\n")
    return path


def kill_machine(proc: subprocess.Popen[bytes]) -> None:
    """A lost machine: the launcher's group and its runs' groups (each run leads its own)."""
    pids = [proc.pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                        pids.append(int(entry))
            except OSError:
                pass
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def end_to_end(store: str, tmp: str, counter: RequestCounter | None, runs: int) -> dict[str, Any]:
    """Requests per run of a whole sweep, and a lost machine's run moving, with real launchers."""
    from sweeprun.store import open_store

    out: dict[str, Any] = {}
    if counter is not None:
        sweep = sweep_file(tmp, store, "noop", runs, "python -c pass", 60)
        counter.lines.clear()
        machine(tmp, "solo", "launch", sweep).wait()
        lease = sum("/lease/" in line for line in counter.lines)
        out["whole sweep, requests per run"] = {
            "all": round(len(counter.lines) / runs, 1), "lease": round(lease / runs, 1)}
    fs = open_store(store).fs
    moves = []
    for k in range(3):
        name = f"lost{k}"
        sweep = sweep_file(tmp, store, name, 1, "python -c 'import time; time.sleep(120)'", 4)
        first = machine(tmp, f"a{k}", "worker", sweep)
        lease_dir = f"{open_store(store).root}/{name}/runs"
        while not fs.glob(f"{lease_dir}/*/lease/00000001.json"):
            time.sleep(0.05)
        time.sleep(1.0)  # a beat or so into the run
        kill_machine(first)
        killed = time.monotonic()
        second = machine(tmp, f"b{k}", "worker", sweep)
        while not fs.glob(f"{lease_dir}/*/lease/00000002.json"):  # taken, its child starting
            time.sleep(0.05)
        moves.append(time.monotonic() - killed)
        kill_machine(second)
    out["machine lost -> run taken elsewhere (s)"] = {
        "lease_s": 4, "median": round(statistics.median(moves), 2), "max": round(max(moves), 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--sweep-runs", type=int, default=20, help="runs of the end-to-end sweep")
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    counter = RequestCounter()
    werkzeug = logging.getLogger("werkzeug")  # one line per request: counted, not printed
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False
    werkzeug.addHandler(counter)

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
                s3 = url.startswith("s3://")
                for name, row in end_to_end(url, tmp, counter if s3 else None, args.sweep_runs).items():
                    print(f"  {name:32s} {row}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
