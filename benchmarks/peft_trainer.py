"""A plain PEFT LoRA training loop, as a user would run it beside an inference server: the
second process of the two-process baseline (benchmarks/twoproc.py).

transformers + peft + torch.optim.AdamW, nothing of the engine's scheduling: forward,
backward, accumulate, clip, step, forever (epoch after epoch) until it is killed. It trains on
the same examples as the engine's jobs (the engine's data module tokenizes herbology.jsonl with
the model's chat template), so tokens/s compare. After every micro-batch it prints one JSON
line: {"t": time.time(), "tokens": ..., "samples": ..., "steps": ...} (running totals).

    python benchmarks/peft_trainer.py [--model default] [--dtype auto] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="a Hugging Face folder or 'default'")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16, or auto: what the engine picks on this CPU (bf16 matrix units)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fineinfer_jupyter.engine.data import build_dataset, collate
    from fineinfer_jupyter.engine.models import prepare
    from fineinfer_jupyter.engine.precision import auto_cpu_dtype

    _, folder = prepare(args.model)  # the default model's converted folder (no download)
    if args.dtype == "auto":
        dtype, why = auto_cpu_dtype(AutoConfig.from_pretrained(folder, local_files_only=True))
    else:
        dtype, why = getattr(torch, args.dtype), args.dtype
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.lora_alpha,
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    data = build_dataset(args.data, tokenizer, max_length=args.max_length).train
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    print(
        json.dumps({"dtype": str(dtype), "why": why, "threads": torch.get_num_threads()}),
        flush=True,
    )
    rng, order = random.Random(0), []
    tokens = samples = steps = 0
    accum = args.batch_size // args.micro_batch_size
    while True:
        for _ in range(accum):
            if len(order) < args.micro_batch_size:
                order = list(range(len(data)))
                rng.shuffle(order)
            examples = [data[i] for i in order[: args.micro_batch_size]]
            order = order[args.micro_batch_size :]
            (model(**collate(examples, pad)).loss / accum).backward()
            tokens += sum(e.num_tokens for e in examples)
            samples += len(examples)
            print(
                json.dumps(
                    {"t": time.time(), "tokens": tokens, "samples": samples, "steps": steps}
                ),
                flush=True,
            )
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        print(
            json.dumps({"t": time.time(), "tokens": tokens, "samples": samples, "steps": steps}),
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
