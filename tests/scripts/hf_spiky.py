"""A Trainer regression as users write one, with a NaN sample at ``--poison`` in its data.

``sweeprun_hf.init(spikes=...)`` watches each step's loss: the batch with the NaN rolls the
run back to the sealed folder before it (saves every 4 steps) and past that batch. The
Trainer draws its batches in a seeded random order; the test finds the step from the log.
Standalone with ``--out DIR``; rank 0 writes the final weights to ``<out>/final.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import Trainer, TrainingArguments

import sweeprun
from sweeprun.integrations import transformers as sweeprun_hf


class Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def forward(self, x, y):  # type: ignore[no-untyped-def]
        return {"loss": torch.nn.functional.mse_loss(self.net(x), y)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--poison", type=int, default=37)
    parser.add_argument("--margin", type=int, default=1)
    parser.add_argument("--save-total-limit", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = sweeprun_hf.init(local_dir=args.out, every_s=None, spikes=sweeprun.Spikes(factor=10, window=5, margin=args.margin))
    torch.manual_seed(0)
    n = 4 * (args.steps + 8)
    x = torch.randn(n, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    x[args.poison] = float("nan")
    data = [{"x": x[i], "y": y[i]} for i in range(n)]
    training_args = TrainingArguments(
        output_dir=run.output_dir, max_steps=args.steps, learning_rate=0.05, seed=0,
        per_device_train_batch_size=4, save_strategy="steps", save_steps=4, logging_steps=1,
        save_total_limit=args.save_total_limit,
        max_grad_norm=1.0, report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=Regression(), args=training_args, train_dataset=data, callbacks=[run])
    run.train(trainer)
    weights = trainer.model.net.weight.detach().flatten().tolist()
    with open(os.path.join(args.out or os.environ["SWEEPRUN_RUN_DIR"], "final.json"), "w") as f:
        json.dump({"weight": weights}, f)


if __name__ == "__main__":
    main()
