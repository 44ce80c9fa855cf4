"""A regression script written the way users write one, with a bad sample in its data.

Sample ``--poison`` of the dataset is scaled by ``--scale`` (or set to NaN with
``--nan``): the batch that holds it makes the loss spike, the script still calls
``backward`` and ``step`` (as scripts do), and the weights are damaged until sweeprun rolls
the run back. ``--always-from K`` makes every loss from step K on NaN: a run that diverges
whatever is skipped. ``--oom-above B`` raises torch's ``OutOfMemoryError`` at step 5 when the
batch (``--batch``) is larger than B, as a GPU would. Each step logs the loss and the indices of its batch, so the test can
see which batches trained. Standalone (``--out``) or under ``sweeprun launch`` (the sweep's
parameters carry the same names). With several ranks (torchrun), the poison is in rank
``--poison-rank``'s data only; the model is DDP and each rank keeps its own sampler.

At the end rank 0 writes the final weights to ``--final`` (default ``<run folder>/final.json``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import sweeprun

parser = argparse.ArgumentParser()
parser.add_argument("--out")
parser.add_argument("--final", help="where rank 0 writes the final weights (default: <run folder>/final.json)")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--every", type=int, default=4)
parser.add_argument("--keep-last", type=int, default=3)
parser.add_argument("--poison", type=int, default=-1)
parser.add_argument("--poison-count", type=int, default=1, help="poison this many samples from --poison on")
parser.add_argument("--poison-rank", type=int, default=0)
parser.add_argument("--scale", type=float, default=1e3)
parser.add_argument("--nan", action="store_true")
parser.add_argument("--always-from", type=int, default=0)
parser.add_argument("--window", type=int, default=5)
parser.add_argument("--factor", type=float, default=10.0)
parser.add_argument("--patience", type=int, default=1)
parser.add_argument("--margin", type=int, default=1)
parser.add_argument("--skip", type=int, default=0)
parser.add_argument("--max-rollbacks", type=int, default=3)
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--oom-above", type=int, default=0,
                    help="a batch larger than this runs out of memory at step 5 (as a GPU would)")
args = parser.parse_args()

distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
if distributed:
    torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank() if distributed else 0

torch.manual_seed(0)
torch.set_num_threads(1)
n = 4 * (args.steps + 8)
x = torch.randn(n, 4)
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.01 * torch.randn(n, 1)
if args.poison >= 0 and rank == args.poison_rank:
    bad = slice(args.poison, args.poison + args.poison_count)
    x[bad] = float("nan") if args.nan else x[bad] * args.scale
data = torch.utils.data.TensorDataset(x, y, torch.arange(n))

model = torch.nn.Linear(4, 1)
if distributed:
    model = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
sampler = sweeprun.ResumableSampler(data, shuffle=False)
loader = torch.utils.data.DataLoader(data, batch_size=args.batch, sampler=sampler)

run = sweeprun.init({"lr": 0.05}, local_dir=args.out, every_steps=args.every, keep_last=args.keep_last,
                    spikes=sweeprun.Spikes(factor=args.factor, window=args.window, warmup=args.window, patience=args.patience,
                                           margin=args.margin, skip=args.skip,
                                           max_rollbacks=args.max_rollbacks))
run.track(model=model, optimizer=optimizer, sampler=sampler)
run.restore()
print(f"batch {args.batch}, oom_retry {run.oom_retry}", flush=True)

while run.step < args.steps:
    for xb, yb, index in loader:
        if args.oom_above and args.batch > args.oom_above and run.step + 1 == 5:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {args.batch} GiB")
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        if args.always_from and run.step + 1 >= args.always_from:
            loss = loss * float("nan")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        run.end_step(loss=loss.item(), first=int(index[0]))
        if run.step >= args.steps:
            break
run.finish()

if rank == 0:
    weights = model.module if distributed else model
    with open(args.final or os.path.join(args.out or os.environ["SWEEPRUN_RUN_DIR"], "final.json"), "w") as f:
        json.dump({k: v.flatten().tolist() for k, v in weights.state_dict().items()}, f)
if distributed:
    torch.distributed.destroy_process_group()
