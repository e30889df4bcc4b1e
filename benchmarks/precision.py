"""fp32 against dtype "auto" (bf16 on a CPU with bf16 matrix units), side by side in one run.

Each setting in a fresh process of its own, interleaved round by round (benchmarks/quant.py's
measurements): prefill tokens/s of a ~500-token prompt, decode tokens/s at batch 1 and 8, LoRA
training tokens/s (micro-steps of 4 x 128 tokens, training alone), and greedy agreement with
fp32 over a fixed prompt set. The table names the CPU's bf16 flags and what "auto" chose.

    python benchmarks/precision.py [--model default] [--rounds 2] [--tokens 32] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table  # noqa: E402
from quant import AGREEMENT_PROMPTS, AGREEMENT_TOKENS, agreement  # noqa: E402

from fineinfer_jupyter.engine.precision import cpu_bf16_units  # noqa: E402

SETTINGS = ("float32", "auto")
KEYS = ("prefill", "decode_b1", "decode_b8", "train_tokens_per_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    quant = str(Path(__file__).parent / "quant.py")
    runs: dict[str, list[dict]] = {d: [] for d in SETTINGS}
    for r in range(args.rounds):
        for d in SETTINGS:
            cmd = [sys.executable, quant, "--child", "none", "--model", args.model, "--dtype", d]
            cmd += ["--tokens", str(args.tokens), "--steps", str(args.steps)]
            cmd += ["--agreement"] if r == 0 else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            runs[d].append(json.loads(line.removeprefix("RESULT ")))
            print(
                f"round {r + 1} {d}: " + ", ".join(f"{k} {runs[d][-1][k]:.1f}" for k in KEYS),
                flush=True,
            )

    def best(d, key):  # the best of the rounds: the least disturbed by the busy machine
        return max(run[key] for run in runs[d])

    ref = runs["float32"][0]["answers"]
    rows = []
    for d in SETTINGS:
        share, equal = agreement(ref, runs[d][0]["answers"])
        rows.append(
            [f"{d} ({runs[d][0]['dtype']})"]
            + [best(d, k) for k in KEYS]
            + [f"{share:.0%} ({equal}/{AGREEMENT_PROMPTS} equal)"]
        )
    rows.append(
        ["auto / float32"] + [f"{best('auto', k) / best('float32', k):.2f}x" for k in KEYS] + [""]
    )
    headers = ["dtype", "prefill tok/s", "decode b1 tok/s", "decode b8 tok/s", "train tok/s"]
    print(table(headers + [f"greedy agreement ({AGREEMENT_TOKENS} tokens)"], rows))
    flags = ", ".join(cpu_bf16_units()) or "none"
    print(
        f"(CPU bf16 flags: {flags}; best of {args.rounds} interleaved rounds; {args.model}; a shared, busy machine)"
    )
    save_bar_plot(
        OUT / "precision.png",
        [f"{k}" for k in KEYS],
        [best("auto", k) / best("float32", k) for k in KEYS],
        title="auto (bf16) / float32, tokens/s",
        ylabel="ratio",
    )


if __name__ == "__main__":
    main()
