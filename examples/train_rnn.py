"""A small word-language-model-style GRU, resumable bit for bit with sweeprun.

It shows the two things a recurrent script must add to the MLP example: state carried
from one step to the next (the hidden state, truncated backpropagation through time)
lives in ``run.extras``, and a validation metric logged at the end of each epoch,
after that epoch's last checkpoint, appears once in metrics.jsonl however the run
is interrupted.

    python examples/train_rnn.py --lr 0.003 --seed 0 --epochs 3 --out /tmp/rnn
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from sweeprun.training import init


def make_corpus(tokens: int, vocab: int, seed: int) -> torch.Tensor:
    """A token stream with structure to learn (a noisy walk), the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-2, 3, (tokens,), generator=g)
    return torch.cumsum(steps, 0).remainder(vocab)


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``(length, batch_size)`` columns of consecutive tokens, as in the PyTorch word LM."""
    length = stream.numel() // batch_size
    return stream[: length * batch_size].view(batch_size, length).t().contiguous()


class LanguageModel(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.drop = nn.Dropout(0.2)
        self.rnn = nn.GRU(width, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        y, hidden = self.rnn(self.drop(self.embed(x)), hidden)
        return self.out(self.drop(y)), hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bptt", type=int, default=8)
    parser.add_argument("--out", help="run directory when not under sweeprun launch")
    parser.add_argument("--save-every-steps", type=int, default=4)
    parser.add_argument("--step-sleep-s", type=float, default=0.0,
                        help="tests: slow each step down so a kill can land mid-run")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    vocab = 32
    train = batchify(make_corpus(8 * 8 * args.bptt + 1, vocab, 1), 8)
    valid = batchify(make_corpus(4 * 2 * args.bptt + 1, vocab, 2), 4)
    model = LanguageModel(vocab, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    chunks = range(0, train.size(0) - 1, args.bptt)
    steps_per_epoch = len(chunks)

    run = init(params=vars(args), local_dir=args.out, every_steps=args.save_every_steps, best="val_loss")
    run.track(model=model, optimizer=optimizer)
    run.restore()

    for epoch in range(run.epoch, args.epochs):
        model.train()
        done_in_epoch = run.step - epoch * steps_per_epoch   # the data position follows from the step
        hidden = run.extras.get("hidden") if done_in_epoch else None
        for start in list(chunks)[done_in_epoch:]:
            x = train[start: start + args.bptt]
            y = train[start + 1: start + 1 + args.bptt]
            if x.size(0) != y.size(0):
                x = x[: y.size(0)]
            logits, hidden = model(x, hidden)
            loss = loss_fn(logits.reshape(-1, vocab), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hidden = hidden.detach()
            run.extras["hidden"] = hidden              # carried into the next step: part of the state
            if args.step_sleep_s:
                time.sleep(args.step_sleep_s)
            run.end_step(loss=loss.item())
        model.eval()
        with torch.no_grad():
            logits, _ = model(valid[:-1], None)
            val_loss = loss_fn(logits.reshape(-1, vocab), valid[1:].reshape(-1)).item()
        run.log(val_loss=val_loss, epoch=epoch)         # after the epoch's last checkpoint
        run.extras.pop("hidden", None)
        run.epoch = epoch + 1
    run.finish()
    print(f"done: step {run.step}")


if __name__ == "__main__":
    main()
