"""One-row products on one thread against every thread (RowLinear.spread; the engine picks
at start by Runner.choose_row_threads): decode tokens/s at batch 1, side by side in one
process per setting, quiet and beside busy neighbours.

For each --decode-weights mode (the int8 copies, "auto", and bf16 mv, "base": int8rows.py)
one engine (dtype "auto", the immediate policy) is loaded; then, --rounds times, a decode of
--tokens new tokens at batch 1 with the layers' one-row products on one thread (the pass on
one thread, the head's product on every thread: as before) and one with them on every thread,
interleaved; with --background N, the same again beside N busy neighbours (one core's spin
each). The table gives the median and best tokens/s of each and the median's ratio, and what
the engine chose at start (status row_threads).

    python benchmarks/row_threads.py [--model default] [--rounds 4] [--tokens 32]
                                     [--background 1] [--decode-weights auto,base]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, Neighbours, save_bar_plot, table  # noqa: E402
from quant import decode_rate  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig  # noqa: E402
from fineinfer_jupyter.engine.precision import RowLinear  # noqa: E402


def rates(engine, rounds: int, tokens: int) -> dict[bool, list[float]]:
    layers = [m for m in engine.core.loaded.model.modules() if isinstance(m, RowLinear)]
    chosen = {m.spread for m in layers}
    out: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(rounds):
            for spread in (False, True):
                for m in layers:
                    m.spread = spread
                out[spread].append(decode_rate(engine, 1, tokens))
    finally:
        for m in layers:
            m.spread = chosen.pop() if len(chosen) == 1 else False
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--background", type=int, default=1, help="busy neighbours (0: quiet only)")
    ap.add_argument("--decode-weights", default="auto,base")
    args = ap.parse_args()
    rows, labels, values = [], [], []
    for weights in args.decode_weights.split(","):
        config = EngineConfig(
            model=args.model,
            data_dir=tempfile.mkdtemp(),
            policy="immediate",
            dtype="auto",
            decode_weights=weights,
        )
        with Engine(config, thread=False) as engine:
            chose = engine.status()["row_threads"] or {}
            print(f"{weights}: the engine chose {chose.get('threads')}: {chose.get('reason')}")
            decode_rate(engine, 1, 8)  # warm-up
            for neighbours in sorted({0, args.background}):
                with Neighbours(neighbours, seconds=600):
                    got = rates(engine, args.rounds, args.tokens)
                one, every = (statistics.median(got[k]) for k in (False, True))
                rows.append(
                    [
                        weights,
                        neighbours,
                        one,
                        max(got[False]),
                        every,
                        max(got[True]),
                        every / one,
                        chose.get("threads", "-"),
                    ]
                )
                print(
                    table(
                        ["weights", "neighbours", "one", "best", "every", "best", "x", "chose"],
                        rows[-1:],
                    ),
                    flush=True,
                )
                labels += [f"{weights} nb{neighbours} one", f"{weights} nb{neighbours} every"]
                values += [one, every]
    headers = [
        "decode weights",
        "neighbours",
        "one thread tok/s (median)",
        "(best)",
        "every thread tok/s (median)",
        "(best)",
        "every / one",
        "engine's choice at start",
    ]
    print(table(headers, rows))
    save_bar_plot(
        OUT / "row_threads.png",
        labels,
        values,
        title="decode at batch 1: one-row products on one thread vs every thread",
        ylabel="tokens/s (median)",
    )


if __name__ == "__main__":
    main()
