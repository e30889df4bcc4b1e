"""Training throughput: the engine's LoRA jobs versus a plain PEFT training loop.

Same model, data, LoRA and optimizer settings, same micro-batches and gradient accumulation;
rounds of engine and plain-loop steps alternate in one run so machine noise hits both.

    python benchmarks/train.py [--model default] [--steps 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig, TrainParams  # noqa: E402
from fineinfer_jupyter.engine.data import build_dataset, collate  # noqa: E402
from fineinfer_jupyter.engine.models import load_model  # noqa: E402

DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"


class PlainLoop:
    """The textbook PEFT loop: forward, backward, accumulate, clip, step. It trains on the
    engine job's examples in the job's order, so both pay for the same padding."""

    def __init__(self, model_name: str, p: TrainParams, order):
        loaded = load_model(model_name)
        self.data = build_dataset(
            str(DATA), loaded.tokenizer, max_length=p.max_length, seed=p.seed
        ).train
        self.order, self.step_no = order, 0  # order(step) -> example indices of that step
        self.pad = loaded.tokenizer.pad_token_id
        config = LoraConfig(
            r=p.r,
            lora_alpha=p.lora_alpha,
            target_modules=p.target_modules,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(loaded.model, config).eval()
        params = [q for q in self.model.parameters() if q.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=p.learning_rate)
        self.params, self.p = params, p

    def step(self) -> int:
        tokens, micro = 0, self.p.micro_batch_size
        indices = self.order(self.step_no)
        for i in range(0, len(indices), micro):
            examples = [self.data[j] for j in indices[i : i + micro]]
            batch = collate(examples, self.pad)
            (self.model(**batch).loss / (len(indices) // micro)).backward()
            tokens += sum(e.num_tokens for e in examples)
        torch.nn.utils.clip_grad_norm_(self.params, self.p.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return tokens


def engine_steps(engine: Engine, steps: int) -> int:
    job = engine.core.trainer.current or engine.core.trainer.queue[0]
    target, tokens = job.step + steps, 0
    while job.step < target:
        tokens += engine.core.trainer.micro_step()[1]
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    args = ap.parse_args()
    p = TrainParams(
        r=16,
        lora_alpha=32,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        max_length=256,
        max_steps=10_000,
    )
    engine = Engine(EngineConfig(model=args.model, data_dir=tempfile.mkdtemp()), thread=False)
    job = engine.tune("bench", str(DATA), p)
    plain = PlainLoop(args.model, p, engine.core.trainer.get(job["id"]).batch_indices)
    engine_steps(engine, 1)  # warm-up both
    plain.step()
    totals = {"engine": [0, 0.0], "plain PEFT loop": [0, 0.0]}
    for r in range(args.rounds):
        for name, run in (
            ("engine", lambda: engine_steps(engine, args.steps)),
            ("plain PEFT loop", lambda: sum(plain.step() for _ in range(args.steps))),
        ):
            start = time.perf_counter()
            tokens = run()
            totals[name][0] += tokens
            totals[name][1] += time.perf_counter() - start
        print(
            f"  round {r + 1}: "
            + ", ".join(f"{k} {v[0] / v[1]:.0f} tok/s" for k, v in totals.items()),
            flush=True,
        )
    engine.shutdown()
    rates = {k: t / s for k, (t, s) in totals.items()}
    ratio = rates["engine"] / rates["plain PEFT loop"]
    print(
        f"\nmodel {args.model}, LoRA r={p.r} all-linear, batch {p.batch_size} (micro {p.micro_batch_size}), herbology.jsonl\n"
    )
    print(
        table(
            ["trainer", "training tokens/s", "ratio to plain PEFT"],
            [[k, v, v / rates["plain PEFT loop"]] for k, v in rates.items()],
        )
    )
    print(f"\nengine / plain PEFT = {ratio:.3f} (goal: within 5%)")
    path = OUT / "train.png"
    save_bar_plot(
        path,
        list(rates),
        list(rates.values()),
        title=f"LoRA training throughput ({args.model})",
        ylabel="tokens/s",
    )
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
