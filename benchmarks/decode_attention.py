"""A decode pass's attention in bf16 against float32 (precision._sdpa_upcast): whole decode
steps of a bf16 model on a CPU, side by side in one process.

torch's CPU flash-attention kernel is fast in float32 for one query position and slow in
bf16; the engine casts a decode's queries, keys and values to float32 for it (and the output
back). Here, for each batch size and context length, the same model decodes --steps tokens
after a prompt of that many random tokens, with transformers' own sdpa (bf16) and with the
engine's (float32), interleaved, the best of --rounds, on one thread (as beside the training
worker), the copies the load chose (--decode-weights) multiplying the rows. The table gives
the milliseconds per step and their ratio; the plot the ratios.

    python benchmarks/decode_attention.py [--model default] [--rounds 3] [--steps 8]
                                          [--batches 1,4] [--contexts 64,256,1024]
                                          [--decode-weights auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table  # noqa: E402

from fineinfer_jupyter.engine import precision  # noqa: E402
from fineinfer_jupyter.engine.models import load_model  # noqa: E402


@torch.no_grad()
def step_seconds(model, attention, batch: int, context: int, steps: int) -> float:
    """Seconds a decode step of `batch` rows after `context` prompt tokens takes, with
    `attention` as transformers' "sdpa" function."""
    from transformers import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(100, model.config.vocab_size - 100, (batch, context), generator=gen)
    cache = DynamicCache(config=model.config)
    nxt = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    own, fns["sdpa"] = fns["sdpa"], attention
    try:
        with precision.decoding():
            start = time.perf_counter()
            for _ in range(steps):
                logits = model(input_ids=nxt, cache=cache, use_cache=True).logits
                nxt = logits[:, -1:].argmax(-1)
            return (time.perf_counter() - start) / steps
    finally:
        fns["sdpa"] = own


def main() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--contexts", default="64,256,1024")
    ap.add_argument("--decode-weights", default="auto")
    args = ap.parse_args()
    loaded = load_model(args.model, dtype="bfloat16", decode_weights=args.decode_weights)
    model = loaded.model
    print(f"{args.model}: {loaded.decode_reason}")
    ways = {"bf16 (transformers' sdpa)": sdpa_attention_forward}
    ways["float32 (the engine's)"] = precision._sdpa_upcast(sdpa_attention_forward)
    torch.set_num_threads(1)
    rows, labels, ratios = [], [], []
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            best = dict.fromkeys(ways, float("inf"))
            for _ in range(args.rounds):
                for name, fn in ways.items():
                    seconds = step_seconds(model, fn, batch, context, args.steps)
                    best[name] = min(best[name], seconds)
            bf16, fp32 = best.values()
            rows.append([batch, context, f"{bf16 * 1e3:.1f}", f"{fp32 * 1e3:.1f}", f"{bf16 / fp32:.2f}x"])  # fmt: skip
            labels.append(f"b{batch} c{context}")
            ratios.append(bf16 / fp32)
    print(table(["batch", "context", "ms / step, bf16 attention", "float32", "speed-up"], rows))
    save_bar_plot(
        OUT / "decode_attention.png",
        labels,
        ratios,
        title="decode step: float32 attention's speed-up over bf16's (one thread)",
        ylabel="x",
    )
    print(f"plot: {OUT / 'decode_attention.png'}")


if __name__ == "__main__":
    main()
