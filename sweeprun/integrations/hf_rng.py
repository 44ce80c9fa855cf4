"""The Hugging Face Trainer's CPU RNGs, replayed from right before the first resumed fetch.

The Trainer restores the RNGs only after the first resumed batch has been fetched (and,
with accelerate's look-ahead, the second), so a dataset that augments with the global
RNGs diverges at once. :class:`RngReplay` records the CPU RNGs (Python, NumPy, torch)
right before each training fetch (a hook on the train dataset's
``__getitem__``/``__getitems__``) and saves the record for the first untrained batch in
the checkpoint folder as ``sweeprun-rng.pt``, with torch's state at the save. A resume
sets the first from inside the first fetch (after the new loader iterator has drawn its
seed, as the uninterrupted run's did long before), torch's state at the save right after
that fetch (the uninterrupted run trained its last step there), and leaves the Trainer's
late restore to the CUDA RNGs. A save at the end of an epoch fetched nothing ahead: there
the Trainer's own restore, before the loader's iterator, is already right.

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
from ..training.checkpoints import warn

RNG_FILE = "sweeprun-rng.pt"

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
        self._torch_after_first_fetch: Any = None
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
                except TypeError:
                    pass
        collate = trainer.data_collator
        if not getattr(collate, "_sweeprun", False):
            def marked(features: Any) -> Any:
                batch = collate(features)
                if self._in_fetch:
                    self._in_fetch = False
                    if self._torch_after_first_fetch is not None:
                        import torch

                        torch.set_rng_state(self._torch_after_first_fetch)
                        self._torch_after_first_fetch = None
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

    def start(self, resumed: str | None) -> None:
        """Training begins, resumed from the folder ``resumed`` (``None``: a fresh start).
        Arms the restore of the CPU RNGs at the first fetch: after the data loader's new
        iterator has drawn its seed, as in the uninterrupted run, and before the dataset
        draws. The Trainer's own restore comes after that fetch and would rewind them."""
        self._trained = self._fetched = 0
        self._before_fetch.clear()
        self._training = True
        if resumed is None:
            return
        path = os.path.join(resumed, RNG_FILE)
        if not os.path.exists(path):
            warn(f"{path} is missing: the CPU RNGs are restored by the Trainer, after the first "
                 "batches were fetched")
            return
        import torch

        from ..training.state import from_safe

        saved = from_safe(torch.load(path, weights_only=True))
        if saved.get("before_fetch") is None:
            return  # saved at the end of an epoch: nothing fetched ahead, the Trainer's restore is right
        before = saved["before_fetch"]
        self._pending_restore = (before["python"], before.get("numpy"), before["torch"])
        self._torch_after_first_fetch = saved["torch_at_save"]
        self._restored_early = True

    def stop(self) -> None:
        self._training = False

    def trained(self) -> None:
        """One micro-batch was trained (a step, or a gradient-accumulation substep)."""
        self._trained += 1

    def save(self, folder: str) -> None:
        """Write ``sweeprun-rng.pt`` into ``folder``: the CPU RNGs right before the first
        untrained batch was fetched (the data loader fetches one ahead), and torch's now,
        which the next fetch and step continue from."""
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
                return
            before = {"python": state[0], "numpy": state[1], "torch": state[2]}
        buffer = io.BytesIO()
        torch.save(to_safe({"before_fetch": before, "torch_at_save": torch.get_rng_state()}), buffer)
        atomic_write(fsspec.filesystem("file"), os.path.join(folder, RNG_FILE), buffer.getvalue())


def _cpu_rng_state() -> CpuRng:
    import torch

    try:
        import numpy as np
    except ImportError:
        return random.getstate(), None, torch.get_rng_state()
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_cpu_rng_state(state: CpuRng) -> None:
    import torch

    random.setstate(state[0])
    if state[1] is not None:
        import numpy as np

        np.random.set_state(state[1])
    torch.set_rng_state(state[2])
