"""Many machines, one sweep: simulated hosts that share only a PostgreSQL ledger and an S3
bucket, attacked the way fleets fail (a machine lost, a preemption notice, a VM frozen past
its lease), and the PostgreSQL server itself restarted mid-sweep.

Each simulated host has its own ``SWEEPRUN_HOST``, ``SWEEPRUN_HOME`` and ``HOME``: nothing
on this machine's disk is shared between them but the per-run locks that prove no run ever
had two processes at once (``tests/scripts/exclusive.py``; a holder that is paused is not
running, and a woken one gets a few seconds to be stopped by its own launcher).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from sweeprun.procs import children
from sweeprun.training import load_checkpoint

from _training_helpers import REPO, assert_same_tree
from conftest import Sandbox, wait_for
from servers import PostgresServer, S3Server
from test_chaos import EXAMPLE_FLAGS, reference

LEASE_S = 3
#: A 3 s lease on a loaded 2-core machine (the suite runs in parallel) is lost now and then
#: before a start could save anything: that is fencing doing its job, not the cap on lost
#: attempts under test (test_launch_edges has that), so the chaos sweeps allow many.
MAX_LOST = 50


@dataclass
class Host:
    name: str
    proc: subprocess.Popen[str]
    out: IO[str]


def signal_host(host: Host, sig: int) -> None:
    """What happens to a whole machine: the launcher's group and every run's group."""
    for group in [host.proc.pid, *children(host.proc.pid)]:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass


class Fleet:
    def __init__(self, sandbox: Sandbox, sweep: Path, ledger: str, s3_env: dict[str, str]) -> None:
        self.sandbox, self.sweep, self.ledger, self.s3_env = sandbox, sweep, ledger, s3_env
        self.born = 0

    def env(self, name: str) -> dict[str, str]:
        home = self.sandbox.root / "hosts" / name
        home.mkdir(parents=True, exist_ok=True)
        # The ledger URL only in the environment, as a notebook would keep its password.
        env = self.sandbox.env(**self.s3_env)
        env.update(SWEEPRUN_HOST=name, SWEEPRUN_HOME=str(home / "state"), HOME=str(home),
                   SWEEPRUN_LEDGER=self.ledger, EXCLUSIVE_GRACE_S="3")
        if not self.ledger:  # each machine its own default ledger: only the store is shared
            del env["SWEEPRUN_LEDGER"]
        return env

    def start(self, name: str | None = None) -> Host:
        if name is None:
            self.born += 1
            name = f"host-{self.born}"
        out = open(self.sandbox.root / f"{name}.{time.monotonic_ns()}.out", "w")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "sweeprun", "worker", str(self.sweep)],
                                env=self.env(name), cwd=self.sandbox.root, text=True, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        return Host(name, proc, out)

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """A command from a machine that has never seen the sweep."""
        self.born += 1
        return subprocess.run([sys.executable, "-m", "sweeprun", *args, str(self.sweep)],
                              env=self.env(f"fresh-{self.born}"), cwd=self.sandbox.root, text=True,
                              capture_output=True, timeout=timeout)

    def status(self) -> dict[str, dict]:
        result = self.run("status", "--json")
        assert result.returncode == 0, result.stderr
        return {row["run_id"]: row for row in json.loads(result.stdout)}

    def status_of_one(self) -> dict:
        (row,) = self.status().values()
        return row


def attack(fleet: Fleet, hosts: list[Host], rnd: random.Random, rounds: int) -> Counter:
    """Hit hosts that are running a run, every 2 to 4.5 s (a start, torch's import and a few
    saves fit between), ``rounds`` times each of: lost (SIGKILL of the whole machine, replaced
    by a machine with a new name), preempted (SIGTERM; the same machine comes back), and
    frozen past its lease (SIGSTOP, then SIGCONT). ``hosts`` is updated in place."""
    done: Counter = Counter()
    actions = ["lost", "preempted", "paused"] * rounds
    rnd.shuffle(actions)
    for action in actions:
        time.sleep(rnd.uniform(2.0, 4.5))
        busy = [i for i, h in enumerate(hosts) if h.proc.poll() is None and children(h.proc.pid)]
        if not busy:  # between runs, or the sweep is nearly done
            continue
        i = rnd.choice(busy)
        host = hosts[i]
        if action == "lost":
            signal_host(host, signal.SIGKILL)
            host.proc.wait()
            hosts[i] = fleet.start()
        elif action == "preempted":
            os.killpg(host.proc.pid, signal.SIGTERM)
            host.proc.wait(timeout=120)
            hosts[i] = fleet.start(host.name)
        else:
            signal_host(host, signal.SIGSTOP)
            time.sleep(LEASE_S + 2)
            signal_host(host, signal.SIGCONT)
        done[action] += 1
    return done


def assert_all_done_exactly(sandbox: Sandbox, shared_dir: Path, fleet: Fleet, hosts: list[Host], root: str,
                            runs: int, epochs: int) -> list[dict]:
    """Every host standing at the end finishes cleanly, every run is done, none ever had two
    running processes, and each ends bit-exact against an uninterrupted run. The side log."""
    for host in hosts:
        host.proc.wait(timeout=900)
        assert host.proc.returncode == 0, (sandbox.root / host.out.name).read_text()[-3000:]
    status = fleet.status()
    assert len(status) == runs and {row["state"] for row in status.values()} == {"done"}, status
    events = sandbox.events()
    assert not [e for e in events if e["event"] == "overlap"], "a run had two processes at once"
    with ThreadPoolExecutor(2) as pool:
        refs = dict(zip(status, pool.map(lambda r: reference(shared_dir, r["params"]["lr"],
                                                             r["params"]["seed"], epochs), status.values()),
                        strict=True))
    for run_id, ref in refs.items():
        got = load_checkpoint(f"{root}/fleet/runs/{run_id}")
        assert got["step"] == ref["step"] == epochs * 16
        assert_same_tree(got["objects"]["model"], ref["objects"]["model"], f"{run_id} model")
        assert_same_tree(got["objects"]["optimizer"], ref["objects"]["optimizer"], f"{run_id} optimizer")
    return events


@pytest.mark.slow
def test_four_hosts_sharing_only_postgres_and_a_bucket_survive_kills_preemptions_and_pauses(
        sandbox: Sandbox, shared_dir: Path, postgres_url: str, s3_bucket: str, s3_env: dict[str, str]) -> None:
    rnd = random.Random(20261130)
    lrs, seeds, epochs = [0.01, 0.03], [0, 1], 2   # runs test_chaos compares too: one reference each
    sweep = sandbox.write_sweep(
        {"lr": lrs, "seed": seeds}, {"epochs": epochs}, name="fleet", lease_s=LEASE_S, grace_s=10,
        max_lost=MAX_LOST, command=f"python {REPO}/tests/scripts/exclusive.py python {REPO}/examples/train_mlp.py "
                f"--lr {{lr}} --seed {{seed}} {EXAMPLE_FLAGS}")
    text = sweep.read_text().replace(f"store: {sandbox.store}", f"store: {s3_bucket}/sweeps")
    sweep.write_text(text)
    fleet = Fleet(sandbox, sweep, postgres_url, s3_env)
    hosts = [fleet.start() for _ in range(4)]
    done = attack(fleet, hosts, rnd, rounds=2)   # each kind of hit twice
    events = assert_all_done_exactly(sandbox, shared_dir, fleet, hosts, f"{s3_bucket}/sweeps", runs=4,
                                     epochs=epochs)
    again = fleet.run("launch")
    assert again.returncode == 0 and "0 process(es) started" in again.stdout
    starts = sum(1 for e in events if e["event"] == "start")
    print("\nfleet chaos:", json.dumps({**done, "process_starts": starts, "ideal_starts": 4,
                                       "paused_waits": sum(1 for e in events if e.get("waited_for_paused"))}))


@pytest.mark.slow
def test_the_postgres_server_restarted_mid_sweep(sandbox: Sandbox, postgres_server: PostgresServer,
                                                 postgres_url: str) -> None:
    """Workers wait through the outage and reconnect; runs keep going (the outage is shorter than
    the lease), nothing runs twice, and the sweep finishes."""
    sweep = sandbox.write_sweep({"a": [1, 2, 3, 4, 5, 6]}, {"steps": 100, "sleep": 0.1}, lease_s=30)
    env = {"SWEEPRUN_LEDGER": postgres_url}
    workers = [subprocess.Popen([sys.executable, "-m", "sweeprun", "worker", str(sweep), "--workers", "2"],
                                env=sandbox.env(**env, SWEEPRUN_HOST=f"vm-{i}"), cwd=sandbox.root,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True) for i in range(2)]
    wait_for(lambda: len([e for e in sandbox.events() if e["event"] == "start"]) >= 4, what="four runs going")
    postgres_server.stop()
    try:
        time.sleep(6)  # the outage: longer than a heartbeat, shorter than the lease
    finally:
        postgres_server.start()
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    events = sandbox.events()
    assert not [e for e in events if e["event"] == "overlap"]
    assert Counter(e["run"] for e in events if e["event"] == "finish") == Counter(
        {run: 1 for run in {e["run"] for e in events}})
    assert Counter(e["event"] for e in events)["start"] == 6, "a run was restarted by the outage"


@pytest.mark.slow
def test_a_host_frozen_past_its_lease_is_taken_over_and_fenced(
        sandbox: Sandbox, shared_dir: Path, postgres_url: str, s3_bucket: str, s3_env: dict[str, str]) -> None:
    """A VM freezes mid-run; another machine takes the run over after the lease (by the
    database's clock) and resumes it from the bucket; the frozen one wakes, stops its child by
    its own clock before anything else, and the run ends exactly as an uninterrupted one."""
    sweep = sandbox.write_sweep(
        {"lr": [0.01], "seed": [5]}, {"epochs": 6}, name="fleet", lease_s=LEASE_S, grace_s=10,
        max_lost=MAX_LOST, command=f"python {REPO}/tests/scripts/exclusive.py python {REPO}/examples/train_mlp.py "
                f"--lr {{lr}} --seed {{seed}} {EXAMPLE_FLAGS}")
    sweep.write_text(sweep.read_text().replace(f"store: {sandbox.store}", f"store: {s3_bucket}/sweeps"))
    fleet = Fleet(sandbox, sweep, postgres_url, s3_env)
    frozen = fleet.start()
    wait_for(lambda: any(e["event"] == "start" for e in sandbox.events()), timeout=120, what="the run")
    time.sleep(3)  # a few saves
    signal_host(frozen, signal.SIGSTOP)
    spare = fleet.start()
    try:
        wait_for(lambda: fleet.status_of_one()["attempts"] >= 2, timeout=120, what="the takeover")
        time.sleep(1)  # the spare's run waits on the frozen child's lock: not an overlap
    finally:
        signal_host(frozen, signal.SIGCONT)
    for host in (frozen, spare):
        host.proc.wait(timeout=300)
        assert host.proc.returncode == 0, (sandbox.root / host.out.name).read_text()[-3000:]
    events = sandbox.events()
    assert not [e for e in events if e["event"] == "overlap"]
    assert [e["attempt"] for e in events if e["event"] == "start"] == [1, 2]
    assert [e for e in events if e["event"] == "start"][1]["waited_for_paused"]
    assert "no lease renewal" in (sandbox.root / frozen.out.name).read_text()
    (row,) = fleet.status().values()
    ref = reference(shared_dir, 0.01, 5, 6)
    got = load_checkpoint(f"{s3_bucket}/sweeps/fleet/runs/{row['run_id']}")
    assert row["state"] == "done" and got["step"] == ref["step"] == 96
    assert_same_tree(got["objects"]["model"], ref["objects"]["model"], "model")
    assert_same_tree(got["objects"]["optimizer"], ref["objects"]["optimizer"], "optimizer")


@pytest.mark.slow
@pytest.mark.parametrize("store", ["folder", "s3"])
def test_four_hosts_sharing_only_the_store_never_run_a_run_twice(
        sandbox: Sandbox, shared_dir: Path, store: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """No database: each host keeps its own SQLite ledger, and only the leases in the store
    (a shared folder, or a bucket) keep them apart, through lost, preempted and frozen hosts."""
    rnd = random.Random(20261201)
    s3 = {}
    root = str(sandbox.store)
    if store == "s3":
        s3 = s3_server.env()
        for key, value in s3.items():
            monkeypatch.setenv(key, value)
        root = s3_server.bucket() + "/sweeps"
    epochs = 2   # runs test_chaos compares too: one reference each
    sweep = sandbox.write_sweep(
        {"lr": [0.01, 0.03], "seed": [0, 1]}, {"epochs": epochs}, name="fleet", lease_s=LEASE_S,
        grace_s=10, max_lost=MAX_LOST, command=f"python {REPO}/tests/scripts/exclusive.py python {REPO}/examples/train_mlp.py "
                            f"--lr {{lr}} --seed {{seed}} {EXAMPLE_FLAGS}")
    sweep.write_text(sweep.read_text().replace(f"store: {sandbox.store}", f"store: {root}"))
    fleet = Fleet(sandbox, sweep, "", s3)
    hosts = [fleet.start() for _ in range(4)]
    done = attack(fleet, hosts, rnd, rounds=1)   # each kind of hit once per store (twice above)
    events = assert_all_done_exactly(sandbox, shared_dir, fleet, hosts, root, runs=4, epochs=epochs)
    again = fleet.run("launch")
    assert again.returncode == 0 and "0 process(es) started" in again.stdout
    starts = sum(1 for e in events if e["event"] == "start")
    print(f"\nstore-only fleet ({store}):", json.dumps({**done, "process_starts": starts, "ideal_starts": 4}))
