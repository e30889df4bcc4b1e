"""Who gets the cores beside a busy neighbour: the engine thread kept off the training worker's
CPU every other pass (worker.Apart, the default) against left where the OS puts it.

Split mode (the training worker, bf16 "auto" on a CPU) at three loads, each window beside one
busy neighbour, Apart on and off interleaved. Per window: training tokens/s, requests on
target, and for the worker, the engine thread and the neighbour the cores each used and the
share of its ready time it ran (cores / (cores + time it waited ready to run): Linux's
schedstat). Fair is the same share for the worker and the neighbour, as the two-process setup
gets (benchmarks/twoproc.py); docs/benchmarks.md, "Twentieth run".

    python benchmarks/apart.py [--loads light,medium,overload] [--gaps 2.33,1.0,0.74]
                               [--duration 20] [--rounds 2] [--seed 2001]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import coserve  # noqa: E402
from common import OUT, table  # noqa: E402

from fineinfer_jupyter.engine import Slo  # noqa: E402
from fineinfer_jupyter.engine.worker import Apart  # noqa: E402

SLO = Slo(ttft=3.0, tpot=0.2)
WHO = {"train": "worker", "serve": "engine thread", "neighbour": "neighbour"}


def one(gap: float, apart: bool, duration: float, seed: int) -> dict:
    Apart.on = apart
    try:
        requests = coserve.trace(duration, gap, seed=seed)
        w = coserve.run(
            "default", "deferred", requests, duration, True, SLO, coserve.job_params(), 1
        )
    finally:
        Apart.on = True
    s = coserve.summarize([w], duration, SLO)
    waited = w["waited"] or {}
    share = {
        k: w["cpu"][k] / (w["cpu"][k] + waited[k]) if k in waited else float("nan") for k in WHO
    }
    return {"train": s["train_tokens_per_s"], "slo": s["slo"], "cores": w["cpu"], "share": share}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", default="light,medium,overload")
    ap.add_argument("--gaps", default="2.33,1.0,0.74", help="mean seconds between requests")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2001)
    args = ap.parse_args(argv)
    loads = list(zip(args.loads.split(","), map(float, args.gaps.split(",")), strict=True))
    rows: dict[tuple[str, bool], list[dict]] = {}
    for r in range(args.rounds):
        for name, gap in loads:
            for apart in (True, False):
                w = one(gap, apart, args.duration, args.seed)
                rows.setdefault((name, apart), []).append(w)
                print(
                    f"  round {r + 1} {name} apart {'on' if apart else 'off'}: "
                    f"{w['train']:.0f} train tokens/s, SLO {w['slo']:.0%}, cores "
                    + " / ".join(f"{w['cores'][k]:.2f}" for k in WHO)
                    + ", share of ready time "
                    + " / ".join(f"{w['share'][k]:.0%}" for k in WHO),
                    flush=True,
                )

    def mean(ws, f):
        return sum(map(f, ws)) / len(ws)

    out = []
    for (name, apart), ws in rows.items():
        out.append(
            [name, "on" if apart else "off", mean(ws, lambda w: w["train"])]
            + [f"{mean(ws, lambda w: w['slo']):.0%}"]
            + [" / ".join(f"{mean(ws, lambda w, k=k: w['cores'][k]):.2f}" for k in WHO)]
            + [" / ".join(f"{mean(ws, lambda w, k=k: w['share'][k]):.0%}" for k in WHO)]
        )
    who = " / ".join(WHO.values())
    text = table(
        ["load", "apart", "train tokens/s", "SLO met", f"cores: {who}", f"share of ready: {who}"],
        out,
    )
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "apart.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
