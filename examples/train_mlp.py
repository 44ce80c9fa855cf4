"""Train a small MLP on a synthetic dataset, resumable bit for bit with sweeprun.

Under ``sweeprun launch`` (see sweeps/quickstart.yaml) the run directory comes from
the environment; standalone, pass ``--out DIR``. Run the same command again after
any interruption (Ctrl-C, SIGTERM, a lost machine) and it continues exactly where
the last checkpoint left it.

    python examples/train_mlp.py --lr 0.01 --weight-decay 0.0001 --seed 0 --epochs 4 --out /tmp/mlp
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sweeprun.training import ResumableSampler, init

OMITTABLE = ("optimizer", "scheduler", "rng", "data")


def make_dataset(n: int = 512, features: int = 16, classes: int = 4) -> TensorDataset:
    """Points labelled by a fixed random nonlinear rule: the same on every machine, no download."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (torch.tanh(x @ w) + 0.3 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="run directory when not under sweeprun launch")
    parser.add_argument("--save-every-steps", type=int, help="save every N steps (default: the automatic interval)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler (cuda)")
    parser.add_argument("--step-sleep-s", type=float, default=0.0,
                        help="tests: slow each step down so a kill can land mid-run")
    parser.add_argument("--unsafe-omit", choices=OMITTABLE, action="append", default=[],
                        help="tests: leave this piece of state out of checkpoints, to show it matters")
    args = parser.parse_args()
    omit = set(args.unsafe_omit)
    device = torch.device(args.device)
    if device.type == "cuda":  # bitwise-reproducible kernels, so a resumed run can match exactly
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    # One thread per run: a sweep runs several at once (no oversubscribed cores), and the
    # result does not depend on how many cores the machine that resumes the run has.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    dataset = make_dataset()
    sampler = ResumableSampler(dataset, seed=args.seed)
    # The loader gets its own generator: otherwise starting each epoch's iterator draws
    # from the global RNG, and a run resumed mid-epoch would draw once more than the original.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                        generator=torch.Generator().manual_seed(args.seed))
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4)).to(device)
    if args.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                                    weight_decay=args.weight_decay)
    total_steps = args.epochs * len(loader)
    warmup_steps = max(1, total_steps // 10)

    def warmup_then_cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)
    loss_fn = nn.CrossEntropyLoss()

    run = init(params=vars(args), local_dir=args.out, every_steps=args.save_every_steps,
               best="loss", rng="rng" not in omit)
    run.track(model=model,
              optimizer=None if "optimizer" in omit else optimizer,
              scheduler=None if "scheduler" in omit else scheduler,
              scaler=scaler if args.amp else None,
              data=None if "data" in omit else sampler)
    run.restore()

    for epoch in range(run.epoch, args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            if args.step_sleep_s:
                time.sleep(args.step_sleep_s)
            run.extras["last_loss"] = loss.item()  # saved too, so a resumed run can still report it
            run.end_step(loss=loss.item(), lr=lr, epoch=epoch)
        run.epoch = epoch + 1
    run.finish()
    print(f"done: step {run.step}, final loss {run.extras.get('last_loss', float('nan')):.4f}")


if __name__ == "__main__":
    main()
