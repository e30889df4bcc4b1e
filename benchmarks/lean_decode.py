"""The lean decode step (lean.py) against the decoder layers' module calls, side by side in one
process: answers on the base and on an adapter, and decode steps of several rows.

A job's adapter is loaded (one micro-step, then the job stops: PEFT wraps every linear layer,
as while a job trains), so the module calls include PEFT's LoRA layers. For each base weight
format (--decode-weights), interleaved rounds of: a --tokens-token greedy answer on the base and
on the adapter (the same text both ways, checked), and --steps decode steps of each of
--batches rows after a 40-token prompt, on one thread (as beside the training worker). The
table gives medians and the speed-ups; the plot the speed-ups.

    python benchmarks/lean_decode.py [--model default] [--decode-weights int4,auto]
                                     [--rounds 5] [--tokens 64] [--steps 32] [--batches 1,4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table  # noqa: E402
from precision import DATA  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig  # noqa: E402
from fineinfer_jupyter.engine.precision import decoding, fewer_threads  # noqa: E402

PROMPT = "Tell me about moonveil and where it grows."


def answer(engine: Engine, lean: bool, tokens: int, adapter: str | None):
    engine.core.runner.walk.lean = lean
    start = time.perf_counter()
    done = engine.complete(
        PROMPT, max_new_tokens=tokens, **({"adapter": adapter} if adapter else {})
    )
    return time.perf_counter() - start, done.text


@torch.no_grad()
def steps(engine: Engine, lean: bool, rows: int, n: int) -> float:
    """Seconds a decode step of `rows` rows on the base takes (after a 40-token prompt)."""
    from transformers import DynamicCache

    runner = engine.core.runner
    ids = torch.randint(100, 1000, (rows, 40), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones(rows, 40, dtype=torch.long)
    cache = DynamicCache(config=runner.config)
    positions = torch.arange(40).expand(rows, -1)
    base = [None] * rows
    runner.walk.lean = lean
    logits = runner.forward(ids, mask=mask, position_ids=positions, cache=cache, adapters=base, keep=1)  # fmt: skip
    with fewer_threads(1), decoding():
        start = time.perf_counter()
        for _ in range(n):
            mask = torch.nn.functional.pad(mask, (0, 1), value=1)
            positions = torch.full((rows, 1), mask.shape[1] - 1)
            nxt = logits[:, -1:].argmax(-1)
            logits = runner.forward(nxt, mask=mask, position_ids=positions, cache=cache, adapters=base, keep=1)  # fmt: skip
        return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--decode-weights", default="int4,auto")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    rows, labels, ratios = [], [], []
    for weights in args.decode_weights.split(","):
        config = EngineConfig(
            model=args.model,
            data_dir=tempfile.mkdtemp(),
            decode_weights=weights,
            train_thread="off",
            threads=1,
            prefix_cache_bytes=0,
        )
        with Engine(config, thread=False) as engine:
            job = engine.tune("bench", str(DATA), max_steps=1000, batch_size=8, micro_batch_size=4)
            engine.core.trainer.micro_step(4)  # (the adapter's LoRA layers exist)
            engine.stop_job(job["id"])
            print(f"{weights}: {engine.status()['model']['decode_weights_reason']}")
            cases = {f"answer, base, {args.tokens} tokens": ("answer", None)}
            cases[f"answer, adapter, {args.tokens} tokens"] = ("answer", "bench")
            cases.update({f"decode step, {b} rows": ("step", int(b)) for b in args.batches.split(",")})  # fmt: skip
            for name, (kind, what) in cases.items():
                seconds: dict[bool, list[float]] = {True: [], False: []}
                texts: dict[bool, str] = {}
                for _ in range(args.rounds + 1):  # (the first: warm-up, dropped)
                    for lean in (True, False):
                        if kind == "answer":
                            s, texts[lean] = answer(engine, lean, args.tokens, what)
                        else:
                            s = steps(engine, lean, what, args.steps)
                        seconds[lean].append(s)
                lean, calls = (statistics.median(seconds[w][1:]) for w in (True, False))
                same = "" if kind != "answer" else ("yes" if texts[True] == texts[False] else "NO")
                unit, scale = ("s", 1) if kind == "answer" else ("ms", 1e3)
                rows.append([weights, name, f"{calls * scale:.3f} {unit}", f"{lean * scale:.3f} {unit}", f"{calls / lean:.2f}x", same])  # fmt: skip
                labels.append(f"{weights}: {name}")
                ratios.append(calls / lean)
            engine.core.runner.walk.lean = True
    headers = ["decode weights", "case", "module calls", "lean", "speed-up", "same text"]
    print(table(headers, rows))
    save_bar_plot(
        OUT / "lean_decode.png",
        labels,
        ratios,
        title="the lean decode step's speed-up over the module calls (one thread)",
        ylabel="x",
    )
    print(f"plot: {OUT / 'lean_decode.png'}")


if __name__ == "__main__":
    main()
