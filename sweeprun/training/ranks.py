"""The ranks of a multi-process run (torchrun, ``sweeprun launch`` with ``nproc: N``).

Every rank calls :func:`~.start.init` and drives its own :class:`~.run.Run`; the decisions
that must be the same everywhere are taken here, together:

- at each :meth:`~.run.Run.end_step`, one all-gather of ``[stop, save due, metrics...]``:
  a SIGTERM seen by one rank, a time budget or an ``every_s`` clock that ran out on one,
  makes every rank save at that same step (:meth:`Ranks.agree`); the metrics the script
  asked to reduce are reduced in the same message;
- during a save, which checkpoint it is and whether every rank's part is durable
  (:mod:`.sharded`).

sweeprun's own messages travel on a gloo group: a gather of a few numbers per step costs
no GPU synchronisation, and under NCCL the script's own collectives are not held up by
them. With a gloo default group (CPU runs) it is the default group itself.

Nothing here imports torch at import time: :func:`detect` imports it only when the
environment says the process is one rank of several.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import CheckpointError

#: The reductions ``end_step(reduce=...)`` and ``log(reduce=...)`` accept.
REDUCTIONS = ("mean", "sum", "min", "max")


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise CheckpointError(f"{name}={raw!r} is not a non-negative integer; it is set by "
                              "torchrun (or sweeprun launch with nproc:)")
    return int(raw)


@dataclass
class Ranks:
    """This process's place among the run's ranks, and the group sweeprun talks on."""

    rank: int
    world_size: int
    group: Any = None            # the process group of sweeprun's own collectives
    save_group: Any = None       # ... of the background saves': never the training thread's

    @property
    def leader(self) -> bool:
        """Rank 0 writes what the run has one of: metrics, manifests, markers."""
        return self.rank == 0

    def gather(self, obj: Any, group: Any = None) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (on :attr:`group` unless given)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group if group is None else group)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def agree(self, stop: bool, due: bool, metrics: dict[str, Any],
              reduce: str | Mapping[str, str] | None, failed: bool = False, spike: int | None = None,
              suspected: int | None = None) -> Agreed:
        """One all-gather per step: stop, save, and raise a failed background save's error,
        when any rank wants to (a rank's thread may learn its save's outcome a step before
        another's: all raise it at the same step); a loss spike that any rank saw (``spike``:
        its first step), the earliest start, and the earliest a rank ``suspected``; and the
        metrics named in ``reduce`` reduced
        across ranks (the others as rank 0 has them).

        Every rank must name the same metrics to reduce: they travel as one vector."""
        import torch
        import torch.distributed as dist

        ops = _reductions(metrics, reduce)
        names = sorted(ops)
        values = [float(metrics[name]) for name in names]
        mine = torch.tensor([float(stop), float(due), float(failed), float(len(names)),
                             -1.0 if spike is None else float(spike),
                             -1.0 if suspected is None else float(suspected), *values], dtype=torch.float64)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        table = torch.stack(gathered)
        if bool((table[:, 3] != len(names)).any()):
            raise CheckpointError(_mismatch(names))
        starts = [int(v) for v in table[:, 4].tolist() if v >= 0]
        doubts = [int(v) for v in table[:, 5].tolist() if v >= 0]
        reduced = dict(metrics)
        for column, name in enumerate(names, start=6):
            values_ = table[:, column]
            op = ops[name]
            value = (values_.mean() if op == "mean" else values_.sum() if op == "sum"
                     else values_.min() if op == "min" else values_.max())
            reduced[name] = value.item()
        flags = [bool(table[:, column].max() > 0) for column in range(3)]
        return Agreed(flags[0], flags[1], reduced, flags[2], min(starts) if starts else None,
                      min(doubts) if doubts else None)


class Agreed(NamedTuple):
    """What the ranks decided together at one step (:meth:`Ranks.agree`)."""

    stop: bool
    due: bool
    metrics: dict[str, Any]
    failed: bool
    spike: int | None       # the earliest start of a spike any rank saw
    suspected: int | None   # the earliest start of high values any rank suspects


def _mismatch(names: list[str]) -> str:
    return (f"the ranks asked to reduce different metrics (this rank: {', '.join(names) or 'none'}); "
            "every rank must call end_step/log with the same names and the same reduce=")


def check_reduce(metrics: dict[str, Any], reduce: str | Mapping[str, str]) -> None:
    """Refuse a ``reduce`` that names a metric not logged, a non-number or an unknown
    reduction (ValueError) with one process too: the script must not fail only at N ranks."""
    _reductions(metrics, reduce)


def _reductions(metrics: dict[str, Any], reduce: str | Mapping[str, str] | None) -> dict[str, str]:
    """``{metric: op}`` for the metrics to reduce; a bad ``reduce`` is a ValueError naming it."""
    if reduce is None:
        return {}
    if isinstance(reduce, str):
        ops = {name: reduce for name, value in metrics.items() if _number(value)}
    else:
        ops = dict(reduce)
        missing = sorted(set(ops) - set(metrics))
        if missing:
            raise ValueError(f"reduce= names {', '.join(missing)}, which this call does not log")
    for name, op in ops.items():
        if op not in REDUCTIONS:
            raise ValueError(f"reduce={op!r} for {name!r} is not one of {', '.join(REDUCTIONS)}")
        if not _number(metrics[name]):
            raise ValueError(f"reduce= names {name!r}, whose value {metrics[name]!r} is not a number")
    return ops


def _number(value: Any) -> bool:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def join_from_env(env: Mapping[str, str] | None = None) -> None:
    """Initialise the default process group of a process that torchrun (or ``sweeprun launch``
    with ``nproc:``) started as one rank of several, if the script has not: for frameworks
    that make it themselves only once training starts (Lightning's DDP strategy, the
    Trainer's accelerate state), while sweeprun needs every rank from :func:`~.start.init`
    on. The backends are those they would pick: gloo for CPU tensors, NCCL for CUDA ones.
    They find the group initialised and use it."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE")
    if not (world and world > 1):
        return
    import torch
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return
    local = _env_int(env, "LOCAL_RANK")
    if local is not None and local < torch.cuda.device_count():
        torch.cuda.set_device(local)   # NCCL binds to the current device: one GPU per rank
    dist.init_process_group("cpu:gloo,cuda:nccl")


def detect(env: Mapping[str, str] | None = None) -> Ranks | None:
    """This process's ranks, from the initialised default process group or, before the
    script made one, ``RANK``/``WORLD_SIZE`` (torchrun's); ``None`` for a process without
    a process group. A script that made one is a multi-rank script even when it runs as one
    rank: its checkpoints are DCP's too (an FSDP2 model's DTensors need it), so they reshard
    when the run resumes at another world size, in either direction.

    A process that is one of several must have initialised its process group before
    :func:`~.start.init`: checkpoints are written together, so sweeprun needs it."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE")
    if "torch" not in sys.modules and not (world and world > 1):
        return None                      # not a torch run, or one process: nothing to import
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if world and world > 1:
            raise CheckpointError(
                f"WORLD_SIZE={world}, RANK={env.get('RANK', '?')} but the process group is not "
                "initialised; call torch.distributed.init_process_group() before sweeprun.init()")
        return None
    group = None
    if dist.get_backend() != "gloo":
        group = dist.new_group(backend="gloo")   # collective: every rank calls init() once
    # a background save talks on its own group: two threads never share one (their messages
    # would interleave, or each wait on the other: KempnerForge #104)
    save_group = dist.new_group(backend="gloo")
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), group=group,
                 save_group=save_group)
