"""A Lightning script as users write them, made resumable with sweeprun's callback.

Gradient accumulation, a ReduceLROnPlateau stepped per epoch on an epoch-level metric,
validation twice per epoch, ModelCheckpoint keeping the 2 best in the run folder,
EarlyStopping, per-epoch metrics, dropout and an augmentation drawing from the global
RNGs. Standalone with ``--out DIR``; under ``sweeprun launch`` without it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sweeprun.integrations.lightning import SweeprunCallback
from sweeprun.training import ResumableSampler


def points(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :4].sum(dim=1) + 0.5 * torch.randn(n, generator=g) > 0).long()
    return TensorDataset(x, y)


class Classifier(L.LightningModule):
    def __init__(self, lr: float, sleep_s: float, val_sleep_s: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
        self.lr, self.sleep_s, self.val_sleep_s = lr, sleep_s, val_sleep_s

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x * (0.9 + 0.2 * random.random()) + torch.from_numpy(
            np.random.normal(0, 0.05, x.shape).astype(np.float32))
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        time.sleep(self.sleep_s)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))
        time.sleep(self.val_sleep_s)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0,
                                                             threshold=0.4)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": plateau, "interval": "epoch",
                                 "monitor": "train_loss_epoch"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out")
    parser.add_argument("--save-every-steps", type=int, default=5)
    parser.add_argument("--sleep-s", type=float, default=0.0, help="per training batch")
    parser.add_argument("--val-sleep-s", type=float, default=0.0, help="per validation batch")
    parser.add_argument("--linger-s", type=float, default=0.0, help="wait after fit returns")
    parser.add_argument("--shuffle", action="store_true",
                        help="the broken variant: shuffle=True, a loader that cannot say where it is")
    parser.add_argument("--tracker", help="mlflow, wandb or tensorboard: what is logged goes there too")
    args = parser.parse_args()

    sweep = SweeprunCallback(params={k: v for k, v in vars(args).items() if k != "tracker"}, local_dir=args.out,
                             every_steps=args.save_every_steps, tracker=args.tracker)
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    train = points(192, 1)
    loader = DataLoader(train, batch_size=8,
                        sampler=None if args.shuffle else ResumableSampler(train, seed=args.seed),
                        shuffle=True if args.shuffle else None,
                        generator=torch.Generator().manual_seed(args.seed))
    val = DataLoader(points(64, 2), batch_size=32)
    best = ModelCheckpoint(dirpath=os.path.join(sweep.run.dir, "lightning_ckpts"),
                           monitor="val_loss", save_top_k=2,
                           filename="{epoch}-{step}-{val_loss:.4f}")
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        accumulate_grad_batches=2, val_check_interval=0.5,
                        callbacks=[sweep, best, EarlyStopping(monitor="val_loss", patience=1,
                                                                    min_delta=0.005)],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(args.lr, args.sleep_s, args.val_sleep_s), loader, val,
                ckpt_path=sweep.ckpt_path)
    print(f"fit returned at step {sweep.run.step}", flush=True)
    time.sleep(args.linger_s)


if __name__ == "__main__":
    sys.exit(main())
