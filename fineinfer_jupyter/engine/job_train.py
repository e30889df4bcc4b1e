"""Train a fineinfer job's LoRA adapter on one or many GPUs, on one or many nodes.

Written by `%fineinfer export-job` (fineinfer_jupyter/engine/job_export.py copies this file as
train.py beside job.json and data/). It needs torch, transformers, peft and accelerate, not
fineinfer. README.md beside it has the launch commands; on one machine:

    accelerate launch --config_file accelerate_config.yaml train.py
    torchrun --nproc-per-node 4 train.py

It trains what the engine trained: the tokenized examples of data/train.jsonl (the engine's
chat template, masked prompts and max_length already applied), in the engine's order (seeded
per-epoch shuffles; one optimizer step takes the next `batch_size` of them, split across the
processes and their micro-batches), the loss as the mean over the label tokens of the whole
effective batch (transformers' `num_items_in_batch`, counted across the processes), the same
LoRA r / alpha / target modules / dropout and its seeded initialisation, AdamW with the same
learning rate and weight decay, the cosine schedule with the same warm-up, gradient clipping,
and the same number of optimizer steps. The adapter goes to <output>/adapter: a PEFT folder
that `%fineinfer load NAME PATH` takes back into the engine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset, SequentialSampler
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

HERE = Path(__file__).resolve().parent
IGNORE = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shape_hash(model: torch.nn.Module) -> str:
    """The base model's parameters' names and shapes, hashed as the engine does
    (fineinfer_jupyter/engine/models.py, shape_hash)."""
    shapes = sorted((n, tuple(p.shape)) for n, p in model.named_parameters())
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:8]


def check_base(model: torch.nn.Module, base: dict, folder: str) -> None:
    found = shape_hash(model)
    if found != base["shape_hash"]:
        sys.exit(
            f"train.py: {folder} is not the base model this job trained on: its shape hash is "
            f"{found}, {base['name']}'s is {base['shape_hash']}"
        )


def engine_order(n: int, batch_size: int, steps: int, seed: int) -> list[int]:
    """Example indices in the order the engine trains them (fineinfer's Job.batch_indices):
    position p is example perm(p // n)[p % n], perm(e) a seeded shuffle of epoch e."""
    order, perm = [], []
    for p in range(steps * batch_size):
        epoch, i = divmod(p, n)
        if i == 0:
            perm = list(range(n))
            random.Random(seed * 100_003 + epoch).shuffle(perm)
        order.append(perm[i])
    return order


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Examples(Dataset):
    def __init__(self, examples: list[dict], order: list[int] | None = None):
        self.examples, self.order = examples, order or list(range(len(examples)))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return self.examples[self.order[i]]


class Collate:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding), as the engine's."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        for row, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[row, :k] = torch.tensor(r["input_ids"])
            mask[row, :k] = 1
            labels[row, :k] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class InOrder(Trainer):
    """Batches in the dataset's order. accelerate deals batch k to process k % N, so the
    `batch_size` consecutive examples of one optimizer step are spread over the processes."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class Losses(TrainerCallback):
    """The loss of every optimizer step, as (step, loss): output/loss_history.json."""

    def __init__(self):
        self.history: list[list] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.history.append([state.global_step, logs["loss"]])


def split(batch_size: int, processes: int, micro: int) -> tuple[int, int]:
    """(examples per micro-batch, micro-batches per step) of each process: the effective batch
    is batch_size = micro x accumulation x processes."""
    if batch_size % processes:
        fits = [k for k in range(1, batch_size + 1) if batch_size % k == 0]
        sys.exit(
            f"train.py: the effective batch of {batch_size} examples does not split evenly over "
            f"{processes} processes; run {', '.join(map(str, fits))} processes "
            "(or export the job with another batch_size)"
        )
    share = batch_size // processes
    micro = max(k for k in range(1, min(micro, share) + 1) if share % k == 0)
    return micro, share // micro


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(HERE / "output"), help="checkpoints, logs, adapter")
    parser.add_argument("--base-model", help="the base model's folder (default: job.json's)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: the engine's")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        help="examples per forward on each process (default: "
        "the job's); the effective batch stays the job's",
    )
    parser.add_argument(
        "--resume", action="store_true", help="from the last checkpoint in --output"
    )
    args = parser.parse_args(argv)

    job = json.loads((HERE / "job.json").read_text())
    p, base = job["params"], job["base_model"]
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accumulation = split(
        p["batch_size"], processes, args.micro_batch_size or p["micro_batch_size"]
    )

    folder = args.base_model or str((HERE / base["path"]).resolve())
    dtype = DTYPES[args.dtype or base["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    check_base(model, base, folder)
    config = LoraConfig(
        r=p["r"],
        lora_alpha=p["lora_alpha"],
        target_modules=p["target_modules"],
        lora_dropout=p["lora_dropout"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(p["seed"])  # LoRA A's initialisation, as the engine's
    model = get_peft_model(model, config)

    train = read_jsonl(HERE / job["data"]["train"])
    steps = job["total_steps"]
    dataset = Examples(train, engine_order(len(train), p["batch_size"], steps, p["seed"]))
    val = read_jsonl(HERE / job["data"]["val"]) if job["data"].get("val") else []
    evaluate = bool(val) and p["eval_every"] > 0
    training = TrainingArguments(
        output_dir=args.output,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=p["learning_rate"],
        weight_decay=p["weight_decay"],
        lr_scheduler_type="cosine",
        warmup_steps=p["warmup_steps"],
        max_grad_norm=p["max_grad_norm"],
        optim="adamw_torch",
        average_tokens_across_devices=True,  # the loss: a mean over the effective batch's tokens
        eval_strategy="steps" if evaluate else "no",
        eval_steps=p["eval_every"] if evaluate else None,
        save_strategy="steps",
        save_steps=p["checkpoint_every"],
        save_total_limit=2,
        logging_steps=1,
        seed=p["seed"] % 2**32,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not torch.cuda.is_available(),  # CPU processes talk over gloo
        ddp_find_unused_parameters=False,
    )
    losses = Losses()
    trainer = InOrder(
        model=model,
        args=training,
        train_dataset=dataset,
        eval_dataset=Examples(val) if val else None,
        data_collator=Collate(job["pad_token_id"]),
        callbacks=[losses],
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    eval_loss = trainer.evaluate()["eval_loss"] if val else None
    out = Path(args.output) / "adapter"
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        (Path(args.output) / "loss_history.json").write_text(json.dumps(losses.history))
        meta = {
            "step": trainer.state.global_step,
            "loss": losses.history[-1][1] if losses.history else None,
            "eval_loss": eval_loss,
            "exported_job": job["job"],
            "processes": processes,
            "base_model": {"name": base["name"], "shape_hash": base["shape_hash"]},
        }
        (out / "fineinfer.json").write_text(json.dumps(meta))
        print(f"train.py: adapter {job['adapter']!r} written to {out}", flush=True)


if __name__ == "__main__":
    main()
