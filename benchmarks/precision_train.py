"""One LoRA micro-step, side by side in one process: plain PEFT + transformers against the
engine's micro-step (its TrainingPass, as a job runs it), each in float32 and in bf16 mixed
precision (a bf16 base under autocast, float32 LoRA weights).

The same fixed micro-batch for all four (--rows examples of the job's data, padded as the
engine pads them, or --synthetic rows x --length tokens all labelled), forward and backward
(and, with --optimizer, a clip + AdamW step of the adapter's parameters), interleaved round by
round; the table gives the median of --rounds of wall time and of process CPU time per
micro-step, at each --threads. With --profile SETTING, torch.profiler's top ops by self CPU
time of that setting's micro-step instead.

    python benchmarks/precision_train.py [--model default] [--rounds 5] [--threads 2 1]
                                         [--synthetic] [--profile engine-bf16]
"""

# ruff: noqa: I001  (the engine package first: it sets OpenMP's wait policy before torch starts)
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import table  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig, precision  # noqa: E402
from fineinfer_jupyter.engine.data import build_dataset, collate  # noqa: E402
from fineinfer_jupyter.engine.models import load_model  # noqa: E402

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"
SETTINGS = ("peft-fp32", "peft-bf16", "engine-fp32", "engine-bf16")
# before round 3 (docs/benchmarks.md): the engine's bf16 micro-step with attention in bf16
BEFORE = "engine-bf16-before"


class Plain:
    """transformers + PEFT: model(**batch).loss, backward (bf16: under autocast)."""

    def __init__(self, model: str, dtype: str):
        loaded = load_model(model, dtype=dtype)
        config = LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        torch.manual_seed(0)
        self.model = get_peft_model(loaded.model, config).eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4)
        self.bf16 = loaded.dtype == torch.bfloat16
        self.tokenizer = loaded.tokenizer

    def step(self, batch: dict, optimizer: bool) -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            loss = self.model(**batch).loss
        loss.backward()
        if optimizer:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Engined:
    """The engine's micro-step on its training adapter (Runner.micro_step, all units);
    `before`: as it ran before round 3 (attention computed in bf16)."""

    def __init__(self, model: str, dtype: str, threads: int, before: bool = False):
        self.before = before
        config = EngineConfig(
            model=model, data_dir=tempfile.mkdtemp(), policy="immediate", dtype=dtype,
            threads=threads,
        )  # fmt: skip
        self.engine = Engine(config, thread=False)
        self.engine.tune("bench", str(DATA), max_steps=10**6, batch_size=4, micro_batch_size=4,
                         max_length=128)  # fmt: skip
        self.trainer = self.engine.core.trainer
        self.trainer.micro_step()  # starts the job: adapter, optimizer
        self.job = self.trainer.current

    def step(self, batch: dict, optimizer: bool) -> None:
        run = self.trainer.runner.micro_step(batch, scale=1.0 / 256)
        with _before() if self.before else nullcontext():
            run.run(run.units)
        if optimizer:
            opt = self.job.optimizer
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        self.job.optimizer.zero_grad(set_to_none=True)


class _before:
    """Round 3's changes off, for the block."""

    def __enter__(self):
        self.saved = precision.attention_in_fp32
        precision.attention_in_fp32 = nullcontext

    def __exit__(self, *a):
        precision.attention_in_fp32 = self.saved
        return False


def fixed_batch(tokenizer, rows: int, length: int, synthetic: bool) -> dict:
    if synthetic:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, tokenizer.vocab_size, (rows, length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    data = build_dataset(str(DATA), tokenizer, max_length=length).train
    return collate(data[:rows], tokenizer.pad_token_id)


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--synthetic", action="store_true", help="rows x length random tokens")
    ap.add_argument("--optimizer", action="store_true", help="clip + AdamW step each time")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--profile", help="a setting: its top ops by self CPU time")
    ap.add_argument("--shapes", action="store_true", help="the profile by input shapes")
    args = ap.parse_args()

    threads0 = max(args.threads)
    made = {}
    for s in args.settings:
        kind, dtype = s.split("-")[:2]
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        if kind == "peft":
            made[s] = Plain(args.model, dtype)
        else:
            made[s] = Engined(args.model, dtype, threads0, before=s == BEFORE)
    tok = (
        load_model(args.model).tokenizer if "peft-fp32" not in made else made["peft-fp32"].tokenizer
    )
    batch = fixed_batch(tok, args.rows, args.length, args.synthetic)
    tokens = int(batch["attention_mask"].sum())
    print(f"batch {tuple(batch['input_ids'].shape)}, {tokens} real tokens", flush=True)

    if args.profile:
        torch.set_num_threads(threads0)
        m = made[args.profile]
        for _ in range(2):
            m.step(batch, args.optimizer)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            m.step(batch, args.optimizer)
        averages = prof.key_averages(group_by_input_shape=args.shapes)
        print(averages.table(sort_by="self_cpu_time_total", row_limit=40))
        return

    rows = []
    for n in args.threads:
        torch.set_num_threads(n)
        for m in made.values():
            m.step(batch, args.optimizer)  # warm-up at this thread count
        wall = {s: [] for s in made}
        cpu = {s: [] for s in made}
        for r in range(args.rounds):
            for s, m in made.items():
                w, c = timed(lambda m=m: m.step(batch, args.optimizer))
                wall[s].append(w)
                cpu[s].append(c)
            print(
                f"threads {n} round {r + 1}: "
                + ", ".join(f"{s} {wall[s][-1]:.3f}s/{cpu[s][-1]:.3f}cpu" for s in made),
                flush=True,
            )
        for s in made:
            w, c = statistics.median(wall[s]), statistics.median(cpu[s])
            rows.append([n, s, f"{w:.3f}", f"{c:.3f}", f"{tokens / w:.0f}", f"{tokens / c:.0f}"])
        for kind, a, b in (
            ("peft", "peft-fp32", "peft-bf16"),
            ("engine", "engine-fp32", "engine-bf16"),
            ("engine before", "engine-fp32", BEFORE),
        ):
            if a in made and b in made:
                rw = statistics.median(wall[a]) / statistics.median(wall[b])
                rc = statistics.median(cpu[a]) / statistics.median(cpu[b])
                rows.append([n, f"{kind} bf16 / fp32 speed", "", "", f"{rw:.2f}x", f"{rc:.2f}x"])
    print(table(["threads", "setting", "wall s", "cpu s", "tok/s wall", "tok/cpu-s"], rows))


if __name__ == "__main__":
    main()
