"""Inference throughput: the engine's continuous batching versus HF generate's static batches.

(a) a realistic set of requests (varied prompts, varied answer limits, EOS allowed), all queued
    at once: engine (continuous batching) vs HF generate in static batches of 8 and of 32;
(b) equal-length decode at batch 1, 8 and 32: tokens/s of both;
(c) one long answer (2,000 tokens by default): seconds per token over its first and its last
    hundred tokens (the cost per token must stay flat), and what detokenizing costs per token
    when each token decodes a short window (the engine) or the whole answer so far.
Each measurement runs in a fresh process of its own (a system alone, as in practice), all
in one run, one after the other. Prints a table, saves a plot.

    python benchmarks/decode.py [--model default] [--requests 64] [--long 2000] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table, workload  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig  # noqa: E402


def encode(tok, messages):
    return list(
        tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def useful(row: list[int], limit: int, eos: set[int]) -> int:
    """Tokens a request actually wanted: up to its own limit and its first EOS."""
    for i, t in enumerate(row[:limit]):
        if t in eos:
            return i + 1
    return min(len(row), limit)


@torch.no_grad()
def hf_static(model, tok, reqs, batch: int, eos: set[int], pad: int) -> tuple[float, int]:
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(reqs), batch):
        group = reqs[i : i + batch]
        ids = [encode(tok, m) for m, _ in group]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        out = model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=max(n for _, n in group),
            do_sample=False,
            pad_token_id=pad,
        )
        for row, (_, n) in zip(out[:, width:].tolist(), group):
            tokens += useful(row, n, eos)
    return time.perf_counter() - start, tokens


def engine_run(engine, reqs, **kwargs) -> tuple[float, int]:
    start = time.perf_counter()
    streams = [engine.generate(m, max_new_tokens=n, **kwargs) for m, n in reqs]
    tokens = sum(s.result().usage["completion_tokens"] for s in streams)
    return time.perf_counter() - start, tokens


@torch.no_grad()
def hf_equal(model, tok, prompt, batch: int, n: int, pad: int) -> float:
    ids = torch.tensor([encode(tok, prompt)] * batch)
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=pad,
    )
    return time.perf_counter() - start


PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def measure(system: str, model_name: str, task: tuple) -> tuple[float, int]:
    """(seconds, useful tokens) of one measurement, in this (fresh) process after a warm-up.

    task: ("mixed", n_requests, static_batch) or ("equal", batch, new_tokens).
    """
    torch.manual_seed(0)
    kind, a, b = task
    engine = Engine(
        EngineConfig(
            model=model_name, data_dir=tempfile.mkdtemp(), max_batch_size=32, policy="immediate"
        )
    )
    model, tok = engine.core.loaded.model, engine.core.loaded.tokenizer
    eos, pad = engine.core.tokenizer.eos_ids, tok.pad_token_id
    reqs = workload(a, seed=0) if kind == "mixed" else [(PROMPT, b)] * a
    try:
        if system == "engine":
            engine_run(engine, [(m, 8) for m, _ in reqs[:2]])  # warm-up
            extra = {} if kind == "mixed" else {"ignore_eos": True}
            return engine_run(engine, reqs, **extra)
        hf_equal(model, tok, PROMPT, 2, 8, pad)  # warm-up
        if kind == "mixed":
            return hf_static(model, tok, reqs, b, eos, pad)
        return hf_equal(model, tok, PROMPT, a, b, pad), a * b
    finally:
        engine.shutdown()


def measure_long(model_name: str, n: int) -> dict:
    """One request of n new tokens, alone: the seconds of each decode iteration, and the cost
    of detokenizing by window (the engine's) or the whole answer so far, per token."""
    from fineinfer_jupyter.engine.sequence import Detokenizer

    engine = Engine(EngineConfig(model=model_name, data_dir=tempfile.mkdtemp()), thread=False)
    try:
        engine.complete(PROMPT, max_new_tokens=8)  # warm-up
        stream = engine.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
        times = []
        while stream.final is None:
            start = time.perf_counter()
            out = engine.iterate()
            if out.decode:
                times.append(time.perf_counter() - start)
        ids = stream.final["token_ids"]
        tokenizer = engine.core.tokenizer
        detok, window, whole = Detokenizer(tokenizer), [], []
        for i in range(1, len(ids) + 1):
            start = time.perf_counter()
            detok(ids[:i])
            window.append(time.perf_counter() - start)
            start = time.perf_counter()
            tokenizer.decode(ids[:i])
            whole.append(time.perf_counter() - start)
        return {"iterations": times, "window": window, "whole": whole}
    finally:
        engine.shutdown()


def isolated_long(model_name: str, n: int) -> dict:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(measure_long, model_name, n).result()


def isolated(system: str, model_name: str, task: tuple) -> tuple[float, int]:
    """measure() in a fresh process: each system runs alone, as it would in practice, and
    nothing one leaves behind (allocator state, thread pools) slows the other."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(measure, system, model_name, task).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--equal-tokens", type=int, default=48)
    ap.add_argument("--long", type=int, default=2000, help="tokens of the long answer in (c)")
    ap.add_argument("--quick", action="store_true", help="a small run to check the script")
    args = ap.parse_args()
    n_req = 8 if args.quick else args.requests
    reqs = workload(n_req, seed=0)
    print(
        f"model {args.model}, {n_req} requests, answer limits "
        f"{min(n for _, n in reqs)}-{max(n for _, n in reqs)} tokens; each measurement in a "
        "fresh process",
        flush=True,
    )
    results = {}
    for label, system, static in [
        ("engine, continuous batching", "engine", 0),
        ("HF generate, static batches of 8", "hf", 8),
        ("HF generate, static batches of 32", "hf", 32),
    ]:
        seconds, tokens = isolated(system, args.model, ("mixed", n_req, static))
        results[label] = (seconds, tokens)
        print(f"  {label}: {seconds:.1f} s, {tokens} tokens", flush=True)
    base = results["engine, continuous batching"]
    rows = [
        [label, n_req / seconds, tokens / seconds, (base[1] / base[0]) / (tokens / seconds)]
        for label, (seconds, tokens) in results.items()
    ]
    print("\n(a) realistic requests, all queued at once\n")
    print(table(["system", "requests/s", "tokens/s", "engine speed-up (tokens/s)"], rows))

    n = 8 if args.quick else args.equal_tokens
    eq_rows = []
    for batch in (1, 8, 32):
        t_hf, _ = isolated("hf", args.model, ("equal", batch, n))
        t_engine, tokens = isolated("engine", args.model, ("equal", batch, n))
        assert tokens == batch * n, f"the engine made {tokens} tokens, not {batch} x {n}"
        eq_rows.append([batch, batch * n / t_engine, batch * n / t_hf, t_hf / t_engine])
        print(f"  equal-length batch {batch}: engine {t_engine:.1f} s, HF {t_hf:.1f} s", flush=True)
    print(f"\n(b) equal-length decode, {n} new tokens per row\n")
    print(table(["batch", "engine tokens/s", "HF tokens/s", "engine / HF"], eq_rows))

    n_long = 300 if args.quick else args.long
    long = isolated_long(args.model, n_long)
    first, last = slice(0, 100), slice(-100, None)

    def ms(values):
        return 1000 * sum(values) / len(values)

    long_rows = [
        [
            part,
            ms(long[key][first]),
            ms(long[key][last]),
            ms(long[key][last]) / ms(long[key][first]),
        ]
        for part, key in [
            ("decode iteration (engine)", "iterations"),
            ("detokenize a window (engine)", "window"),
            ("detokenize the whole answer (before)", "whole"),
        ]
    ]
    print(f"\n(c) one answer of {n_long} tokens: ms per token, first vs last 100 tokens\n")
    print(table(["part", "first 100", "last 100", "last / first"], long_rows))

    labels = (
        ["engine", "HF x8", "HF x32"]
        + [f"eq{b} engine" for b in (1, 8, 32)]
        + [f"eq{b} HF" for b in (1, 8, 32)]
    )
    values = [r[2] for r in rows] + [r[1] for r in eq_rows] + [r[2] for r in eq_rows]
    path = OUT / "decode.png"
    save_bar_plot(
        path, labels, values, title=f"decode throughput ({args.model})", ylabel="tokens/s"
    )
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
