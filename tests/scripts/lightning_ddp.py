"""A Lightning script trained with DDP on several processes, made resumable with sweeprun.

    torchrun --standalone --nproc-per-node 2 tests/scripts/lightning_ddp.py --out runs/lddp

(or ``nproc: 2`` in a sweep file). ``Trainer(strategy="ddp", devices=<WORLD_SIZE>)`` finds
the ranks torchrun started; the callback is made first, as on one process, and the
sampler is :class:`~sweeprun.training.ResumableSampler`, which shards by rank itself (so
``use_distributed_sampler=False``). Each rank seeds its own RNGs differently (dropout and
the augmentation differ per rank), so a resume is exact only if every rank gets its own
RNG states and data position back.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sweeprun.integrations.lightning import SweeprunCallback
from sweeprun.training import ResumableSampler


class Regressor(L.LightningModule):
    def __init__(self, lr: float, sleep_s: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 8))
        self.lr, self.sleep_s = lr, sleep_s

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x * (0.9 + 0.2 * random.random()) + torch.from_numpy(
            np.random.normal(0, 0.05, x.shape).astype(np.float32))
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, sync_dist=True)         # the mean over the ranks
        time.sleep(self.sleep_s)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--save-every-steps", type=int, default=4)
    parser.add_argument("--step-sleep-s", type=float, default=0.0)
    parser.add_argument("--final", default=None, help="rank 0 writes the final state here")
    args = parser.parse_args()

    sweep = SweeprunCallback(params=vars(args), local_dir=args.out, every_steps=args.save_every_steps)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    g = torch.Generator().manual_seed(1234)
    data = TensorDataset(torch.randn(48, 8, generator=g), torch.randn(48, 8, generator=g))
    L.seed_everything(args.seed * 100 + rank, verbose=False)   # each rank its own noise
    loader = DataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=args.seed),
                        generator=torch.Generator().manual_seed(args.seed))
    model = Regressor(args.lr, args.step_sleep_s)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", 1)),
                        max_epochs=args.epochs, callbacks=[sweep], use_distributed_sampler=False,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, loader, ckpt_path=sweep.ckpt_path)
    if trainer.is_global_zero and args.final:
        torch.save({"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                    "step": sweep.run.step}, args.final)
        print(f"done: step {sweep.run.step}")


if __name__ == "__main__":
    main()
