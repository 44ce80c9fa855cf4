"""A user's FSDP2 training script (``fully_shard``), as it is written for torchrun, with sweeprun.

    torchrun --standalone --nproc-per-node 2 tests/scripts/fsdp_train.py --out runs/fsdp

Each rank holds a shard of every parameter and of the optimizer state (DTensors);
sweeprun saves them through torch.distributed.checkpoint, every rank its own shards.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard
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
torch.manual_seed(args.seed)
data = TensorDataset(torch.randn(48, 8), torch.randn(48, 8))
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

run = sweeprun.init(params=vars(args), local_dir=args.out, every_steps=args.save_every_steps)
sampler = sweeprun.ResumableSampler(data, seed=args.seed)
loader = DataLoader(data, batch_size=4, sampler=sampler,
                    generator=torch.Generator().manual_seed(args.seed))  # not the global RNG
run.track(model=model, optimizer=optimizer, data=sampler)
run.restore()
for epoch in range(run.epoch, args.epochs):
    sampler.set_epoch(epoch)
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.end_step(loss=loss.item(), reduce="mean")
        time.sleep(args.step_sleep_s)
    run.epoch = epoch + 1
run.finish()

model_state, optimizer_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True))
if rank == 0 and args.final:
    torch.save({"model": model_state, "optimizer": optimizer_state, "step": run.step}, args.final)
    print(f"done: step {run.step}")
dist.destroy_process_group()
