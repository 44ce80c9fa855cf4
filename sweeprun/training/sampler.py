"""A shuffled sampler whose position in the epoch is part of the checkpoint.

A plain ``DataLoader(shuffle=True)`` draws each epoch's order from a generator and
forgets where it is, so a run resumed mid-epoch either repeats or skips data.
Here each epoch's order is a pure function of ``(seed, epoch)``, so the state is
two integers and a resumed run yields exactly the indices the interrupted one had
not consumed yet.

With several ranks it shards each epoch's order as ``DistributedSampler`` does: rank ``r``
of ``R`` takes every ``R``-th index from ``r``, and an order that does not divide evenly
is padded with its first indices (``drop_last=False``, the default) or cut
(``drop_last=True``), so every rank has the same number of samples and steps. Each rank
keeps its own position; they move in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any


class ResumableSampler:
    """Pass as ``DataLoader(dataset, sampler=ResumableSampler(dataset, seed=...))`` and register it.

    Each iteration yields the rest of the current epoch, then the next epoch starts
    with the next iteration. Loops that count epochs themselves call
    :meth:`set_epoch` first (as with ``DistributedSampler``): a run restored at the
    very end of epoch ``e`` then yields nothing for ``e`` rather than a spare epoch.

    The count is of indices handed to the DataLoader, which with ``num_workers=0``
    (and ``drop_last``) is exactly what training consumed. Worker processes prefetch
    batches ahead of training; for those, use torchdata's ``StatefulDataLoader``.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, drop_last: bool = False) -> None:
        self.size = data_source if isinstance(data_source, int) else len(data_source)
        self.shuffle = shuffle
        self.seed = int(seed)
        if num_replicas is None or rank is None:
            group_size, group_rank = _process_group()
            num_replicas = group_size if num_replicas is None else num_replicas
            rank = group_rank if rank is None else rank
        if not (isinstance(num_replicas, int) and num_replicas >= 1 and isinstance(rank, int)
                and 0 <= rank < num_replicas):
            raise ValueError(f"rank {rank!r} of num_replicas {num_replicas!r} is not a rank: "
                             "num_replicas >= 1 and 0 <= rank < num_replicas")
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, bool(drop_last)
        if self.drop_last and self.size % num_replicas:
            self.num_samples = (self.size - num_replicas) // num_replicas + 1 if self.size >= num_replicas else 0
        else:
            self.num_samples = -(-self.size // num_replicas)
        self.epoch = 0
        self.offset = 0                      # indices of this epoch already handed out (this rank's)
        self._epoch_set = False
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """This rank's samples per epoch (all of them with one rank)."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order; its consumed part is kept when it is the restored epoch."""
        if epoch != self.epoch:
            self.epoch, self.offset = epoch, 0
        self._epoch_set = True

    def order(self, epoch: int) -> list[int]:
        """The full index order of ``epoch``, the same on every machine."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                import torch

                generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
                indices = torch.randperm(self.size, generator=generator).tolist()
            else:
                indices = list(range(self.size))
            self._order = (epoch, self._shard(indices))
        return self._order[1]

    def _shard(self, indices: list[int]) -> list[int]:
        """This rank's part of an epoch's order, as ``DistributedSampler`` takes it."""
        if self.num_replicas == 1:
            return indices
        total = self.num_samples * self.num_replicas
        if total > len(indices):               # pad with the order's own first indices
            indices = (indices * (-(-total // len(indices))))[:total] if indices else []
        return indices[:total][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if not self._epoch_set and self.offset >= self.num_samples:
            self.epoch, self.offset = self.epoch + 1, 0
        self._epoch_set = False
        order = self.order(self.epoch)
        while self.offset < self.num_samples:
            index = order[self.offset]
            self.offset += 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                 "size": self.size, "shuffle": self.shuffle}
        if self.num_replicas > 1:
            state.update(num_replicas=self.num_replicas, rank=self.rank, drop_last=self.drop_last)
        return state

    def state_dict_after(self, indices: int) -> dict[str, Any]:
        """:meth:`state_dict` as it will be once ``indices`` more were handed out, up to the end
        of this epoch: where a loss-spike rollback's ``skip`` batches take the data. Not
        past it, since the loop's own epoch counter (``set_epoch``) would take it back."""
        state = self.state_dict()
        state["offset"] = min(self.offset + max(0, indices), self.num_samples)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError(
                f"sampler state is for {state['size']} items (seed {state['seed']}, shuffle "
                f"{state['shuffle']}), this sampler has {self.size} (seed {self.seed}, shuffle "
                f"{self.shuffle}); the dataset or its seed changed since the checkpoint")
        if bool(state.get("drop_last", False)) != self.drop_last and max(state.get("num_replicas", 1),
                                                                          self.num_replicas) > 1:
            raise ValueError(f"sampler state has drop_last={state.get('drop_last', False)}, this "
                             f"sampler drop_last={self.drop_last}; pass the same drop_last")
        saved = int(state.get("num_replicas", 1))
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        if saved != self.num_replicas:
            # another world size: the ranks had each taken ``offset`` indices of the epoch's
            # order, together ``offset * saved``; this rank goes on from its share of that
            # point. Approximate (the run records it): the pad and the rank boundaries move.
            self.offset = min(self.offset * saved // self.num_replicas, self.num_samples)
        self._epoch_set = False


def _process_group() -> tuple[int, int]:
    """``(world size, rank)`` of the initialised default process group; ``(1, 0)`` without one."""
    import sys

    if "torch" not in sys.modules:
        return 1, 0
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
