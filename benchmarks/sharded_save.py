"""Sharded save: the training-thread stall of a multi-rank asynchronous save, and the commit.

``--ranks`` gloo ranks on CPU (processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as
torchrun sets them), each with the same DDP MLP + AdamW (one step taken, so the moments
exist) of about ``--size-mb`` of state, save it over ``--saves`` rounds, the methods in
turns (their order alternates from round to round, so neither always goes first):

- ``copy``: every tensor of ``get_state_dict(model, optimizer)`` cloned to host memory
  once: the floor of any save that lets training go on while a copy is written;
- ``sweeprun async``: ``run.save(wait=False)`` under ``sweeprun.init`` with a process group
  (what the cadence does): the stall is the time until the step can go on; the time until
  every rank's shards are committed is shown apart;
- ``dcp async_save``: ``torch.distributed.checkpoint.async_save`` of
  ``get_state_dict(model, optimizer)`` on a gloo group of its own (as sweeprun's thread
  has), to a folder on the same disk: the stall is the time until it returns (its
  staging; ``get_state_dict`` included, as sweeprun's stall includes its own);
- ``sweeprun sync``: ``run.save()`` (one ``dcp.save`` with sweeprun's storage writer: the
  fence and name, every shard written, hashed and fsynced, each rank's own state, the
  manifest created by rank 0; retention after it, on a thread of its own);
- ``dcp save``: ``torch.distributed.checkpoint.save`` of the same state (fsynced shards and
  ``.metadata``). (sync - dcp save) / dcp save is the commit's overhead, per round.

Every figure is the slowest rank's of its round (a collective save waits for it); the table
gives the median and p90 over rounds. The sweeprun saves are also timed from the inside
(wrapping its functions, nothing changed): the stall split into its parts, and the commit
(what ``ShardedWriter.write`` spends beyond DCP's own writer, split by part and rank).

    python benchmarks/sharded_save.py [--size-mb 50] [--saves 8] [--ranks 2] [--quick]

A benchmark, not a test: the numbers depend on the machine (run it on an idle one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

METHODS = ("copy", "sweeprun async", "dcp async_save", "sweeprun sync", "dcp save")
#: DCP's own writer inside sweeprun's save: what a plain dcp.save does too.
DCP_WRITE = "DCP's writer: shards, fsynced (sweeprun's hashed as written)"
DCP_FINISH = "DCP's writer: .metadata (rank 0)"
RETENTION = "retention (on its own thread, after the commit)"


def build(size_mb: float) -> tuple[Any, Any, int]:
    """A DDP MLP + AdamW after one step: ~size_mb of state (12 bytes per parameter)."""
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    width = 1024 if size_mb >= 20 else 256
    per_layer = (width * width + width) * 12
    layers = max(1, round(size_mb * 1e6 / per_layer))
    model = DistributedDataParallel(nn.Sequential(*(nn.Linear(width, width) for _ in range(layers))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    return model, optimizer, nbytes


class Timers:
    """Wraps sweeprun's own functions to time the parts of its saves, changing nothing."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = defaultdict(float)
        self.inside_write = False

    def wrap(self, owner: Any, name: str, label: str, only_in_write: bool = False) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if only_in_write and not timers.inside_write:
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.parts[label] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out, self.parts = dict(self.parts), defaultdict(float)
        return out


