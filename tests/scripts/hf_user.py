"""A Trainer script as a user writes one, made a sweeprun run (tests/test_hf_users.py).

A tiny masked language model learns token sequences: a plain list of examples, a
collator that masks and noises tokens with torch's global RNG (in evaluation too),
gradient accumulation, evaluation and saves on a step cadence, the best model reloaded
at the end and written with ``save_model``, ``save_total_limit`` rotating the folders.
It ends by writing what ``train()`` returned to ``<run dir>/train_output.json``.

    python tests/scripts/hf_user.py --out /tmp/run
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import BertConfig, BertForMaskedLM, Trainer, TrainerCallback, TrainingArguments

from sweeprun.integrations import transformers as sweeprun_hf

VOCAB, LENGTH, MASK = 40, 12, 1


def examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(2, VOCAB, (n, 1), generator=g)
    strides = torch.randint(1, 4, (n, 1), generator=g)
    rows = 2 + (starts + strides * torch.arange(LENGTH)) % (VOCAB - 2)
    return [{"input_ids": row} for row in rows]


#: The broken variant (``--own-generator``): the collator draws from a generator of its own,
#: which no checkpoint holds, so a resumed run masks other tokens than the uninterrupted one.
OWN: torch.Generator | None = None


def mask_and_noise(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Hide 20% of the tokens (the model learns them back) and swap 10% for random ones."""
    ids = torch.stack([f["input_ids"] for f in features])
    labels = ids.clone()
    hidden = torch.rand(ids.shape, generator=OWN) < 0.2
    labels[~hidden] = -100
    noisy = ids.masked_fill(hidden, MASK)
    swap = (torch.rand(ids.shape, generator=OWN) < 0.1) & ~hidden
    noisy = torch.where(swap, torch.randint(2, VOCAB, ids.shape, generator=OWN), noisy)
    return {"input_ids": noisy, "attention_mask": torch.ones_like(ids), "labels": labels}


class Pace(TrainerCallback):
    """Slows each step so that a test can interrupt the run mid-way."""

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(self.sleep_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--examples", type=int, default=96, help="training examples, 8 a batch")
    parser.add_argument("--save-steps", type=int, default=5, help="evaluate and save this often")
    parser.add_argument("--out", help="run directory when not under sweeprun launch")
    parser.add_argument("--step-sleep-s", type=float, default=0.0)
    parser.add_argument("--own-generator", action="store_true", help="the broken variant (OWN)")
    parser.add_argument("--tracker", help="mlflow, wandb or tensorboard: what the Trainer logs goes there too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.own_generator:
        global OWN
        OWN = torch.Generator().manual_seed(args.seed)

    params = {k: v for k, v in vars(args).items() if k not in ("out", "step_sleep_s", "own_generator", "tracker")}
    run = sweeprun_hf.init(params=params, local_dir=args.out, every_s=None, tracker=args.tracker)
    torch.manual_seed(args.seed)
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32,
                                       max_position_embeddings=LENGTH))
    training_args = TrainingArguments(
        output_dir=run.output_dir,
        num_train_epochs=args.epochs, learning_rate=args.lr, seed=args.seed,
        per_device_train_batch_size=8, gradient_accumulation_steps=2,   # 96: 12 batches, 6 steps an epoch
        per_device_eval_batch_size=16,
        eval_strategy="steps", eval_steps=args.save_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        logging_steps=2, warmup_steps=3, weight_decay=0.01,
        report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training_args, data_collator=mask_and_noise,
                      train_dataset=examples(args.examples, 1), eval_dataset=examples(32, 2),
                      callbacks=[run, Pace(args.step_sleep_s)])
    result = run.train(trainer)
    trainer.save_model(os.path.join(run.output_dir, "best-model"))
    summary = {"global_step": result.global_step, "training_loss": result.training_loss,
               "metrics": result.metrics, "best": trainer.state.best_model_checkpoint}
    with open(os.path.join(os.path.dirname(run.output_dir), "train_output.json"), "w") as f:
        json.dump(summary, f)
    print(f"done: step {result.global_step}, train_loss {result.training_loss!r}", flush=True)


if __name__ == "__main__":
    main()
