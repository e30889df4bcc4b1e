"""A long prompt prefilled in one pass vs in chunks, with a chunk's attention through SDPA's
masked kernel (`sdpa`, the old path) vs split in two (`chunk_sdpa`, attention.py): process CPU
time at 1 thread, the variants interleaved in each round of one process (the machine's noise hits
them alike), the median round. Prints a table (ratios to the one pass), saves a plot.
`--layer`: one layer's attention alone (SmolLM2-135M's heads), masked vs split with K/V repeated
vs split with the grouped queries folded (what attention.py does), the least of 5 rounds.

    python benchmarks/chunk_attention.py [--model default] [--tokens 4096] [--chunks 512,1024]
        [--dtypes bf16,fp32] [--rounds 3] [--layer]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table  # noqa: E402
from transformers.integrations.sdpa_attention import repeat_kv  # noqa: E402

from fineinfer_jupyter.engine.attention import NAME, split_attention  # noqa: E402
from fineinfer_jupyter.engine.config import SamplingParams, Slo  # noqa: E402
from fineinfer_jupyter.engine.models import load_model  # noqa: E402
from fineinfer_jupyter.engine.runner import Runner  # noqa: E402
from fineinfer_jupyter.engine.sequence import Sequence  # noqa: E402


def prefill(runner: Runner, prompt: list[int], chunk: int | None) -> tuple[float, torch.Tensor]:
    """Process CPU seconds of `prompt`'s prefill (in chunks of `chunk` tokens), its last logits."""
    seq = Sequence(prompt, sampling=SamplingParams(), slo=Slo())
    ends = list(range(chunk, len(prompt), chunk)) + [len(prompt)] if chunk else [None]
    cache, t = None, time.process_time()
    for end in ends:
        cache, _, logits = runner.prefill([seq], cache=cache, end=end)
        seq.prefilled = end or len(prompt)
    return time.process_time() - t, logits


def masked(q, k, v, mask, past):
    groups = q.shape[1] // k.shape[1]
    kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


def repeated(q, k, v, mask, past):
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    groups = q.shape[1] // k.shape[1]
    kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
    o1, l1 = flash(q, kk[:, :, :past], vv[:, :, :past], 0.0, False)
    o2, l2 = flash(q, kk[:, :, past:], vv[:, :, past:], 0.0, True)
    return torch.lerp(o2.float(), o1.float(), torch.sigmoid(l1 - l2).unsqueeze(-1))


def folded(q, k, v, mask, past):
    return split_attention(q, k, v, None)


def one_layer(dtypes: list[str]) -> None:
    """Milliseconds of one layer's attention of a chunk after earlier tokens, three ways."""
    heads, kv, d, rows = 9, 3, 64, []
    for name in dtypes:
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        for new, past in ((512, 3584), (1024, 3072), (256, 3840)):
            q = torch.randn(1, new, heads, d, dtype=dt).transpose(1, 2)
            k = torch.randn(1, kv, past + new, d, dtype=dt)
            v = torch.randn_like(k)
            mask = torch.ones(new, past + new, dtype=torch.bool).tril(past)[None, None]
            times: dict[str, list[float]] = {}
            for _ in range(6):  # (the first warms up)
                for f in (masked, repeated, folded):
                    t = time.process_time()
                    f(q, k, v, mask, past)
                    times.setdefault(f.__name__, []).append(time.process_time() - t)
            ms = {f: 1000 * min(t[1:]) for f, t in times.items()}
            rows.append([name, f"{new} after {past}", *ms.values(), ms["masked"] / ms["folded"]])
    print("one layer's attention (9 query, 3 key/value heads, head_dim 64), 1 thread, ms")
    print(table(["dtype", "queries", "masked", "split, repeated", "split, folded", "x"], rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunks", default="512,1024")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layer", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.layer:
        return one_layer(args.dtypes.split(","))
    chunks = [int(c) for c in args.chunks.split(",")]
    rows, bars = [], {}
    for dtype in args.dtypes.split(","):
        loaded = load_model(args.model, dtype=dtype, device="cpu")
        runner = Runner(loaded.model, device=torch.device("cpu"))
        vocab = loaded.model.config.vocab_size
        prompt = [(7919 * i + 13) % (vocab - 10) + 5 for i in range(args.tokens)]
        variants = [("one pass", "sdpa", None)] + [
            (f"chunks of {c}, {impl}", impl, c) for c in chunks for impl in ("sdpa", NAME)
        ]
        times: dict[str, list[float]] = {v[0]: [] for v in variants}
        whole = None
        for r in range(args.rounds + 1):  # round 0 warms up
            for label, impl, chunk in variants:
                loaded.model.set_attn_implementation(impl)
                with torch.no_grad():
                    seconds, logits = prefill(runner, prompt, chunk)
                whole = logits if chunk is None else whole
                if r:
                    times[label].append(seconds)
                    diff = (logits - whole).abs().max().item()
                    print(
                        f"{dtype} round {r} {label}: {seconds:.2f} s, max |logit diff| {diff:.3g}"
                    )
        one = statistics.median(times["one pass"])
        for label, *_ in variants:
            med = statistics.median(times[label])
            rows.append([dtype, label, med, med / one])
            bars[f"{dtype}\n{label.replace(', ', chr(10))}"] = med / one
        loaded.model.set_attn_implementation(NAME)
    print(f"\n{args.tokens}-token prompt, {args.model}, 1 thread, process CPU time, median of "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    print(table(["dtype", "prefill", "CPU s", "x one pass"], rows))
    save_bar_plot(
        OUT / "chunk_attention.png",
        list(bars),
        list(bars.values()),
        title=f"{args.tokens}-token prefill: CPU time / one pass's",
        ylabel="x one pass",
    )


if __name__ == "__main__":
    main()
