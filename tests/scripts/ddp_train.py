"""A user's DDP training script, as it is written for torchrun, with sweeprun.

    torchrun --standalone --nproc-per-node 2 tests/scripts/ddp_train.py --out runs/ddp

The script makes its own process group; sweeprun finds it. Compared with a plain DDP
script, three lines change: ``sweeprun.init``, ``ResumableSampler`` in place of
``DistributedSampler`` (it shards the same way and keeps each rank's position), and
``run.track``/``run.restore``/``run.end_step``/``run.finish`` around the loop.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import sweeprun

parser = argparse.ArgumentParser()
parser.add_argument("--out", default=None)
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--save-every-steps", type=int, default=4)
parser.add_argument("--step-sleep-s", type=float, default=0.0)
parser.add_argument("--final", default=None, help="rank 0 writes the gathered final state here")
args = parser.parse_args()

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
torch.set_num_threads(1)
torch.manual_seed(args.seed)                       # the same weights and data on every rank
data = TensorDataset(torch.randn(48, 8), torch.randn(48, 8))
model = DistributedDataParallel(torch.nn.Linear(8, 8))
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
torch.manual_seed(args.seed * 100 + rank)          # each rank its own noise: per-rank RNG matters

run = sweeprun.init(params=vars(args), local_dir=args.out, every_steps=args.save_every_steps)
sampler = sweeprun.ResumableSampler(data, seed=args.seed)   # rank and world size from the group
loader = DataLoader(data, batch_size=4, sampler=sampler,
                    generator=torch.Generator().manual_seed(args.seed))  # not the global RNG
run.track(model=model, optimizer=optimizer, data=sampler)
run.restore()
for epoch in range(run.epoch, args.epochs):
    sampler.set_epoch(epoch)
    for x, y in loader:
        x = x + 0.01 * torch.randn_like(x)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.end_step(loss=loss.item(), reduce="mean")   # rank 0 logs the mean over ranks
        time.sleep(args.step_sleep_s)
    run.epoch = epoch + 1
run.finish()

model_state, optimizer_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True))
if rank == 0 and args.final:
    torch.save({"model": model_state, "optimizer": optimizer_state, "step": run.step}, args.final)
    print(f"done: step {run.step}")
dist.destroy_process_group()
