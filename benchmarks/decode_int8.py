"""What the int8 (and int4) copies of one-row decodes (int8rows.py, decode_weights) cost in
quality, and their speed per product and per decode step, in one process.

Quality: each of --records herbology records (prompt + completion, chat template) is read
token by token through one-row decode passes (teacher forcing: every token after the first
fed as a decode of batch 1), by the float32 model, the bf16 model ("base") and the bf16 model
with its int8 copies ("int8") or its int4 copies ("int4", groups of 32). Per setting: the mean loss (nats) of those next-token
predictions (the validation loss, computed as decodes compute it: the engine's own validation
pass is a prefill, which keeps bf16), the mean KL divergence from float32's next-token
distribution, the largest logit difference from float32, and the share of positions whose
top token is float32's.

Speed (1 thread, process time, interleaved, best of --rounds): each linear shape of the model
one row at a time by bf16 mv, by oneDNN's blocked bf16 copy, by the int8 kernel; and whole
decode steps at batch 1, 2 and 4 (--batches; one thread, a one-row step's head on every thread)
with the int8 copies, the int4 copies and neither, interleaved (a step of several rows by the
copies only up to the rows the load measured them faster for: RowLinear.copy_rows).

    python benchmarks/decode_int8.py [--model default] [--records 16] [--rounds 5] [--batches 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import table  # noqa: E402

from fineinfer_jupyter.engine import precision  # noqa: E402
from fineinfer_jupyter.engine.models import load_model  # noqa: E402

DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"


def texts(tokenizer, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    return [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ],
            tokenize=True,
            return_dict=False,
        )
        for r in rows
    ]


@torch.no_grad()
def read(model, ids: list[int], int8: bool) -> torch.Tensor:
    """float32 log-probabilities of each next token, one-row decode passes after the first."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = []
    with precision.fewer_threads(1), precision.decoding(int8):
        for t in ids[:-1]:
            logits = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits
            out.append(torch.log_softmax(logits[0, -1].float(), -1))
    return torch.stack(out)


def quality(models: dict, sequences) -> list[list]:
    ref = [read(models["float32"], s, False) for s in sequences]
    rows = []
    for name, (model, int8) in {
        "float32": (models["float32"], False),
        "bf16 (decode_weights=base)": (models["bf16"], False),
        "bf16 + int8 copies": (models["bf16"], True),
        "bf16 + int4 copies": (models["int4"], True),
    }.items():
        got = [read(model, s, int8) for s in sequences]
        targets = [torch.tensor(s[1:]) for s in sequences]
        loss = torch.cat([-g.gather(1, t[:, None])[:, 0] for g, t in zip(got, targets)]).mean()
        kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(ref, got)]).mean()
        diff = max(float((r - g).abs().max()) for r, g in zip(ref, got))  # (log-probs)
        top = torch.cat([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)]).float().mean()
        rows.append([name, f"{loss:.4f}", f"{kl:.5f}", f"{diff:.3f}", f"{top:.1%}"])
    return rows


def best_of(fns: dict, rounds: int, reps: int) -> dict:
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            t = time.process_time()
            for _ in range(reps):
                f()
            best[k] = min(best[k], (time.process_time() - t) / reps)
    return best


@torch.no_grad()
def products(model, rounds: int) -> list[list]:
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    layers = {}
    for m in model.modules():
        if isinstance(m, precision.RowLinear) and m.int8 is not None:
            layers.setdefault((m.out_features, m.in_features), m)
    for (o, i), m in layers.items():
        x = torch.randn(1, i, dtype=torch.bfloat16)
        fns = {"mv": lambda m=m, x=x: torch.mv(m.weight, x[0])}
        if m.packed is not None:
            fns["blocked"] = lambda m=m, x=x: torch.ops.mkldnn._linear_pointwise(
                x, m.packed, None, "none", [], ""
            )
        fns["int8"] = lambda m=m, x=x: torch._weight_int8pack_mm(x, *m.int8)
        t = best_of(fns, rounds, max(1, 4_000_000 // (o * i)))
        rows.append(
            [f"{o} x {i}"]
            + [f"{t[k] * 1e6:.1f}" if k in t else "-" for k in ("mv", "blocked", "int8")]
            + [f"{t['mv'] / t['int8']:.2f}x"]
        )
    torch.set_num_threads(threads)
    return rows


@torch.no_grad()
def steps(settings: dict, tokenizer, rounds: int, n: int = 16, batch: int = 1) -> list[list]:
    """Whole decode steps of `batch` rows on one thread (as beside the training worker; a
    one-row step's head on every thread), interleaved, best of `rounds`: `settings` name ->
    (model, its copies on). A step of several rows multiplies by the copies where the load
    measured them faster for that many rows (RowLinear.copy_rows), else by the blocked bf16
    copy."""
    from transformers import DynamicCache

    ids = tokenizer("The history of herbology begins", return_tensors="pt").input_ids
    ids = ids.expand(batch, -1)
    best = {}
    for _ in range(rounds):
        for name, (model, copies) in settings.items():
            cache = DynamicCache(config=model.config)
            nxt = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            with precision.fewer_threads(1), precision.decoding(copies):
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(n):
                    logits = model(input_ids=nxt, cache=cache, use_cache=True).logits
                    nxt = logits[:, -1:].argmax(-1)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], cpu / n), min(old[1], wall / n))
    base = best["bf16 (base)"][1]
    return [
        [k, f"{w * 1e3:.1f}", f"{c * 1e3:.1f}", f"{1 / w:.1f}", f"{base / w:.2f}x"]
        for k, (c, w) in best.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,2,4", help="decode steps of these many rows")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    bf16 = load_model(args.model, dtype="bfloat16", decode_weights="int8")
    int4 = load_model(args.model, dtype="bfloat16", decode_weights="int4")
    fp32 = load_model(args.model, dtype="float32")
    print(f"{args.model}: {bf16.decode_reason}; {int4.decode_reason}; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(table(["one row, 1 thread (us)", "bf16 mv", "bf16 blocked", "int8", "mv / int8"],
                products(bf16.model, args.rounds)))  # fmt: skip
    settings = {
        "int8 copies": (bf16.model, True),
        "int4 copies": (int4.model, True),
        "bf16 (base)": (bf16.model, False),
    }
    for batch in args.batches:
        print(table([f"decode step, batch {batch}", "ms (wall)", "ms (CPU)", "steps/s", "/ base"],
                    steps(settings, bf16.tokenizer, args.rounds, batch=batch)))  # fmt: skip
    sequences = texts(bf16.tokenizer, args.records)
    rows = quality({"float32": fp32.model, "bf16": bf16.model, "int4": int4.model}, sequences)
    print(table(["one-row decodes read", "loss", "KL from fp32", "max |dlogp|", "top-1 = fp32"],
                rows))  # fmt: skip
    print(f"({args.records} herbology records, {sum(len(s) - 1 for s in sequences)} positions)")


if __name__ == "__main__":
    main()
