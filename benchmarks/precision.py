"""fp32 against dtype "auto" (bf16 on a CPU with bf16 matrix units), side by side in one run.

Each setting in a fresh process of its own, interleaved round by round (benchmarks/quant.py's
measurements): prefill tokens/s of a ~500-token prompt (after another of its size: oneDNN
builds bf16 kernels for each new size, and the first one's tokens/s has a column of its own),
decode tokens/s at batch 1 and 8, and greedy agreement with fp32 over a fixed prompt set (best
of --rounds), for float32, "auto" and "auto" with decode_weights="base" (its one-row decodes
without int8 copies: int8rows.py), so the int8 copies' gain and their agreement with bf16's own
decodes show beside it. Training has rounds of its own (--train-rounds, fresh processes,
float32 then auto in each round): a job of batch 8 in micro-batches of 4, max_length 128,
training alone through the engine's own loop (its thread, the deferred policy), one effective
batch of warm-up then --train-steps timed micro-steps (optimizer steps included); each round's
auto / float32 ratio is printed and the table gives the median ratio, so the spread shows
(--train-rounds 0: prefill and decode only, about 3 minutes). The table names the CPU's bf16
and int8 flags and what "auto" chose.

    python benchmarks/precision.py [--model default] [--rounds 2] [--tokens 32]
                                   [--train-rounds 5] [--train-steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table  # noqa: E402
from quant import AGREEMENT_PROMPTS, AGREEMENT_TOKENS, agreement  # noqa: E402

from fineinfer_jupyter.engine.precision import cpu_bf16_units  # noqa: E402


def int8_units() -> list[str]:
    """The CPU's int8 matrix/dot-product flags (the int8 weight-only kernel's decode rows)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return [f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in flags]


SETTINGS = ("float32", "auto")  # training's
BASE = "auto, decode_weights=base"  # auto without one-row decodes' int8 copies (int8rows.py)
INFERENCE = ("float32", "auto", BASE)  # prefill, decode and agreement's
KEYS = ("prefill", "prefill_first", "decode_b1", "decode_b8")
DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"


def train_child(model: str, dtype: str, steps: int) -> dict:
    """Training tokens/s of a job (batch 8, micro-batches of 4, max_length 128) alone, through
    the engine's own loop (its thread, the deferred policy: how a user's job runs, with what
    the engine does for training on its own, such as a training thread), after one effective
    batch of warm-up: the tokens of the next `steps` micro-steps over their wall time."""
    from fineinfer_jupyter.engine import Engine, EngineConfig

    config = EngineConfig(model=model, data_dir=tempfile.mkdtemp(), policy="deferred", dtype=dtype)
    with Engine(config) as engine:
        engine.wait_ready()
        job_id = engine.tune(
            "bench", str(DATA), max_steps=1000, batch_size=8, micro_batch_size=4, max_length=128
        )["id"]
        job = engine.core.trainer.jobs[job_id]  # (read only: its counters)

        def after(step: int) -> tuple[float, int]:
            while job.step < step:
                time.sleep(0.01)
            return time.perf_counter(), job.tokens_done

        start, before = after(1)  # warm-up: one whole effective batch (2 micro-steps)
        end, done = after(1 + steps // 2)
        return {
            "dtype": engine.status()["model"]["dtype"],
            "tokens_per_s": (done - before) / (end - start),
        }


def child_result(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=2, help="of prefill, decode and agreement")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--train-rounds", type=int, default=5, help="0: inference only")
    ap.add_argument("--train-steps", type=int, default=4, help="timed micro-steps of 4 x 128")
    ap.add_argument("--train-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_child:
        print("RESULT " + json.dumps(train_child(args.model, args.train_child, args.train_steps)))
        return
    train: dict[str, list[float]] = {d: [] for d in SETTINGS}
    ratios = []
    for r in range(args.train_rounds):
        for d in SETTINGS:
            cmd = [sys.executable, __file__, "--train-child", d, "--model", args.model]
            cmd += ["--train-steps", str(args.train_steps)]
            train[d].append(child_result(cmd)["tokens_per_s"])
        ratios.append(train["auto"][-1] / train["float32"][-1])
        print(
            f"training round {r + 1}: float32 {train['float32'][-1]:.1f}, "
            f"auto {train['auto'][-1]:.1f} tok/s, auto / float32 {ratios[-1]:.2f}x",
            flush=True,
        )
    quant = str(Path(__file__).parent / "quant.py")
    runs: dict[str, list[dict]] = {d: [] for d in INFERENCE}
    for r in range(args.rounds):
        for d in INFERENCE:
            dtype, weights = ("auto", "base") if d == BASE else (d, "auto")
            cmd = [
                sys.executable,
                quant,
                "--child",
                "none",
                "--model",
                args.model,
                "--dtype",
                dtype,
            ]
            cmd += ["--decode-weights", weights]
            cmd += ["--tokens", str(args.tokens), "--steps", "1"]  # (its training: not used)
            cmd += ["--agreement"] if r == 0 else []
            runs[d].append(child_result(cmd))
            print(
                f"round {r + 1} {d}: " + ", ".join(f"{k} {runs[d][-1][k]:.1f}" for k in KEYS),
                flush=True,
            )

    def best(d, key):  # the best of the rounds: the least disturbed by the busy machine
        return max(run[key] for run in runs[d])

    ref = runs["float32"][0]["answers"]
    rows = []
    for d in INFERENCE:
        share, equal = agreement(ref, runs[d][0]["answers"])
        rows.append(
            [f"{d} ({runs[d][0]['dtype']}, decode {runs[d][0]['decode_weights']})"]
            + [best(d, k) for k in KEYS]
            + [statistics.median(train[d]) if train.get(d) else "-"]
            + [f"{share:.0%} ({equal}/{AGREEMENT_PROMPTS} equal)"]
        )
    share, equal = agreement(runs[BASE][0]["answers"], runs["auto"][0]["answers"])
    vs_base = f"auto vs {BASE}: {share:.0%} ({equal}/{AGREEMENT_PROMPTS} equal)"
    ratio = {k: best("auto", k) / best("float32", k) for k in KEYS}
    int8_gain = {k: best("auto", k) / best(BASE, k) for k in KEYS}
    if ratios:
        ratio["train"] = statistics.median(ratios)
        spread = f"{ratio['train']:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})"
    rows.append(
        ["auto / float32"] + [f"{ratio[k]:.2f}x" for k in KEYS] + [spread if ratios else "-"] + [""]
    )
    rows.append([f"auto / {BASE}"] + [f"{int8_gain[k]:.2f}x" for k in KEYS] + ["-", vs_base])
    headers = ["dtype", "prefill tok/s", "(first of its size)", "decode b1 tok/s"]
    headers += ["decode b8 tok/s", "train tok/s"]
    print(table(headers + [f"greedy agreement ({AGREEMENT_TOKENS} tokens)"], rows))
    flags = ", ".join(cpu_bf16_units() + int8_units()) or "none"
    print(
        f"(CPU bf16/int8 flags: {flags}; {args.model}; prefill and decode: best of {args.rounds} "
        "interleaved rounds; "
        + (
            f"training: median of {args.train_rounds} rounds' tokens/s and of their auto / "
            "float32 ratios)"
            if ratios
            else "no training rounds)"
        )
    )
    save_bar_plot(
        OUT / "precision.png",
        list(ratio),
        list(ratio.values()),
        title="auto (bf16) / float32, tokens/s",
        ylabel="ratio",
    )


if __name__ == "__main__":
    main()
