"""A shuffled sampler whose position in the epoch is part of the checkpoint.

A plain ``DataLoader(shuffle=True)`` draws each epoch's order from a generator and
forgets where it is, so a run resumed mid-epoch either repeats or skips data.
Here each epoch's order is a pure function of ``(seed, epoch)``, so the state is
two integers and a resumed run yields exactly the indices the interrupted one had
not consumed yet.
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

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.size = data_source if isinstance(data_source, int) else len(data_source)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.offset = 0                      # indices of this epoch already handed out
        self._epoch_set = False
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return self.size

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
            self._order = (epoch, indices)
        return self._order[1]

    def __iter__(self) -> Iterator[int]:
        if not self._epoch_set and self.offset >= self.size:
            self.epoch, self.offset = self.epoch + 1, 0
        self._epoch_set = False
        order = self.order(self.epoch)
        while self.offset < self.size:
            index = order[self.offset]
            self.offset += 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "size": self.size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError(
                f"sampler state is for {state['size']} items (seed {state['seed']}, shuffle "
                f"{state['shuffle']}), this sampler has {self.size} (seed {self.seed}, shuffle "
                f"{self.shuffle}); the dataset or its seed changed since the checkpoint")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._epoch_set = False
