"""A Lightning regression as users write one, with a NaN sample at ``--poison`` in its data.

The callback watches the loss (``SweeprunCallback(spikes=...)``): the batch with the NaN
rolls the run back to the checkpoint before it, past that batch. Each step logs the first
index of its batch (``first``). Standalone with ``--out DIR``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import sweeprun
from sweeprun.integrations.lightning import SweeprunCallback


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("first", index[0].float(), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--poison", type=int, default=60)
    parser.add_argument("--skip", type=int, default=0)
    args = parser.parse_args()

    callback = SweeprunCallback(local_dir=args.out, every_steps=4,
                                spikes=sweeprun.Spikes(factor=10, window=5, skip=args.skip))
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    n = 4 * (args.steps + 8)
    x = torch.randn(n, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    x[args.poison] = float("nan")
    data = TensorDataset(x, y, torch.arange(n))
    loader = DataLoader(data, batch_size=4, sampler=sweeprun.ResumableSampler(data, shuffle=False))
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=[callback])
    module = Regression()
    trainer.fit(module, loader, ckpt_path=callback.ckpt_path)
    print("final", module.net.weight.detach().flatten().tolist(), flush=True)


if __name__ == "__main__":
    main()
