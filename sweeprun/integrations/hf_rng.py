"""The Hugging Face Trainer's CPU RNGs, replayed from right before the first resumed fetch.

The Trainer restores the RNGs only after the first resumed batch has been fetched (and,
with accelerate's look-ahead, the second), so a dataset that augments with the global
RNGs diverges at once. :class:`RngReplay` records the CPU RNGs (Python, NumPy, torch)
right before each training fetch (a hook on the train dataset's
``__getitem__``/``__getitems__``) and saves the record for the first untrained batch in
the checkpoint folder as ``sweeprun-rng.pt``, with the CPU RNGs at the save. A resume
sets the first from inside the first fetch (after the new loader iterator has drawn its
seed, as the uninterrupted run's did long before), the state at the save right after
that fetch (the uninterrupted run trained its last step there, and evaluated: a collator
that draws noise draws in evaluation too), and leaves the Trainer's late restore to the
CUDA RNGs. A save at the end of an epoch fetched nothing ahead: there the Trainer's own
restore, before the loader's iterator, is already right.

A dataset that cannot be hooked (a plain list of examples) is wrapped in a thin
``Dataset`` that marks each fetch the same way.

The same file carries whatever else the callback must put back that the Trainer does not
save (its loss bookkeeping, :mod:`.hf_loop`): one file of sweeprun's per folder.

Kept apart from the callback (:mod:`.transformers`): it is the one part that reaches
into the Trainer's data path, and it knows nothing of runs, seals or stores. It needs
no import of transformers either: it hooks the objects the Trainer already holds.
"""

from __future__ import annotations

import io
import os
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from ..store import atomic_write
from ..store.layout import HF_RNG_FILE, hf_rng_file
from ..training.checkpoints import warn

RNG_FILE = HF_RNG_FILE

CpuRng = tuple[Any, Any, Any]  # (python, numpy or None, torch)


