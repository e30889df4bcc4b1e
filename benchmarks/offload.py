"""Layer offload and heterogeneous batching on the default model, half its layers over budget.

(a) Bytes moved and time per iteration, combined versus separate, with disk offload, warm (the
    files in the page cache) and cold (dropped from it before every read, as on a machine with
    no memory to spare): one iteration = a decode of the running requests and one training
    micro-step (forward and backward). Separate: the decode pass fetches the offloaded layers,
    the micro-step's forward fetches them again, its backward once more. Combined: the
    micro-step's forward rides along the decode pass; its backward fetches again.
(b) Training throughput while serving (coserve's trace, default load), heterogeneous batching
    on versus off, deferred policy, disk offload: windows interleaved, side by side.
(c) Peak RSS (Linux: VmHWM, reset after a warm-up) while loading and while serving, no offload
    versus disk offload at two budgets (half and a quarter of the decoder layers), each in a
    fresh process: the layers over the budget go from the checkpoint to their files and are
    never all in memory.
Prints tables, saves plots.

    python benchmarks/offload.py [--rounds 6] [--duration 30] [--windows 2] [--skip-serve]
                                 [--skip-fetch] [--skip-rss] [--cold] [--gap 1.0]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, save_bar_plot, table  # noqa: E402
from coserve import run as serve_window  # noqa: E402
from coserve import summarize, trace  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig, Slo, TrainParams  # noqa: E402
from fineinfer_jupyter.engine.outputs import SchedulerOutput  # noqa: E402

DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"
PARAMS = TrainParams(
    r=16, lora_alpha=32, batch_size=2, micro_batch_size=2, max_length=128, max_steps=100_000
)
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def layer_sizes(model: str) -> list[int]:
    with Engine(EngineConfig(model=model, data_dir=tempfile.mkdtemp()), thread=False) as e:
        layers = e.core.runner.walk.stack.layers
        return [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers]


def peak_rss(model: str, offload: str, budget: int) -> dict:
    """(c) in a fresh process: this script with --rss-child."""
    argv = [sys.executable, __file__, "--rss-child", offload, str(budget), "--model", model]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_child(model: str, offload: str, budget: int) -> None:
    def peak() -> int:  # this process's peak RSS (ru_maxrss would start at the parent's)
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read())[1]) * 1024

    tmp = tempfile.mkdtemp()
    with Engine(EngineConfig(model="tiny", data_dir=tmp, cache_dir=tmp), thread=False) as e:
        e.complete("warm up", max_new_tokens=2)  # imports and first-use allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from what is resident now
    base = peak()
    start = time.perf_counter()
    config = EngineConfig(
        model=model, data_dir=tmp, offload=offload, memory_budget=budget, policy="immediate"
    )
    with Engine(config, thread=False) as e:
        load, seconds = peak(), time.perf_counter() - start
        e.complete(PROMPT, max_new_tokens=32, ignore_eos=True)
        serve = peak()
    print(json.dumps({"load": load - base, "serve": serve - base, "seconds": seconds}))


def iterations(model: str, budget: int, *, cold: bool, rounds: int) -> dict[str, list]:
    """(bytes, seconds) of `rounds` iterations each, separate and combined, alternating."""
    config = EngineConfig(
        model=model,
        data_dir=tempfile.mkdtemp(),
        offload="disk",
        memory_budget=budget,
        offload_cold=cold,
        policy="immediate",
    )
    out: dict[str, list] = {"separate": [], "combined": []}
    with Engine(config, thread=False) as e:
        core = e.core
        layers = core.runner.walk.num_layers
        e.tune("bench", str(DATA), PARAMS)
        stream = e.generate(PROMPT, max_new_tokens=4 * rounds + 8, ignore_eos=True)
        e.iterate()  # its prefill

        def run(**work) -> None:
            o = SchedulerOutput(time.monotonic(), **work)
            core.scheduler.update(o, core.executor.execute(o))

        def moved() -> int:
            return e.metrics_snapshot()["offload"]["bytes_total"]

        for r in range(rounds):
            for how in ("separate", "combined") if r % 2 else ("combined", "separate"):
                rows = list(core.scheduler.running)
                bytes0, start = moved(), time.perf_counter()
                if how == "separate":
                    run(decode=rows)
                    run(train_units=layers, train_examples=2)  # the forward, fetching again
                else:
                    run(decode=rows, train_units=layers, train_examples=2)
                run(train_units=10_000)  # the head and the backward
                out[how].append((moved() - bytes0, time.perf_counter() - start))
        assert stream.final is None, "the request ended before the benchmark did"
        e.cancel(stream.id)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=6, help="iterations of each kind, (a)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per window, (b)")
    ap.add_argument("--windows", type=int, default=2, help="windows per run, (b)")
    ap.add_argument("--gap", type=float, default=1.0, help="mean seconds between arrivals, (b)")
    ap.add_argument("--tpot", type=float, default=0.2)
    ap.add_argument("--skip-serve", action="store_true", help="no (b)")
    ap.add_argument(
        "--cold", action="store_true", help="(b) with cold disk reads (the files dropped first)"
    )
    ap.add_argument("--skip-fetch", action="store_true", help="no (a)")
    ap.add_argument("--skip-rss", action="store_true", help="no (c)")
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)  # (c)'s fresh process
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.model, args.rss_child[0], int(args.rss_child[1]))
        return
    sizes = layer_sizes(args.model)
    budget = sum(sizes[: len(sizes) // 2])  # half the decoder layers resident
    if not args.skip_rss:
        rss_table(args.model, sizes)
    print(
        f"model {args.model}: {budget / 2**20:.0f} MiB of decoder layers resident, the rest on disk"
    )

    if not args.skip_fetch:
        rows, plot_labels, plot_values = [], [], []
        for cold in (False, True):
            got = iterations(args.model, budget, cold=cold, rounds=args.rounds)
            med = {
                k: (statistics.median(b for b, _ in v), statistics.median(s for _, s in v))
                for k, v in got.items()
            }
            cache = "cold" if cold else "warm"
            for how in ("separate", "combined"):
                b, s = med[how]
                rows.append(
                    [
                        f"disk, {cache}",
                        how,
                        b / 2**20,
                        s,
                        b / med["separate"][0],
                        s / med["separate"][1],
                    ]
                )
                plot_labels.append(f"{cache} {how}")
                plot_values.append(b / 2**20)
            print(f"  {cache}: done", flush=True)
        print(
            "\n(a) one decode + one training micro-step, medians of",
            args.rounds,
            "iterations each\n",
        )
        print(
            table(
                [
                    "offload",
                    "iteration",
                    "MiB moved",
                    "seconds",
                    "bytes vs separate",
                    "time vs separate",
                ],
                rows,
            )
        )
        print("goal: combined moves <= 2/3 of the bytes of separate steps")
        path = OUT / "offload.png"
        save_bar_plot(
            path, plot_labels, plot_values, title="bytes fetched per iteration", ylabel="MiB"
        )
        print(f"plot: {path}")
    if args.skip_serve:
        return

    slo = Slo(ttft=3.0, tpot=args.tpot)
    params = TrainParams(
        r=16, lora_alpha=32, batch_size=8, micro_batch_size=4, max_length=128,
        max_steps=100_000, checkpoint_every=100_000,
    )  # fmt: skip
    config = dict(offload="disk", memory_budget=budget, offload_cold=args.cold)
    slices = [trace(args.duration, args.gap, seed=w) for w in range(args.windows)]
    windows: dict[str, list] = {"heterogeneous on": [], "heterogeneous off": []}
    for w in range(args.windows):
        for name in windows:
            on = name.endswith("on")
            result = serve_window(
                args.model, "deferred", slices[w], args.duration, True, slo, params,
                heterogeneous=on, **config,
            )  # fmt: skip
            windows[name].append(result)
            print(
                f"  window {w + 1} {name}: {result['train_tokens'] / args.duration:.0f} train tokens/s",
                flush=True,
            )
    runs = {name: summarize(ws, args.duration, slo) for name, ws in windows.items()}
    off = runs["heterogeneous off"]
    rows = [
        [name, r["train_tokens_per_s"], r["train_tokens_per_s"] / off["train_tokens_per_s"],
         r["tokens_per_s"], r["ttft_p99"], r["tpot_p99"], f"{r['slo']:.0%}"]
        for name, r in runs.items()
    ]  # fmt: skip
    print(
        f"\n(b) serving a request every {args.gap} s on average while training, TTFT 3 s / "
        f"TPOT {args.tpot} s, disk offload {'cold' if args.cold else 'warm'}\n"
    )
    print(
        table(
            [
                "run",
                "train tokens/s",
                "vs off",
                "inference tokens/s",
                "TTFT p99",
                "TPOT p99",
                "SLO met",
            ],
            rows,
        )
    )
    print("goal: heterogeneous batching >= 1.3x training throughput at equal attainment (>= 99%)")


def rss_table(model: str, sizes: list[int]) -> None:
    layers = sum(sizes)
    runs = [("none", "no offload", 0)]
    for share in (2, 4):
        budget = sum(sizes[: len(sizes) // share])
        runs.append(
            ("disk", f"disk, {len(sizes) // share} of {len(sizes)} layers resident", budget)
        )
    rows, labels, values = [], [], []
    for mode, name, budget in runs:
        got = peak_rss(model, mode, budget)
        rows.append(
            [name, budget / 2**20, got["load"] / 2**20, got["serve"] / 2**20, got["seconds"]]
        )
        labels += [f"{name}\nload", f"{name}\nserving"]
        values += [got["load"] / 2**20, got["serve"] / 2**20]
        print(f"  {name}: done", flush=True)
    print(
        f"\n(c) peak RSS above a warmed-up process (VmHWM), each run in a fresh process; "
        f"decoder layers {layers / 2**20:.0f} MiB\n"
    )
    print(table(["run", "budget MiB", "load MiB", "serving MiB", "load s"], rows))
    path = OUT / "offload_rss.png"
    save_bar_plot(path, labels, values, title="peak RSS, load and serving", ylabel="MiB")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
