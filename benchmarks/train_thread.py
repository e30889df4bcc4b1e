"""Training on a thread of its own (train_thread on) against time-sliced in the engine thread
(off): the deferred policy, a LoRA job training while a steady stream of requests is served,
and training alone, side by side in one run, windows interleaved.

    python benchmarks/train_thread.py [--model default] [--dtypes auto,float32] [--duration 30]
                                      [--rounds 2] [--gap 1.5] [--background 0] [--modes on,off]

Each window builds a fresh engine (EngineConfig.train_thread "on" or "off"; "auto" is on for a
model this wide on a CPU with 2 threads; mode "on1" is "on" with train_streams=1, no second
micro-step on the engine thread; everything else the same), starts coserve.py's job (r 16, batch 8 in micro-batches of 4, max_length 128, herbology),
then replays coserve.py's seeded trace (a request every `gap` seconds on average, 16-64 new
tokens) for `duration` seconds; "alone" windows have no requests. Training tokens/s counts the
tokens of the micro-steps that ended inside the window (off by up to one micro-step at each
end, the same for both modes). `--background N` runs N busy neighbours during every window.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Neighbours, table  # noqa: E402
from coserve import job_params, pct, trace, window  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig, Slo  # noqa: E402


def one(args, dtype: str, mode: str, requests, slo: Slo) -> dict:
    streams = 1 if mode == "on1" else 2
    with Neighbours(args.background, seconds=args.duration + 600):
        engine = Engine(
            EngineConfig(
                model=args.model,
                data_dir=tempfile.mkdtemp(),
                policy="deferred",
                slo=slo,
                dtype=dtype,
                train_thread=mode.removesuffix("1"),
                train_streams=streams,
            )
        )
        try:
            status = engine.status()
            w = window(engine, requests, args.duration, True, job_params())
            w["why"] = status["train_thread"]["reason"]
            w["split"] = status["train_thread"]["enabled"]
            w["dtype"] = status["model"]["dtype"]
            return w
        finally:
            engine.shutdown()


def row(name: str, windows: list[dict], duration: float, slo: Slo) -> list:
    results = [r for w in windows for r in w["results"]]
    ttft = [r.stats["ttft"] for r in results]
    tpot = [r.stats["tpot_mean"] for r in results if r.stats["tpot_mean"] is not None]
    met = [r.stats["ttft"] <= slo.ttft and (r.stats["tpot_mean"] or 0) <= slo.tpot for r in results]
    rates = [w["train_tokens_counted"] / duration for w in windows]

    def f(x, fmt="{:.2f}"):
        return "-" if x != x else fmt.format(x)

    return [
        name,
        " / ".join(f"{r:.0f}" for r in rates),
        f"{sum(rates) / len(rates):.0f}",
        f(sum(met) / len(met), "{:.0%}") if met else "-",
        f(pct(ttft, 0.5)),
        f(pct(ttft, 0.99)),
        f(pct(tpot, 0.5), "{:.3f}"),
        f(pct(tpot, 0.99), "{:.3f}"),
        len(results),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtypes", default="auto,float32")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per window")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gap", type=float, default=1.5, help="mean seconds between arrivals")
    ap.add_argument("--ttft", type=float, default=3.0)
    ap.add_argument("--tpot", type=float, default=0.2)
    ap.add_argument("--background", type=int, default=0, help="busy neighbours per window")
    ap.add_argument("--no-alone", action="store_true", help="skip the training-alone windows")
    ap.add_argument("--modes", default="on,off", help="of on, on1 (one stream), off")
    args = ap.parse_args()
    slo = Slo(ttft=args.ttft, tpot=args.tpot)
    stream = trace(args.duration, args.gap)
    loads = [("stream", stream)] + ([] if args.no_alone else [("alone", [])])
    windows: dict[tuple, list[dict]] = {}
    why: dict[tuple, str] = {}
    t0 = time.monotonic()
    for r in range(args.rounds):
        for dtype in args.dtypes.split(","):
            for load, requests in loads:
                modes = args.modes.split(",")
                for mode in modes if r % 2 == 0 else modes[::-1]:  # interleaved
                    w = one(args, dtype, mode, requests, slo)
                    key = (w["dtype"], load, mode if w["split"] else "off")
                    windows.setdefault(key, []).append(w)
                    why[key] = w["why"]
                    print(
                        f"  round {r + 1} {dtype}->{w['dtype']} {load} train_thread={mode}: "
                        f"{w['train_tokens_counted'] / args.duration:.0f} training tokens/s, "
                        f"{len(w['results'])} requests ({time.monotonic() - t0:.0f} s)",
                        flush=True,
                    )
    header = [
        "dtype, load, train_thread",
        "train tok/s per round",
        "mean",
        "SLO met",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "requests",
    ]
    rows = [row(", ".join(k), ws, args.duration, slo) for k, ws in windows.items()]
    print(
        f"\ntrain_thread {' vs '.join(args.modes.split(','))}: deferred, {args.model}, gap {args.gap} s, "
        f"{args.duration:g} s windows, {args.rounds} rounds, {args.background} busy neighbours"
    )
    print(table(header, rows))
    for (dtype, load, mode), reason in why.items():
        if load == loads[0][0]:
            print(f"  {dtype} train_thread={mode}: {reason}")

    def mean(ws):
        return sum(w["train_tokens_counted"] for w in ws) / len(ws)

    modes = args.modes.split(",")
    for dtype in dict.fromkeys(k[0] for k in windows):
        for load, _ in loads:
            for a, b in [(m, n) for i, m in enumerate(modes) for n in modes[i + 1 :]]:
                x, y = windows.get((dtype, load, a)), windows.get((dtype, load, b))
                if x and y:
                    print(f"  {dtype} {load}: training {a}/{b} {mean(x) / max(mean(y), 1e-9):.2f}x")


if __name__ == "__main__":
    main()
