"""Does a second core pay more as a second training stream than as a second thread of one?
Plain PEFT LoRA micro-steps (r 16, every linear layer, bf16 autocast) of the bf16 base, in one
process, side by side:

- one stream on one thread (the training worker beside inference),
- one stream on two threads (the worker while nothing is served),
- two streams on one thread each, in two Python threads, each on its own LoRA copy of the model
  (what a second training stream in the engine thread's idle time would do).

Micro-steps of 4 rows of --tokens random tokens each (the engine's herbology micro-steps are
~4 x 68), --steps per stream and round, --rounds interleaved rounds. The table gives tokens/s
and the ratio to one stream on one thread. The rationale is in docs/benchmarks.md, "Ninth
run" and "Two training streams".

    python benchmarks/two_streams.py [--model default] [--tokens 68,128] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table  # noqa: E402

from fineinfer_jupyter.engine.models import load_model  # noqa: E402


def lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=16, target_modules="all-linear")
    return get_peft_model(copy.deepcopy(model), config).train()


def micro_step(model: torch.nn.Module, ids: torch.Tensor, threads: int) -> None:
    torch.set_num_threads(threads)  # (this OS thread's count)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def one_stream(model, ids, threads: int, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        micro_step(model, ids, threads)
    return steps * ids.numel() / (time.perf_counter() - start)


def two_streams(models, ids, steps: int) -> float:
    def work(model):
        for _ in range(steps):
            micro_step(model, ids, 1)

    workers = [threading.Thread(target=work, args=(m,)) for m in models]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(models) * steps * ids.numel() / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", default="68,128")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    base = load_model(args.model, dtype="bfloat16", decode_weights="base").model
    models = [lora(base), lora(base)]
    rows, labels, values = [], [], []
    for tokens in (int(t) for t in args.tokens.split(",")):
        ids = torch.randint(100, 40000, (4, tokens), generator=torch.Generator().manual_seed(0))
        micro_step(models[0], ids, threads)  # warm-up, both ways
        micro_step(models[1], ids, 1)
        got: dict[str, list[float]] = {"1 stream, 1 thread": [], "1 stream, 2 threads": []}
        got["2 streams, 1 thread each"] = []
        for _ in range(args.rounds):
            got["1 stream, 1 thread"].append(one_stream(models[0], ids, 1, args.steps))
            got["1 stream, 2 threads"].append(one_stream(models[0], ids, threads, args.steps))
            got["2 streams, 1 thread each"].append(two_streams(models, ids, args.steps))
        base_rate = max(got["1 stream, 1 thread"])
        for name, rates in got.items():
            best = max(rates)
            rows.append([f"4 x {tokens}", name, f"{best:.0f}", f"{best / base_rate:.2f}x"])
            labels.append(f"{tokens}: {name}")
            values.append(best)
    print(f"{args.model}, bf16 autocast, LoRA r 16 on every linear layer, {threads} threads")
    print(table(["micro-step", "how", "tokens/s (best round)", "/ 1 stream, 1 thread"], rows))
    save_bar_plot(
        OUT / "two_streams.png",
        labels,
        values,
        title="LoRA training: a second core as a thread or as a stream",
        ylabel="tokens/s",
    )
    print(f"plot: {OUT / 'two_streams.png'}")


if __name__ == "__main__":
    main()
