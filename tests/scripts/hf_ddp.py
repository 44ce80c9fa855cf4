"""A Hugging Face Trainer script launched on several processes, made resumable with sweeprun.

    torchrun --standalone --nproc-per-node 2 tests/scripts/hf_ddp.py --out runs/hfddp

(or ``nproc: 2`` in a sweep file). Nothing in it is about ranks: the Trainer finds them in
the environment torchrun sets and trains with DDP, as it would without sweeprun. A tiny
GPT-2 built from a config (no download), dropout on, shuffled data, an augmentation that
draws from the global Python and NumPy RNGs, each rank seeded differently.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from sweeprun.integrations import transformers as sweeprun_hf

VOCAB, LENGTH = 32, 8


class Sequences(Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(1234)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        strides = torch.randint(1, 5, (n, 1), generator=g)
        self.rows = (starts + strides * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = (self.rows[i] + random.randint(0, 3)) % VOCAB        # python RNG
        if np.random.rand() < 0.3:                                 # numpy RNG
            row = row.clone()
            row[np.random.randint(LENGTH)] = 0
        return {"input_ids": row, "labels": row.clone()}


class Slow(TrainerCallback):
    """Tests: slow each step so a kill from outside lands mid-run."""

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        time.sleep(self.sleep_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--every-s", type=float, default=None, help="sweeprun's time cadence")
    parser.add_argument("--step-sleep-s", type=float, default=0.0)
    parser.add_argument("--final", default=None, help="rank 0 writes the final state here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    run = sweeprun_hf.init(params=vars(args), local_dir=args.out, every_s=args.every_s)
    rank = int(os.environ.get("RANK", 0))
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    training_args = TrainingArguments(
        output_dir=run.output_dir, max_steps=args.max_steps, learning_rate=args.lr,
        per_device_train_batch_size=4, save_steps=args.save_steps, logging_steps=1,
        seed=args.seed * 100 + rank, data_seed=args.seed,   # each rank its own noise, one data order
        report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training_args, train_dataset=Sequences(),
                      callbacks=[run, Slow(args.step_sleep_s)])
    run.train(trainer)
    if trainer.is_world_process_zero() and args.final:
        torch.save({"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                    "step": trainer.state.global_step}, args.final)
        print(f"done: step {trainer.state.global_step}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