class RngReplay:
    """Records the CPU RNGs before each training fetch; saves and replays them per folder.

    The callback drives it: :meth:`hook` once per Trainer, :meth:`start` and
    :meth:`stop` around ``train()``, :meth:`trained` after each micro-batch, and
    :meth:`save` into each checkpoint folder before it is sealed.
    """

    def __init__(self) -> None:
        self._trained = 0                      # micro-batches trained by this process
        self._fetched = 0                      # micro-batches fetched (collated) by this process
        self._before_fetch: deque[tuple[int, CpuRng]] = deque(maxlen=256)
        self._in_fetch = False                 # a training batch is being fetched
        self._training = False
        self._pending_restore: CpuRng | None = None
        self._after_first_fetch: CpuRng | None = None
        self._restored_early = False
        self._warned = False

    def hook(self, trainer: Any) -> None:
        """Mark the moment right before each training batch is fetched (the train dataset's
        ``__getitem__``/``__getitems__``) and right after (the collator), and keep the Trainer's
        late RNG restore from rewinding the CPU RNGs that the first fetches already used."""
        dataset = trainer.train_dataset
        cls = type(dataset)
        if trainer.args.dataloader_num_workers > 0:
            warn("dataloader_num_workers > 0: the dataset runs in worker processes, which the "
                 "data loader seeds itself; a resumed run's augmentation may differ (use 0 for an "
                 "exact resume)")
        elif dataset is not None and not getattr(cls, "_sweeprun", False):
            methods = {name: getattr(cls, name) for name in ("__getitem__", "__getitems__")
                       if callable(getattr(cls, name, None))}
            if methods:
                hooked: dict[str, Any] = {"_sweeprun": True, "__module__": cls.__module__}
                for name, method in methods.items():
                    hooked[name] = self._before_item(method)
                try:
                    dataset.__class__ = type(cls.__name__, (cls,), hooked)
                except TypeError:   # a builtin (a list of examples): its class is fixed
                    trainer.train_dataset = _Marked(dataset, self._before_item(_Marked.fetch))
        collate = trainer.data_collator
        if not getattr(collate, "_sweeprun", False):
            def marked(features: Any) -> Any:
                batch = collate(features)
                if self._in_fetch:
                    self._in_fetch = False
                    if self._after_first_fetch is not None:
                        _set_cpu_rng_state(self._after_first_fetch)
                        self._after_first_fetch = None
                return batch

            marked._sweeprun = True  # type: ignore[attr-defined]
            trainer.data_collator = marked
        load = trainer._load_rng_state

        def load_keeping_cpu(checkpoint: Any) -> None:
            if self._restored_early:
                kept = _cpu_rng_state()
                load(checkpoint)            # CUDA and other devices: their state at the save
                _set_cpu_rng_state(kept)
            else:
                load(checkpoint)

        trainer._load_rng_state = load_keeping_cpu

    def _before_item(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def hooked(dataset: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._in_fetch and self._training:
                self._in_fetch = True
                if self._pending_restore is not None:
                    _set_cpu_rng_state(self._pending_restore)
                    self._pending_restore = None
                self._fetched += 1
                self._before_fetch.append((self._fetched, _cpu_rng_state()))
            return method(dataset, *args, **kwargs)

        return hooked

    def start(self, resumed: str | None, saved: dict[str, Any] | None = None,
              rank: int | None = None) -> None:
        """Training begins, resumed from the folder ``resumed`` (``None``: a fresh start).
        Arms the restore of the CPU RNGs at the first fetch: after the data loader's new
        iterator has drawn its seed, as in the uninterrupted run, and before the dataset
        draws. The Trainer's own restore comes after that fetch and would rewind them.
        ``saved``: the folder's file as :func:`load` read it (``None``: it has none)."""
        self._trained = self._fetched = 0
        self._before_fetch.clear()
        self._training = True
        if resumed is None:
            return
        if saved is None:
            warn(f"{os.path.join(resumed, hf_rng_file(rank))} is missing: the CPU RNGs are restored by the "
                 "Trainer, after the first batches were fetched")
            return
        if saved.get("before_fetch") is None:
            return  # saved at the end of an epoch: nothing fetched ahead, the Trainer's restore is right
        before = saved["before_fetch"]
        self._pending_restore = (before["python"], before.get("numpy"), before["torch"])
        at_save = saved.get("cpu_at_save") or {"torch": saved["torch_at_save"]}  # older files: torch's only
        self._after_first_fetch = (at_save.get("python"), at_save.get("numpy"), at_save["torch"])
        self._restored_early = True

    def stop(self) -> None:
        self._training = False

    def trained(self) -> None:
        """One micro-batch was trained (a step, or a gradient-accumulation substep)."""
        self._trained += 1

    def save(self, folder: str, extra: dict[str, Any] | None = None, rank: int | None = None) -> None:
        """Write ``sweeprun-rng.pt`` (one rank of several: ``sweeprun-rng-<rank>.pt``) into
        ``folder``: the CPU RNGs right before the first untrained batch was fetched (the data
        loader fetches one ahead), and the CPU RNGs now,
        which the next fetch and step continue from; ``extra`` is stored along (:func:`load`)."""
        import fsspec
        import torch

        from ..training.state import to_safe

        before = None
        if self._fetched > self._trained:
            state = next((s for n, s in self._before_fetch if n == self._trained + 1), None)
            if state is None:
                if not self._warned:
                    self._warned = True
                    warn("no record of the training fetches (an IterableDataset, or the dataset "
                         "or collator replaced after run.train() began?): a resumed run's "
                         "augmentation RNG will differ")
                if not extra:
                    return
            else:
                before = _as_dict(state)
        now = _cpu_rng_state()
        record = {"before_fetch": before, "torch_at_save": now[2], "cpu_at_save": _as_dict(now)}
        if extra:
            record["extra"] = extra
        buffer = io.BytesIO()
        torch.save(to_safe(record), buffer)
        atomic_write(fsspec.filesystem("file"), os.path.join(folder, hf_rng_file(rank)), buffer.getvalue())


def load(folder: str, rank: int | None = None) -> dict[str, Any] | None:
    """``folder``'s ``sweeprun-rng.pt`` (rank ``rank``'s) as :meth:`RngReplay.save` wrote it;
    ``None`` if it has none."""
    path = os.path.join(folder, hf_rng_file(rank))
    if not os.path.exists(path):
        return None
    import torch

    from ..training.state import from_safe

    return from_safe(torch.load(path, weights_only=True))


class _Marked:
    """A train dataset whose class cannot be hooked (a list), wrapped so its fetches are marked."""

    _sweeprun = True

    def __init__(self, items: Any, getitem: Callable[..., Any]) -> None:
        self.items = items
        self._getitem = getitem

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: Any) -> Any:
        return self._getitem(self, i)

    def fetch(self, i: Any) -> Any:
        return self.items[i]


def _as_dict(state: CpuRng) -> dict[str, Any]:
    return {"python": state[0], "numpy": state[1], "torch": state[2]}


def _cpu_rng_state() -> CpuRng:
    import torch

    try:
        import numpy as np
    except ImportError:
        return random.getstate(), None, torch.get_rng_state()
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_cpu_rng_state(state: CpuRng) -> None:
    """Python's and NumPy's only where given (``None``: left as they are), torch's always."""
    import torch

    if state[0] is not None:
        random.setstate(state[0])
    if state[1] is not None:
        import numpy as np

        np.random.set_state(state[1])
    torch.set_rng_state(state[2])
