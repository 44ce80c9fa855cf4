"""A training script as users write it with gradient accumulation: ``run.end_step`` after
every batch, the optimizer stepping every ``--accumulate`` batches.

``--tell`` says which batches stepped (``end_step(optimizer_stepped=...)``); without it
sweeprun sees it from the tracked optimizer. ``--every-batch-is-a-step`` claims every
batch stepped, which lets checkpoints fall inside an accumulation: the broken variant.
"""

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sweeprun

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--accumulate", type=int, default=2)
parser.add_argument("--every-steps", type=int, default=3)
parser.add_argument("--tell", action="store_true")
parser.add_argument("--every-batch-is-a-step", action="store_true")
parser.add_argument("--step-sleep-s", type=float, default=0.01)
parser.add_argument("--sync-saves", action="store_true")
args = parser.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
x = torch.randn(120, 8)
y = (x @ torch.randn(8, 1) + 0.1 * torch.randn(120, 1))
dataset = TensorDataset(x, y)

run = sweeprun.init(params={"lr": 0.05}, local_dir=args.out, every_steps=args.every_steps,
                    async_save=not args.sync_saves)
model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=run.params["lr"])
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
sampler = sweeprun.ResumableSampler(dataset, seed=1)
loader = DataLoader(dataset, batch_size=8, sampler=sampler, generator=torch.Generator().manual_seed(2))
run.track(model=model, optimizer=optimizer, scheduler=scheduler, data=sampler)
run.restore()

for epoch in range(run.epoch, args.epochs):
    sampler.set_epoch(epoch)
    for xb, yb in loader:
        loss = nn.functional.mse_loss(model(xb), yb)
        (loss / args.accumulate).backward()
        stepped = (run.step + 1) % args.accumulate == 0
        if stepped:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        time.sleep(args.step_sleep_s)  # slow enough for a signal to land mid-run
        if args.every_batch_is_a_step:
            run.end_step(optimizer_stepped=True, loss=loss.item())
        elif args.tell:
            run.end_step(optimizer_stepped=stepped, loss=loss.item())
        else:
            run.end_step(loss=loss.item())
    run.epoch = epoch + 1
run.finish()
