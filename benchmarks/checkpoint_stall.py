"""Checkpoint stall: how long a save blocks the training thread, and the memory it adds.

A state of Linear layers and AdamW (weights + two moments: 12 bytes per parameter) of
about 100 MB and 1 GB is saved, on local disk, by:

- ``copy``: cloning every tensor to host memory, the floor of any save that lets
  training go on while a copy is written; ``copy reused``: copying into the buffers of
  the previous copy (no allocation, no page faults), the floor of a save that keeps
  its buffers, as sweeprun's asynchronous saves do;
- ``torch.save`` to a file, and ``torch.save + fsync`` (durable, what a save must be);
- ``sweeprun sync``: ``run.save()`` with ``async_save=False`` (serialise, hash, fsync,
  rename, manifest, retention, all on the training thread);
- ``sweeprun async``: ``run.save(wait=False)``, what the cadence does by default: the
  training thread waits for the snapshot only; the time until the background write is
  durable is shown apart;
- ``dcp async_save``: ``torch.distributed.checkpoint.async_save`` (no process group),
  where this torch runs it;
- ``paired sync``: ``torch.save + fsync`` and ``sweeprun sync`` in turns in one process,
  2 x ``--repeats`` rounds; its stall is sweeprun's, and the ratio line gives the median
  of the per-round ratios, which a machine whose load changes from minute to minute
  (a shared VM) skews far less than two medians taken minutes apart.

Each method runs in a fresh process (so peak memory is its own): one warm-up save,
then the median of ``--repeats`` saves. Peak memory growth is the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs once the state is built)
above what it held then, over the state's size: what saving adds, buffers kept
between saves included.

    python benchmarks/checkpoint_stall.py [--sizes-mb 100 1000] [--repeats 3]

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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

METHODS = ("copy", "copy reused", "torch.save", "torch.save+fsync", "sweeprun sync", "sweeprun async",
           "dcp async_save", "paired sync")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_state(size_mb: float) -> tuple[Any, Any, int]:
    """Linear layers + AdamW after one step (so the moments exist): ~size_mb of tensors."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    width = 4096 if size_mb >= 500 else 2048
    per_layer = (width * width + width) * 12                # weight+bias, AdamW's two moments
    layers = max(1, round(size_mb * 1e6 / per_layer))
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(t.numel() * t.element_size() for s in optimizer.state.values()
                  for t in s.values() if torch.is_tensor(t))
    return model, optimizer, nbytes


def child(size_mb: float, method: str, folder: str, repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)          # as a run of a sweep does (examples/train_mlp.py)
    model, optimizer, nbytes = build_state(size_mb)
    target = os.path.join(folder, "ckpt.pt")
    durable: list[float] = []
    run = None
    dcp = None
    buffers: list[Any] = []

    def save_once() -> float:
        nonlocal dcp
        t0 = time.perf_counter()
        if method == "copy":
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
            snapshot["optim"] = [t.clone() for s in optimizer.state.values() for t in s.values()
                                 if torch.is_tensor(t)]
            stall = time.perf_counter() - t0
            del snapshot
            return stall
        if method == "copy reused":
            tensors = [*model.state_dict().values(),
                       *(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))]
            if not buffers:
                buffers.extend(torch.empty_like(t) for t in tensors)
                t0 = time.perf_counter()
            for buffer, tensor in zip(buffers, tensors, strict=True):
                buffer.copy_(tensor)
            return time.perf_counter() - t0
        if method == "torch.save":
            torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, target)
            return time.perf_counter() - t0
        if method == "torch.save+fsync":
            with open(target, "wb") as f:
                torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            return time.perf_counter() - t0
        if method.startswith("sweeprun"):
            assert run is not None
            if method == "sweeprun async":
                run.save(wait=False)      # what the cadence does: the write overlaps training
                stall = time.perf_counter() - t0
                run.wait()
            else:
                run.save()
                stall = time.perf_counter() - t0
            durable.append(time.perf_counter() - t0)
            return stall
        if method == "dcp async_save":
            import torch.distributed.checkpoint as dist_cp

            state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
            path = os.path.join(folder, f"dcp-{time.monotonic_ns()}")
            future = dist_cp.async_save(state, checkpoint_id=path)
            stall = time.perf_counter() - t0
            future.result()
            durable.append(time.perf_counter() - t0)
            subprocess.run(["rm", "-rf", path], check=True)
            return stall
        raise ValueError(method)

    if method == "paired sync":
        return paired(model, optimizer, nbytes, target, os.path.join(folder, "run"), repeats)
    if method.startswith("sweeprun"):
        import sweeprun

        options: dict[str, Any] = {"async_save": method == "sweeprun async"}
        try:
            run = sweeprun.init(params={}, local_dir=os.path.join(folder, "run"), keep_last=1,
                                every_steps=10**9, **options)
        except TypeError:                 # a sweeprun from before async saves: always sync
            if method == "sweeprun async":
                return {"skipped": "this sweeprun has no async_save"}
            run = sweeprun.init(params={}, local_dir=os.path.join(folder, "run"), keep_last=1,
                                every_steps=10**9)
        run.track(model=model, optimizer=optimizer)
    import gc

    gc.collect()
    can_reset = _reset_peak()
    before = _status_kib("VmRSS")
    try:
        save_once()                       # warm-up: first-touch allocations, imports, folders
    except Exception as exc:  # noqa: BLE001 - a method this torch cannot run is reported, not fatal
        return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"}
    durable.clear()
    stalls = [save_once() for _ in range(repeats)]
    growth = [(_status_kib("VmHWM") - before) * 1024]
    if run is not None:
        run.close()
    return {"bytes": nbytes, "stall_s": statistics.median(stalls),
            "durable_s": statistics.median(durable) if durable else None,
            "peak_growth_bytes": max(growth) if can_reset else None}


