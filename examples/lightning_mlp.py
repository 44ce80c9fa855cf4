"""Train a tiny MLP with PyTorch Lightning, resumable bit for bit with sweeprun.

Dropout, a shuffled DataLoader and an augmentation that draws from the global python and
numpy RNGs: everything a plain Lightning resume gets wrong. sweeprun adds three lines
(the callback, ``callbacks=[sweep]``, ``ckpt_path=sweep.ckpt_path``) and a sampler that
knows where it is in the epoch. Under ``sweeprun launch`` (see sweeps/lightning_mlp.yaml)
the run directory comes from the environment; standalone, pass ``--out DIR``.

    python examples/lightning_mlp.py --lr 0.01 --seed 0 --epochs 4 --out /tmp/lmlp
"""

from __future__ import annotations

import argparse
import math
import random
import time

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sweeprun.integrations.lightning import SweeprunCallback
from sweeprun.training import ResumableSampler


class JitteredPoints(Dataset):
    """Points labelled by a fixed random rule (no download), jittered afresh at every read
    from the global RNGs, as torchvision-style augmentations do."""

    def __init__(self, n: int = 512, features: int = 16, classes: int = 4) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, features, generator=g)
        w = torch.randn(features, classes, generator=g)
        self.y = (torch.tanh(self.x @ w) + 0.3 * torch.randn(n, classes, generator=g)).argmax(dim=1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.from_numpy(np.random.normal(0.0, 0.05, self.x.shape[1]).astype(np.float32))
        return self.x[i] * (0.9 + 0.2 * random.random()) + noise, self.y[i]


class MLP(L.LightningModule):
    def __init__(self, lr: float, weight_decay: float, total_steps: int, step_sleep_s: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
        self.lr, self.weight_decay, self.total_steps = lr, weight_decay, total_steps
        self.step_sleep_s = step_sleep_s

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, on_step=True, on_epoch=False)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        warmup = max(1, self.total_steps // 10)

        def warmup_then_cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, self.total_steps - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="run directory when not under sweeprun launch")
    parser.add_argument("--save-every-steps", type=int, help="save every N steps (default: the automatic interval)")
    parser.add_argument("--step-sleep-s", type=float, default=0.0,
                        help="tests: slow each step down so a kill can land mid-run")
    parser.add_argument("--val", action="store_true", help="validate at the end of each epoch")
    parser.add_argument("--val-every", type=int, help="with --val: also every N training batches")
    parser.add_argument("--unsafe-omit", choices=("rng", "data"), action="append", default=[],
                        help="tests: leave the RNG states out, or shuffle with a plain sampler, "
                             "to show what a plain Lightning resume gets wrong")
    args = parser.parse_args()

    sweep = SweeprunCallback(params=vars(args), local_dir=args.out,
                             every_steps=args.save_every_steps, best="loss",
                             rng="rng" not in args.unsafe_omit)
    torch.set_num_threads(1)  # one core per run, and results independent of the machine's count
    L.seed_everything(args.seed, verbose=False)
    dataset = JitteredPoints()
    # The loader gets its own generator: otherwise starting each epoch's iterator draws from
    # the global RNG, and a run resumed mid-epoch would draw once more than the original.
    loader = DataLoader(dataset, batch_size=args.batch_size,
                        sampler=None if "data" in args.unsafe_omit else ResumableSampler(dataset, seed=args.seed),
                        shuffle=True if "data" in args.unsafe_omit else None,
                        generator=torch.Generator().manual_seed(args.seed))
    model = MLP(args.lr, args.weight_decay, args.epochs * len(loader), args.step_sleep_s)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[sweep],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=args.val_every)
    val = DataLoader(JitteredPoints(n=128), batch_size=64,
                     generator=torch.Generator().manual_seed(args.seed)) if args.val else None
    trainer.fit(model, loader, val, ckpt_path=sweep.ckpt_path)
    print(f"done: step {sweep.run.step}, final loss {trainer.callback_metrics['loss'].item():.4f}")


if __name__ == "__main__":
    main()
