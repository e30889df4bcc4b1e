"""A quantized frozen base (quantize = none | nf4 | int8, bitsandbytes) side by side, one run.

For each setting, in a fresh process of its own (so its peak RSS is its own), interleaved
round by round so machine noise hits all three: the base's weight bytes (all, and the linear
layers'), the process's peak RSS, decode tokens/s at batch 1 and 8 (the engine's per-request
decode rate, summed over the batch), LoRA training tokens/s (a job's micro-steps, training
alone) and greedy answers over a fixed prompt set, compared token by token with the
full-precision base's. With a float32 base, a fourth row runs the full-precision base in bf16:
its own agreement with float32 is the scale to read NF4's and int8's against. Prints a table,
saves a plot.

    python benchmarks/quant.py [--model default] [--rounds 2] [--tokens 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, TOPICS, save_bar_plot, table, workload  # noqa: E402

SETTINGS = ("none", "nf4", "int8")
BF16 = "none bf16"  # the full-precision base in bf16: its own agreement with fp32, for scale
DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
AGREEMENT_PROMPTS, AGREEMENT_TOKENS = 8, 32


def run_all(engine, streams) -> None:
    while any(s.final is None for s in streams):
        engine.iterate()


def decode_rate(engine, batch: int, n: int) -> float:
    slo = {"ttft": 600.0, "tpot": 600.0}  # all rows prefilled at once, none deferred
    streams = [
        engine.generate(PROMPT, max_new_tokens=n, ignore_eos=True, slo=slo) for _ in range(batch)
    ]
    run_all(engine, streams)
    return sum(s.final["stats"]["tokens_per_s"] for s in streams)


def prefill_rate(engine, words: int = 400, reverse: bool = False) -> float:
    """Prompt tokens/s of one long prompt (~1.3 tokens a word), its first token included;
    `reverse`: its words in reverse order (another prompt of about the same length, which the
    prefix cache does not match)."""
    text = [TOPICS[i % len(TOPICS)] for i in range(words // 2)]
    text = " ".join(reversed(text) if reverse else text)
    text = text[: engine.core.loaded.max_context // 2]  # a byte-level test model: fewer words
    stream = engine.generate(text, max_new_tokens=1, slo={"ttft": 600.0, "tpot": 600.0})
    start = time.perf_counter()
    run_all(engine, [stream])
    return stream.final["usage"]["prompt_tokens"] / (time.perf_counter() - start)


def child(
    quantize: str,
    model: str,
    dtype: str,
    tokens: int,
    steps: int,
    agreement: bool,
    decode_weights: str = "auto",
) -> dict:
    from fineinfer_jupyter.engine import Engine, EngineConfig
    from fineinfer_jupyter.engine.quant import weight_bytes

    config = EngineConfig(
        model=model,
        data_dir=tempfile.mkdtemp(),
        policy="immediate",
        quantize=quantize,
        dtype=dtype,
        decode_weights=decode_weights,
    )
    out: dict = {"quantize": quantize}
    with Engine(config, thread=False) as engine:
        out["load_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the load's
        out.update(weight_bytes(engine.core.loaded.model))
        out["dtype"] = engine.status()["model"]["dtype"]
        out["decode_weights"] = engine.status()["model"]["decode_weights"]
        decode_rate(engine, 2, 4)  # warm-up
        # warm-up: a prompt of ~the same length (oneDNN builds its bf16 kernels for each new
        # count of rows, in buckets of precision.ROW_BUCKET: a first prompt of a size pays it)
        out["prefill_first"] = prefill_rate(engine, reverse=True)
        out["prefill"] = prefill_rate(engine)
        out["decode_b1"] = decode_rate(engine, 1, tokens)
        out["decode_b8"] = decode_rate(engine, 8, tokens)
        if agreement:
            streams = [
                engine.generate(m, max_new_tokens=AGREEMENT_TOKENS)
                for m, _ in workload(AGREEMENT_PROMPTS, seed=1)
            ]
            run_all(engine, streams)
            out["answers"] = [s.final["token_ids"] for s in streams]
        engine.tune(
            "bench", str(DATA), max_steps=1000, batch_size=4, micro_batch_size=4, max_length=128
        )
        trainer = engine.core.trainer
        trainer.micro_step()  # warm-up
        start, trained = time.perf_counter(), 0
        for _ in range(steps):
            trained += trainer.micro_step()[1]
        out["train_tokens_per_s"] = trained / (time.perf_counter() - start)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, int]:
    """(share of the reference's answer tokens matched at the same position, answers equal)."""
    same = total = equal = 0
    for a, b in zip(ref, got, strict=True):
        total += len(a)
        same += sum(x == y for x, y in zip(a, b))
        equal += a == b
    return same / max(total, 1), equal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="the base's dtype (and NF4's compute dtype)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode measurement")
    ap.add_argument("--steps", type=int, default=2, help="training micro-steps (4 x 128 tokens)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--agreement", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--decode-weights", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child(
            args.child,
            args.model,
            args.dtype,
            args.tokens,
            args.steps,
            args.agreement,
            args.decode_weights,
        )
        print("RESULT " + json.dumps(result))
        return
    settings = SETTINGS + ((BF16,) if args.dtype == "float32" else ())
    runs: dict[str, list[dict]] = {q: [] for q in settings}
    for r in range(args.rounds):
        for q in settings:
            quantize, dtype = ("none", "bfloat16") if q == BF16 else (q, args.dtype)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                quantize,
                "--model",
                args.model,
                "--dtype",
                dtype,
            ]
            cmd += ["--tokens", str(args.tokens), "--steps", str(args.steps)]
            cmd += ["--agreement"] if r == 0 else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            runs[q].append(json.loads(line.removeprefix("RESULT ")))
            print(f"round {r + 1} {q}: {runs[q][-1]['decode_b1']:.1f} tok/s at batch 1", flush=True)

    def best(q, key):  # the best of the rounds: the least disturbed by the busy machine
        return max(run[key] for run in runs[q])

    ref = runs["none"][0]
    rows = []
    for q in settings:
        first = runs[q][0]
        share, equal = agreement(ref["answers"], first["answers"])
        rows.append(
            [
                q,
                f"{first['total'] / 2**20:.0f}",
                f"{first['linear'] / 2**20:.0f} ({first['linear'] / ref['linear']:.2f}x)",
                f"{max(run['load_rss'] for run in runs[q]) / 2**20:.0f}"
                f" / {max(run['peak_rss'] for run in runs[q]) / 2**20:.0f}",
                best(q, "decode_b1"),
                best(q, "decode_b8"),
                best(q, "train_tokens_per_s"),
                f"{share:.0%} ({equal}/{AGREEMENT_PROMPTS} equal)",
            ]
        )
    headers = [
        "quantize",
        "weights MiB",
        "linear layers MiB",
        "peak RSS MiB (load / run)",
        "decode b1 tok/s",
        "decode b8 tok/s",
        "train tok/s",
        f"greedy agreement ({AGREEMENT_TOKENS} tokens)",
    ]
    print(table(headers, rows))
    print(
        f"(best of {args.rounds} interleaved rounds; {args.model} in {args.dtype}; "
        "a shared, busy machine)"
    )
    save_bar_plot(
        OUT / "quant.png",
        [f"{q} b1" for q in settings] + [f"{q} train" for q in settings],
        [best(q, "decode_b1") for q in settings]
        + [best(q, "train_tokens_per_s") / 10 for q in settings],
        title="decode tokens/s at batch 1, training tokens/s / 10",
        ylabel="tokens/s",
    )


if __name__ == "__main__":
    main()