def paired(model: Any, optimizer: Any, nbytes: int, target: str, run_dir: str,
           repeats: int) -> dict[str, Any]:
    """torch.save + fsync and a sweeprun sync save in turns: per-round ratios."""
    import torch

    import sweeprun

    run = sweeprun.init(params={}, local_dir=run_dir, keep_last=1, every_steps=10**9,
                        async_save=False).track(model=model, optimizer=optimizer)

    def plain() -> float:
        t0 = time.perf_counter()
        with open(target, "wb") as f:
            torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - t0

    def ours() -> float:
        t0 = time.perf_counter()
        run.save()
        return time.perf_counter() - t0

    plain(), ours()                       # warm-up
    rounds = [(plain(), ours()) for _ in range(2 * repeats)]
    run.close()
    return {"bytes": nbytes, "stall_s": statistics.median(b for _, b in rounds), "durable_s": None,
            "peak_growth_bytes": None, "base_s": statistics.median(a for a, _ in rounds),
            "ratio": statistics.median(b / a for a, b in rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dir", help="where to write (default: a temp folder on local disk)")
    parser.add_argument("--child", nargs=3, metavar=("SIZE_MB", "METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, method, folder = args.child
        print(json.dumps(child(float(size), method, folder, args.repeats)))
        return

    rows: dict[tuple[float, str], dict[str, Any]] = {}
    print(f"{'state':>8} {'method':<18} {'stall s':>8} {'durable s':>9} {'peak +MB':>9} {'peak/state':>10}")
    for size in args.sizes_mb:
        for method in args.methods:
            with tempfile.TemporaryDirectory(dir=args.dir, prefix="ckpt-stall-") as folder:
                out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats),
                                      "--child", str(size), method, folder],
                                     capture_output=True, text=True, check=False)
            try:
                row = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                row = {"skipped": (out.stderr.strip().splitlines() or ["no output"])[-1][:80]}
            rows[size, method] = row
            if "skipped" in row:
                print(f"{size:>6g}MB {method:<18} skipped: {row['skipped']}", flush=True)
                continue
            if "ratio" in row:
                print(f"{size:>6g}MB {method:<18} {row['stall_s']:>8.3f}  (torch.save+fsync "
                      f"{row['base_s']:.3f}, per-round ratio {row['ratio']:.2f})", flush=True)
                continue
            durable = f"{row['durable_s']:.3f}" if row["durable_s"] is not None else "-"
            growth = row["peak_growth_bytes"]
            peak = f"{growth / 1e6:.0f}" if growth is not None else "-"
            rel = f"{growth / row['bytes']:.2f}x" if growth is not None else "-"
            print(f"{size:>6g}MB {method:<18} {row['stall_s']:>8.3f} {durable:>9} {peak:>9} {rel:>10}",
                  flush=True)

    big = max(args.sizes_mb)

    def stall(method: str) -> float | None:
        row = rows.get((big, method), {})
        return row.get("stall_s")

    ratios = []
    for name, a, b in [("async/copy", "sweeprun async", "copy"),
                       ("async/copy reused", "sweeprun async", "copy reused"),
                       ("async/torch.save", "sweeprun async", "torch.save"),
                       ("sync/(torch.save+fsync)", "sweeprun sync", "torch.save+fsync"),
                       ("dcp/copy", "dcp async_save", "copy")]:
        x, y = stall(a), stall(b)
        if x is not None and y:
            ratios.append(f"{name} {x / y:.2f}")
    pair = rows.get((big, "paired sync"), {})
    if "ratio" in pair:
        ratios.append(f"sync/(torch.save+fsync) paired {pair['ratio']:.2f}")
    growth = rows.get((big, "sweeprun async"), {}).get("peak_growth_bytes")
    if growth is not None:
        ratios.append(f"async peak/state {growth / rows[big, 'sweeprun async']['bytes']:.2f}")
    print(f"ratios at {big:g} MB: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