def rank_main(size_mb: float, folder: str, saves: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import sweeprun
    from sweeprun.training import run as run_module
    from sweeprun.training import sharded

    torch.set_num_threads(1)              # as a run of a sweep does
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank = dist.get_rank()
    dcp_group = dist.new_group(backend="gloo")   # DCP's background save talks on its own group
    model, optimizer, nbytes = build(size_mb)

    timers = Timers()
    timers.wrap(sharded, "dcp_state", "get state dicts")
    timers.wrap(sharded, "staged", "stage shards to host")
    timers.wrap(run_module.Run, "snapshot", "own state snapshot")
    timers.wrap(run_module.Run, "_collect", "wait for previous save")
    original_write = sharded.ShardedWriter.write

    def write(self: Any, *args: Any, **kwargs: Any) -> Any:
        timers.inside_write = True
        t0 = time.perf_counter()
        try:
            return original_write(self, *args, **kwargs)
        finally:
            timers.inside_write = False
            timers.parts["write"] += time.perf_counter() - t0

    sharded.ShardedWriter.write = write   # type: ignore[method-assign]
    timers.wrap(dcp, "save", "dcp.save", only_in_write=True)
    from torch.distributed.checkpoint import FileSystemWriter

    from sweeprun.training import dcp_io
    from sweeprun.training.digest import StreamDigest
    from sweeprun.training.metrics import MetricsLog
    from sweeprun.training.writer import CheckpointWriter

    for owner, name, label in [
            (sharded.ShardedWriter, "_name", "fence + name (rank 0, in DCP's planning)"),
            (StreamDigest, "hexdigest", "waits for the hasher (at file close)"),
            (dcp_io, "atomic_write", "own state written"),
            (dcp_io, "fsync_dir", "fsync of the folder (rank 0)"),
            (dcp_io, "local_memory", "where the tensors are (for the hasher)"),
            (MetricsLog, "flush", "metrics made durable (rank 0)"),
            (dcp_io.Commit, "write_data", "sweeprun's write_data (all of a rank's part)"),
            (dcp_io.Commit, "finish", "sweeprun's finish (rank 0: .metadata + commit)"),
            (sharded.ShardedWriter, "_commit", "rank 0 commit (fence again, manifest)")]:
        timers.wrap(owner, name, "commit:" + label, only_in_write=True)
    timers.wrap(CheckpointWriter, "prune", RETENTION)
    timers.wrap(FileSystemWriter, "write_data", DCP_WRITE)     # in sweeprun's saves and DCP's own
    timers.wrap(FileSystemWriter, "finish", DCP_FINISH)

    runs = {}
    for mode in ("async", "sync"):
        runs[mode] = sweeprun.init(params={"mode": mode}, local_dir=os.path.join(folder, f"run-{mode}"),
                                   keep_last=1, every_steps=10**9, async_save=mode == "async")
        runs[mode].track(model=model, optimizer=optimizer)
    dcp_dir = os.path.join(folder, "dcp")

    def fresh_dcp_path() -> str:
        if rank == 0:
            shutil.rmtree(dcp_dir, ignore_errors=True)
        dist.barrier()
        return dcp_dir

    def once(method: str) -> dict[str, float]:
        dist.barrier()
        timers.take()
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        if method == "copy":
            msd, osd = get_state_dict(model, optimizer)
            copy = [t.detach().clone() for sd in (msd, osd["state"]) for t in _tensors(sd)]
            out["stall"] = time.perf_counter() - t0
            del copy
        elif method == "sweeprun async":
            runs["async"].save(wait=False)
            out["stall"] = time.perf_counter() - t0
            runs["async"].wait()
            out["durable"] = time.perf_counter() - t0
            runs["async"]._writer.settle()    # its retention, timed apart: not during the next method
        elif method == "dcp async_save":
            path = fresh_dcp_path()
            t0 = time.perf_counter()
            msd, osd = get_state_dict(model, optimizer)
            future = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path, process_group=dcp_group)
            out["stall"] = time.perf_counter() - t0
            future.result()
            out["durable"] = time.perf_counter() - t0
        elif method == "sweeprun sync":
            runs["sync"].save()
            out["stall"] = time.perf_counter() - t0
            runs["sync"]._writer.settle()
        elif method == "dcp save":
            path = fresh_dcp_path()
            t0 = time.perf_counter()
            msd, osd = get_state_dict(model, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
            out["stall"] = time.perf_counter() - t0
        out.update({f"part:{k}": v for k, v in timers.take().items()})
        return out

    for method in METHODS:                # warm-up: first-touch allocations, imports, folders
        once(method)
    rounds = []
    for i in range(saves):
        order = METHODS if i % 2 == 0 else tuple(reversed(METHODS))
        rounds.append({m: once(m) for m in order})
    for run in runs.values():
        run.close()
    with open(os.path.join(folder, f"rank-{rank}.json"), "w") as f:
        json.dump({"rank": rank, "bytes": nbytes, "rounds": rounds}, f)
    dist.barrier()
    dist.destroy_process_group()


def _tensors(state: Any) -> list[Any]:
    import torch

    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    return []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50)
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny model and 2 saves (a smoke run)")
    parser.add_argument("--dir", help="where to write (default: a temp folder on local disk)")
    parser.add_argument("--rank-of", nargs=2, metavar=("SIZE_MB", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.saves = 1, 2
    if args.rank_of:
        rank_main(float(args.rank_of[0]), args.rank_of[1], args.saves)
        return

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="sharded-save-") as folder:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": str(args.ranks), "PYTHONPATH": os.pathsep.join(
                   p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        procs = [subprocess.Popen([sys.executable, __file__, "--saves", str(args.saves),
                                   "--rank-of", str(args.size_mb), folder],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                 for r in range(args.ranks)]
        codes = [p.wait() for p in procs]
        if any(codes):
            sys.exit(f"a rank failed: exit codes {codes}")
        results = [json.loads(Path(folder, f"rank-{r}.json").read_text()) for r in range(args.ranks)]

    nbytes = results[0]["bytes"]
    saves = len(results[0]["rounds"])

    def slowest(method: str, key: str = "stall") -> list[float]:
        """Per round, the slowest rank's figure (a collective save waits for it)."""
        return [max(r["rounds"][i][method].get(key, 0.0) for r in results) for i in range(saves)]

    print(f"{args.ranks} gloo ranks, state {nbytes / 1e6:.0f} MB per rank (DDP MLP + AdamW), "
          f"{saves} saves per method; seconds, slowest rank per round")
    print(f"{'method':<16} {'stall med':>9} {'stall p90':>9} {'durable med':>11} {'durable p90':>11}")
    for method in METHODS:
        stall = slowest(method)
        durable = slowest(method, "durable") if "durable" in results[0]["rounds"][0][method] else None
        tail = (f" {statistics.median(durable):>11.3f} {p90(durable):>11.3f}" if durable else
                f" {'-':>11} {'-':>11}")
        print(f"{method:<16} {statistics.median(stall):>9.3f} {p90(stall):>9.3f}{tail}")

    def parts(method: str) -> dict[str, float]:
        names = {k for r in results for k in r["rounds"][0][method] if k.startswith("part:")}
        return {k[5:]: statistics.median(max(r["rounds"][i][method].get(k, 0.0) for r in results)
                                         for i in range(saves)) for k in sorted(names)}

    split = parts("sweeprun async")
    print("sweeprun async stall, medians of the slowest rank: " +
          ", ".join(f"{k} {v:.3f}" for k, v in split.items()
                    if k not in ("write", "dcp.save", DCP_WRITE, DCP_FINISH, RETENTION) and not k.startswith("commit:")))
    sync = parts("sweeprun sync")
    print("dcp save, medians of the slowest rank: " + ", ".join(f"{k} {v:.3f}" for k, v in parts("dcp save").items()))
    print("sweeprun sync, before its write, medians of the slowest rank: " + ", ".join(
        f"{k} {v:.3f}" for k, v in sync.items()
        if k not in ("write", "dcp.save", DCP_WRITE, DCP_FINISH, RETENTION) and not k.startswith("commit:")))
    dcp_own = [f"part:{DCP_WRITE}", f"part:{DCP_FINISH}"]
    commit = [max(r["rounds"][i]["sweeprun sync"].get("part:write", 0.0)
                  - sum(r["rounds"][i]["sweeprun sync"].get(k, 0.0) for k in dcp_own) for r in results)
              for i in range(saves)]
    print(f"sweeprun sync, medians of the slowest rank: ShardedWriter.write {sync.get('write', 0):.3f} "
          f"(one dcp.save with sweeprun's storage writer), the rest beyond DCP's own writer (fence, "
          f"name, own state, hash waits, manifest, DCP's planning and messages) {statistics.median(commit):.3f}:")
    for r in results:                     # per rank: the gathers are where a rank waits for the others
        labels = [k for k in r["rounds"][0]["sweeprun sync"] if k.startswith("part:commit:") or k in dcp_own]
        print(f"  rank {r['rank']}: " + ", ".join(
            f"{k.removeprefix('part:').removeprefix('commit:')} {statistics.median(x['sweeprun sync'].get(k, 0.0) for x in r['rounds']):.3f}"
            for k in labels))

    lead = next(r for r in results if r["rank"] == 0)
    proper = [x["sweeprun sync"].get("part:commit:rank 0 commit (fence again, manifest)", 0.0)
              for x in lead["rounds"]]
    retention = [sum(x[m].get(f"part:{RETENTION}", 0.0) for m in METHODS) for x in lead["rounds"]]
    print(f"  {RETENTION}, rank 0: {statistics.median(retention):.3f}")
    print(f"  the commit proper (rank 0: fence again + manifest create-only): "
          f"{statistics.median(proper):.3f}, {statistics.median(proper) / statistics.median(slowest('dcp save')) * 100:.0f} % "
          "of dcp save")
    ours, theirs = slowest("sweeprun async"), slowest("dcp async_save")
    floor = slowest("copy")
    sync_ours, sync_dcp = slowest("sweeprun sync"), slowest("dcp save")
    stall_ratio = statistics.median(ours) / statistics.median(theirs)
    paired_stall = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    overhead = statistics.median((a - b) / b for a, b in zip(sync_ours, sync_dcp, strict=True))
    inside = statistics.median(c / d for c, d in zip(commit, slowest("sweeprun sync"), strict=True))
    print(f"ratios at {nbytes / 1e6:.0f} MB x {args.ranks} ranks: stall sweeprun/dcp async_save "
          f"{stall_ratio:.2f}x (paired {paired_stall:.2f}x; target <= 1.1x), stall sweeprun/copy "
          f"{statistics.median(ours) / statistics.median(floor):.2f}x, commit overhead (sync - dcp save)/dcp "
          f"save {overhead * 100:+.0f} % (target <= 10 %), share of the sync save outside DCP's writer "
          f"{inside * 100:.0f} %")


if __name__ == "__main__":
    main()
