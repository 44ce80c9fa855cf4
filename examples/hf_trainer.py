"""A Hugging Face Trainer script made a resumable sweeprun run with four added lines.

A tiny GPT-2 built from a config (no download) learns synthetic token sequences,
with dropout on, shuffled data and an augmentation that draws from Python's and
NumPy's global RNGs, the cases where a resumed Trainer run drifts on its own. Under
``sweeprun launch`` (sweeps/hf_trainer.yaml) the run directory comes from the
environment; standalone, pass ``--out DIR`` (a folder, or a bucket such as
``s3://bucket/hf``: the Trainer then writes into a local staging folder and sweeprun
uploads each sealed checkpoint). Run the same command again after any interruption and
it continues exactly where the last sealed checkpoint left it.

    python examples/hf_trainer.py --lr 3e-3 --seed 0 --max-steps 40 --out /tmp/hf
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from sweeprun.integrations import transformers as sweeprun_hf

VOCAB, LENGTH = 48, 16


class Sequences(Dataset):
    """Arithmetic token sequences; each fetch shifts and masks them using the global RNGs."""

    def __init__(self, n: int = 256, torch_augment: bool = False) -> None:
        self.torch_augment = torch_augment
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
        if self.torch_augment and torch.rand(()) < 0.3:          # torch's global RNG: see --torch-augment
            row = row.flip(0)
        return {"input_ids": row, "labels": row.clone()}


class Slow(TrainerCallback):
    """Tests: slow each step so a kill from outside lands mid-run."""

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        time.sleep(self.sleep_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--save-total-limit", type=int, help="keep this many checkpoint folders")
    parser.add_argument("--every-s", type=lambda v: v if v == "auto" else float(v), default=300.0,
                        help="sweeprun's time cadence in seconds, or auto (Young/Daly)")
    parser.add_argument("--out", help="run directory when not under sweeprun launch")
    parser.add_argument("--step-sleep-s", type=float, default=0.0)
    parser.add_argument("--torch-augment", action="store_true",
                        help="also augment from torch's global RNG, which a resume cannot replay "
                             "exactly (it interleaves with dropout while the loader fetches ahead)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same kernels whatever machine resumes the run

    run = sweeprun_hf.init(params=vars(args), local_dir=args.out, every_s=args.every_s)  # + line 1
    params = vars(args)  # the flags: the launcher renders the run's parameters into them
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    torch.manual_seed(int(params["seed"]))
    model = GPT2LMHeadModel(config)
    training_args = TrainingArguments(
        output_dir=run.output_dir,                                              # + line 2
        max_steps=int(params["max_steps"]), learning_rate=float(params["lr"]),
        per_device_train_batch_size=int(params["batch_size"]),
        gradient_accumulation_steps=int(params["grad_accum"]),
        save_steps=int(params["save_steps"]), save_total_limit=params["save_total_limit"],
        logging_steps=1, seed=int(params["seed"]),
        warmup_steps=5, weight_decay=0.01, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training_args, train_dataset=Sequences(torch_augment=args.torch_augment),
                      callbacks=[run, Slow(args.step_sleep_s)])                # + line 3
    run.train(trainer)                                                      # + line 4 (was trainer.train())
    final = {name: value.tolist() for name, value in list(model.state_dict().items())[:1]}
    print(f"done: step {trainer.state.global_step}, "
          f"first weights {json.dumps(final)[:60]}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
