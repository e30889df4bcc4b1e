"""Padded tokens of a job's micro-steps: its effective batches in their shuffled order against
the longest examples first (training._longest_first, what the engine does), per batch and
micro-batch size. A micro-step pads its examples to its longest, and its time grows with the
padded tokens; the effective batch's gradient is the same either way (docs/design.md, "The life
of a training job"). Counts only: no model runs but the tokenizer.

    python benchmarks/padding.py [--model default] [--data notebooks/data/herbology.jsonl]
                                 [--max-length 128] [--steps 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import table  # noqa: E402

from fineinfer_jupyter.engine import TrainParams  # noqa: E402
from fineinfer_jupyter.engine.data import build_dataset  # noqa: E402
from fineinfer_jupyter.engine.job import Job  # noqa: E402
from fineinfer_jupyter.engine.models import load_model  # noqa: E402
from fineinfer_jupyter.engine.training import _longest_first  # noqa: E402

DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"
SHAPES = [(8, 4), (8, 2), (16, 4), (4, 2), (32, 8)]  # (batch_size, micro_batch_size)


def padded(lengths: list[int], micro: int) -> int:
    return sum(
        len(g) * max(g) for g in (lengths[i : i + micro] for i in range(0, len(lengths), micro))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="effective batches counted per shape")
    args = ap.parse_args()
    tokenizer = load_model(args.model).tokenizer
    data = build_dataset(args.data, tokenizer, max_length=args.max_length, seed=0)
    lengths = sorted(e.num_tokens for e in data.train)
    print(
        f"{len(lengths)} examples of {args.data}, {lengths[0]}-{lengths[-1]} tokens "
        f"(median {lengths[len(lengths) // 2]}), max_length {args.max_length}\n"
    )
    rows = []
    for batch, micro in SHAPES:
        p = TrainParams(batch_size=batch, micro_batch_size=micro, max_length=args.max_length)
        job = Job("padding", "padding", p, data, Path("/nonexistent"))
        real = shuffled = longest = 0
        for step in range(args.steps):
            indices = job.batch_indices(step)
            real += sum(data.train[i].num_tokens for i in indices)
            shuffled += padded([data.train[i].num_tokens for i in indices], micro)
            longest += padded([data.train[i].num_tokens for i in _longest_first(job, step)], micro)
        saved = 1 - longest / shuffled
        rows.append([f"{batch} / {micro}", real / shuffled, real / longest, f"{saved:.1%}"])
    print(
        table(
            ["batch / micro", "real / padded, shuffled", "longest first", "padded tokens saved"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
