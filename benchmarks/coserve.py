"""Training and serving at once: the scheduling policies side by side on one arrival trace.

A seeded trace in the style of the paper (random gaps, fixed duration) is replayed against a
LoRA job that trains the whole time, once per policy (deferred, fineinfer, immediate,
exclusive), plus training alone and inference alone. Prints a table and saves a timeline PNG.

The default load (a request every second on average, 16-64 new tokens each) keeps this 2-core
CPU busy ~70% of the time with inference alone: busy, not saturated. `--gap 2.5` is a light
load (~28%). `--background N` runs N busy processes (a pure-Python spin each) during every
window, from before the engine is built until the window's requests are done: the machine as
it is when a compile, an indexer or a browser tab runs beside the notebook.

    python benchmarks/coserve.py [--model default] [--duration 40] [--rounds 3] [--gap 1.0]
                                 [--background 0]

A window's training tokens are what the job trained between its two ends, read on the engine
thread: the micro-steps that ended plus, for each micro-step in flight, its share of the work
done (`trained`). Counting the micro-steps that ended inside it was off by up to a micro-step at
each end (docs/benchmarks.md, "Twentieth run").
benchmarks/twoproc.py runs these windows at three loads beside a two-process baseline
(llama.cpp's server and a PEFT training script).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, STYLES, TOPICS, CpuMeter, Neighbours, table  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig, Slo, TrainParams  # noqa: E402

DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"


def trace(duration: float, gap: float, seed: int = 0) -> list[tuple[float, list[dict], int]]:
    """(arrival second, chat messages, max_new_tokens): exponential gaps, varied prompts."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(1 / gap)
        if t >= duration:
            return out
        prompt = rng.choice(STYLES).format(t=rng.choice(TOPICS))
        out.append((t, [{"role": "user", "content": prompt}], rng.randint(16, 64)))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(
    model: str,
    policy: str,
    requests,
    duration: float,
    train: bool,
    slo: Slo,
    params: TrainParams,
    background: int = 0,
    **config,
) -> dict:
    """One window of `duration` seconds replaying `requests` (arrival seconds from 0), with
    `background` busy processes from the engine's start until the window's requests are done;
    `config`: more EngineConfig fields (offload, ...)."""
    with Neighbours(background, seconds=duration + 600) as neighbours:
        engine = Engine(
            EngineConfig(model=model, data_dir=tempfile.mkdtemp(), policy=policy, slo=slo, **config)
        )
        try:
            return window(engine, requests, duration, train, params, neighbours.pids)
        finally:
            engine.shutdown()  # also on Ctrl-C: no engine thread left running torch at exit


def window(
    engine: Engine,
    requests,
    duration: float,
    train: bool,
    params: TrainParams,
    neighbours: Sequence[int] = (),
) -> dict:
    engine.metrics.timeline = deque(maxlen=100_000)  # every step of the window, for the plot
    job = None
    if train:
        job = engine.core.trainer.jobs[engine.tune("bench", str(DATA), params)["id"]]
        while job.samples_done < 1:  # past the job's start-up and first micro-step
            time.sleep(0.05)
    busy0 = dict(engine.metrics.busy)
    samples0, tokens0 = (job.samples_done, job.tokens_done) if job else (0, 0)
    cpu = CpuMeter(cpu_groups(engine, neighbours)).start()
    watch = Watch(engine).start()
    first = trained(engine, job) if job else None
    start, wall = time.monotonic(), time.time()  # the timeline's clock is time.time()
    streams = []
    for at, messages, n in requests:
        time.sleep(max(0.0, start + at - time.monotonic()))
        streams.append(engine.generate(messages, max_new_tokens=n))
    time.sleep(max(0.0, start + duration - time.monotonic()))
    last = trained(engine, job) if job else None
    cores = cpu.stop()
    watched = watch.stop(duration)
    samples, counted = (job.samples_done - samples0, job.tokens_done - tokens0) if job else (0, 0)
    busy = {k: engine.metrics.busy[k] - busy0[k] for k in busy0}
    costs = engine.core.scheduler.costs.snapshot()
    if job:
        engine.stop_job(job.id)  # what is still queued (all of exclusive's) drains without training
    results = [s.result() for s in streams]
    steps = list(engine.metrics.timeline)  # now with the iteration that spanned the window's end
    timeline = [
        {**step, "start": step["start"] - wall}
        for step in steps
        if wall <= step["start"] < wall + duration
    ]
    return {
        "samples": samples,
        # over the span between the two readings, scaled to the window's length
        "train_tokens": (last[1] - first[1]) / (last[0] - first[0]) * duration if job else 0,
        "train_tokens_counted": counted,  # (whole micro-steps that ended in the window)
        "busy": busy,
        "results": results,
        "timeline": timeline,
        "costs": costs,
        "cpu": cores,
        "waited": cpu.waited,  # (Linux: seconds ready to run, not running, per wall second)
        "watch": watched,
    }


class Watch:
    """Where the engine's threads were, sampled every `every` seconds over a window from a
    thread of its own (reads /proc and the worker's flag only; nothing on the engine thread):
    the share of samples the worker had a run in flight, the engine thread was kept to fewer
    CPUs than the process has (Apart), the two last ran on the same CPU, the engine thread's
    intra-op counts, and how many other threads were ever seen kept to fewer; at the end the
    busiest threads of the process, in cores (and the kernel's part of them: page faults,
    futexes), by name. For a window that trains far less than its neighbours
    (docs/benchmarks.md, "The stalled window")."""

    def __init__(self, engine: Engine, every: float = 0.2):
        self.engine, self.every = engine, every
        self.samples: list[tuple[bool, bool, bool, int]] = []
        self.masked: set[int] = set()  # threads other than the engine thread seen kept
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bench-watch", daemon=True)
        self._cpu0 = self._threads()
        self._counts0 = self._counts()

    @staticmethod
    def _threads() -> dict[int, tuple[str, float, float]]:
        """{thread id: (name, CPU seconds, of which in the kernel)}: Python's name for its
        threads, the OS's for the others (OpenMP's pool, the tokenizer's)."""
        names, out = {t.native_id: t.name for t in threading.enumerate()}, {}
        tick = os.sysconf("SC_CLK_TCK")
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/stat", "rb") as f:
                    comm, rest = f.read().rsplit(b")", 1)
                fields = rest.split()
                user, system = int(fields[11]), int(fields[12])  # utime, stime (fields 14, 15)
                name = names.get(int(t)) or comm.split(b"(", 1)[1].decode()
                out[int(t)] = (name, (user + system) / tick, system / tick)
            except (OSError, ValueError, IndexError):
                pass
        return out

    def _main(self) -> None:
        from fineinfer_jupyter.engine import threads
        from fineinfer_jupyter.engine.worker import last_cpu

        ex, me = self.engine.core.executor, self.engine.native_id
        cpus = len(os.sched_getaffinity(0))
        while not self._stop.wait(self.every):
            w = ex.worker
            busy = w is not None and w.busy
            try:
                kept = me is not None and len(os.sched_getaffinity(me)) < cpus
            except OSError:  # (the engine thread has ended)
                kept = False
            wid = w.native_id if w is not None else None
            on = last_cpu(wid) if None not in (wid, me) else None
            same = on is not None and on == last_cpu(me)
            self.samples.append((busy, kept, same, (threads.current() or {}).get("intra_op", 0)))
            for t in os.listdir("/proc/self/task"):  # any other thread kept to fewer CPUs
                try:
                    if int(t) != me and len(os.sched_getaffinity(int(t))) < cpus:
                        self.masked.add(int(t))
                except (OSError, ValueError):
                    pass

    def _counts(self) -> dict[str, int]:
        """The engine's split-mode counters (status): second-stream units, passes kept apart."""
        status = self.engine.status().get("train_thread") or {}
        return {k: status.get(k) or 0 for k in ("second_stream_units", "passes_apart")}

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self, seconds: float) -> dict:
        self._stop.set()
        self._thread.join()
        end, n = self._threads(), max(1, len(self.samples))
        used: dict[str, tuple[float, float]] = {}
        for tid, (name, t1, k1) in end.items():
            _, t0, k0 = self._cpu0.get(tid, (name, 0.0, 0.0))
            used[f"{name}/{tid}"] = ((t1 - t0) / seconds, (k1 - k0) / seconds)
        top = sorted(used.items(), key=lambda kv: -kv[1][0])[:5]
        counts: dict[int, int] = {}
        for *_, k in self.samples:
            counts[k] = counts.get(k, 0) + 1
        ran = {k: v - self._counts0[k] for k, v in self._counts().items()}
        return {
            **ran,  # over the window
            "worker_busy": sum(s[0] for s in self.samples) / n,
            "engine_kept": sum(s[1] for s in self.samples) / n,
            "same_cpu": sum(s[2] for s in self.samples) / n,
            "intra_op": counts,
            "others_kept": len(self.masked),
            # cores, and of them the kernel's (page faults, futexes)
            "top_threads": {k: (round(v, 2), round(kern, 2)) for k, (v, kern) in top if v >= 0.01},
        }


def cpu_groups(
    engine: Engine, neighbours: Sequence[int]
) -> dict[str, list[tuple[int, int | None]]]:
    """CpuMeter's groups for an engine window: "train", the training worker's thread (split mode;
    its units on one thread, as beside a neighbour: with more, OpenMP's pool threads do part of
    its work and count under "process"); "serve", the engine thread (inference, the scheduler,
    split mode's second stream); "process", this whole process; "neighbour", the busy
    neighbours."""
    me = os.getpid()
    worker = engine.core.executor.worker
    groups = {"train": [], "serve": [], "process": [(me, None)]}
    if worker is not None:
        groups["train"].append((me, worker.native_id))
    if engine.native_id is not None:
        groups["serve"].append((me, engine.native_id))
    groups["neighbour"] = [(pid, None) for pid in neighbours]
    return groups


def trained(engine: Engine, job) -> tuple[float, float]:
    """(time.monotonic(), `job`'s training tokens so far), read on the engine thread between two
    iterations: its ended micro-steps' tokens, plus each micro-step in flight's tokens times the
    share of its work done (its units done, weighted by the cost model's per-unit shares of a
    micro-step's time; a finished one whole). It moves with the work, as twoproc.py's trainer's
    progress interpolated between its lines does, not in whole micro-steps."""

    def read() -> tuple[float, float]:
        trainer, shares = engine.core.trainer, engine.core.scheduler.costs.shares
        tokens = float(job.tokens_done)
        if trainer.current is job:
            for run, examples in trainer._flight:
                if run.finished:
                    done = 1.0
                elif len(shares) == run.units:
                    done = sum(shares[: run.done]) / sum(shares)
                else:
                    done = run.done / run.units
                tokens += sum(e.num_tokens for e in examples) * done
        return time.monotonic(), tokens

    return engine._call(read)


def train_tokens_in(steps: list[dict], t0: float, t1: float) -> float:
    """Training tokens in [t0, t1]: the seconds of training inside it (timeline iterations,
    clipped at both ends) times the tokens per second of training of the micro-steps the
    timeline saw end. Counting the micro-steps that ended inside a window instead is off by up to
    one micro-step (seconds of work, whole for fineinfer, in units for deferred) at each end."""

    def train(step: dict) -> float:
        return step["duration"] if step["kind"] == "train" else step.get("train") or 0.0

    ends = [i for i, step in enumerate(steps) if step["kind"] == "train" and step["rows"]]
    if not ends:
        return 0.0
    # the rate from the micro-steps after the first (the job's start-up is in the first), or,
    # when none ended after it (a window whose training arrivals cut into pieces), the first's
    first = 0 if len(ends) == 1 else ends[0] + 1
    seconds = sum(train(step) for step in steps[first : ends[-1] + 1])
    tokens = sum(steps[i]["tokens"] for i in (ends if len(ends) == 1 else ends[1:]))
    inside = sum(
        train(s)
        * max(0.0, min(t1, s["start"] + s["duration"]) - max(t0, s["start"]))
        / max(s["duration"], 1e-9)
        for s in steps
    )
    return tokens / max(seconds, 1e-9) * inside


def summarize(windows: list[dict], duration: float, slo: Slo) -> dict:
    total = duration * len(windows)
    results = [r for w in windows for r in w["results"]]
    ttft = [r.stats["ttft"] for r in results]
    tpot = [r.stats["tpot_mean"] for r in results if r.stats["tpot_mean"] is not None]
    stall = [r.stats["tpot_max"] for r in results if r.stats["tpot_max"] is not None]
    met = [r.stats["ttft"] <= slo.ttft and (r.stats["tpot_mean"] or 0) <= slo.tpot for r in results]
    inference = sum(w["busy"]["prefill"] + w["busy"]["decode"] for w in windows)
    return {
        "samples_per_s": sum(w["samples"] for w in windows) / total,
        "train_tokens_per_s": sum(w["train_tokens"] for w in windows) / total,
        "tokens_per_s": sum(r.usage["completion_tokens"] for r in results) / total,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": pct(tpot, 0.5),
        "tpot_p99": pct(tpot, 0.99),
        "stall_p99": pct(stall, 0.99),
        "slo": sum(met) / len(met) if met else float("nan"),
        "inference_share": inference / total,
        # CpuMeter's cores per group (cpu_groups), the windows' mean
        "cpu": {
            k: sum(w["cpu"][k] for w in windows) / len(windows) for k in windows[0].get("cpu", {})
        },
        "timeline": windows[-1]["timeline"],
        "slack": [(r.stats["deferred"], r.stats["slack_at_admission"]) for r in results],
    }


def plot(path: Path, runs: dict[str, dict], duration: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"prefill": "#d95f02", "decode": "#1b9e77", "train": "#7570b3"}
    names = [n for n in runs if runs[n]["timeline"]]
    span = (max(0.0, duration / 2 - 10), min(duration, duration / 2 + 10))  # same 20 s for all
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(11, 1.1 * len(names) + 2.6))
    for ax, name in zip(axes, names):
        for step in runs[name]["timeline"]:
            if span[0] <= step["start"] + step["duration"] and step["start"] <= span[1]:
                ax.broken_barh(
                    [(step["start"], step["duration"])], (0, 1), color=colors[step["kind"]]
                )
        ax.set_xlim(*span)
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    axes[0].set_title("seconds into the last window (prefill orange, decode green, train purple)")
    ax = axes[-1]
    for name in ("deferred", "fineinfer", "immediate"):
        if name in runs:
            deferred = [d for d, _ in runs[name]["slack"]]
            ax.plot(range(len(deferred)), deferred, marker=".", label=f"{name}: deferral (s)")
    ax.set_xlabel("request")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def job_params() -> TrainParams:
    """The co-serving job's shape (twoproc.py's plain PEFT trainer uses the same one)."""
    return TrainParams(
        r=16,
        lora_alpha=32,
        batch_size=8,
        micro_batch_size=4,
        max_length=128,
        max_steps=100_000,
        checkpoint_every=100_000,
    )


def calibrate_gap(args, slo: Slo, params: TrainParams) -> float:
    """The mean gap between arrivals at which inference alone keeps this machine busy
    `args.busy` of the time: machines of this kind differ 2x in speed, so a fixed gap is a
    light load on one and an overload on another. Two quiet windows, the gap scaled between."""
    gap = args.gap
    for _ in range(2):
        w = run(
            args.model,
            "immediate",
            trace(args.duration, gap, seed=99),
            args.duration,
            False,
            slo,
            params,
        )
        busy = (w["busy"]["prefill"] + w["busy"]["decode"]) / args.duration
        print(f"  calibration: gap {gap:.2f} s keeps inference alone {busy:.0%} busy", flush=True)
        gap = min(max(gap * busy / args.busy, 0.3), 10.0)
    return round(gap, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds per window")
    ap.add_argument(
        "--rounds", type=int, default=3, help="windows per run, interleaved across runs"
    )
    ap.add_argument("--gap", type=float, default=1.0, help="mean seconds between arrivals")
    ap.add_argument(
        "--busy",
        type=float,
        help="instead of a fixed gap: the load that keeps this machine busy this share of the "
        "time with inference alone (measured first, quiet; the default load was 0.7 where "
        "these benchmarks began, at --gap 1.0)",
    )
    ap.add_argument("--ttft", type=float, default=3.0)
    ap.add_argument("--tpot", type=float, default=0.2)
    ap.add_argument("--policies", default="deferred,fineinfer,immediate,exclusive")
    ap.add_argument(
        "--background", type=int, default=0, help="busy processes competing for the cores"
    )
    ap.add_argument(
        "--quiet-too",
        action="store_true",
        help="with --background: also every run without them, interleaved, for side-by-side ratios",
    )
    ap.add_argument(
        "--train-thread",
        default="auto",
        choices=("auto", "on", "off"),
        help="EngineConfig.train_thread: auto puts deferred's training on its own thread for a "
        "wide CPU model (benchmarks/train_thread.py compares); off: time-sliced, as before",
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the background processes die too
    slo = Slo(ttft=args.ttft, tpot=args.tpot)
    params = job_params()
    if args.busy:
        args.gap = calibrate_gap(args, slo, params)
    slices = [trace(args.duration, args.gap, seed=r) for r in range(args.rounds)]
    n = sum(map(len, slices))
    print(
        f"model {args.model}: {n} requests in {args.rounds} windows of {args.duration:.0f} s (mean gap {args.gap} s), targets TTFT {slo.ttft} s / TPOT {slo.tpot} s, {args.background} busy background process(es) during every window",
        flush=True,
    )
    plan = [
        ("training alone", "deferred", False, True),
        ("inference alone", "immediate", True, False),
    ]
    plan += [(p, p, True, True) for p in args.policies.split(",")]
    plan = [(*entry, args.background) for entry in plan]
    if args.background and args.quiet_too:
        plan += [
            (f"{name} (quiet)", policy, serve, train, 0) for name, policy, serve, train, _ in plan
        ]
    windows: dict[str, list[dict]] = {name: [] for name, *_ in plan}
    for r in range(args.rounds):  # round-robin: machine noise hits every run alike
        for name, policy, serve, train, background in plan:
            requests = slices[r] if serve else []
            w = run(
                args.model,
                policy,
                requests,
                args.duration,
                train,
                slo,
                params,
                background,
                train_thread=args.train_thread,
            )
            windows[name].append(w)
            print(
                f"  round {r + 1} {name}: {w['train_tokens'] / args.duration:.0f} train tokens/s, {len(w['results'])} requests",
                flush=True,
            )
    runs = {name: summarize(ws, args.duration, slo) for name, ws in windows.items()}
    headers = [
        "run",
        "train samples/s",
        "train tokens/s",
        "vs alone",
        "inference tokens/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "stall p99",
        "SLO met",
        "inference share",
    ]
    rows = []
    for name, r in runs.items():
        served = not name.startswith("training alone")
        base = runs["training alone (quiet)" if name.endswith("(quiet)") else "training alone"]
        latency = (
            [
                r["ttft_p50"],
                r["ttft_p99"],
                r["tpot_p50"],
                r["tpot_p99"],
                r["stall_p99"],
                f"{r['slo']:.0%}",
            ]
            if served
            else ["-"] * 6
        )
        rows.append(
            [
                name,
                r["samples_per_s"],
                r["train_tokens_per_s"],
                r["train_tokens_per_s"] / base["train_tokens_per_s"],
                r["tokens_per_s"],
            ]
            + latency
            + [r["inference_share"]]
        )
    if args.background and args.quiet_too:
        print(
            f"\n{args.background} busy background process(es) ran during the windows of every run but those marked (quiet)\n"
        )
    else:
        print(f"\n{args.background} busy background process(es) ran during every window\n")
    print(table(headers, rows))
    for name in runs:
        quiet = runs.get(f"{name} (quiet)")
        if quiet and quiet["train_tokens_per_s"]:
            busy = runs[name]
            print(
                f"{name}: with {args.background} busy process(es) {busy['train_tokens_per_s'] / quiet['train_tokens_per_s']:.0%} of its quiet training throughput"
                + (
                    f", SLO met {busy['slo']:.0%} (quiet {quiet['slo']:.0%})"
                    if name != "training alone"
                    else ""
                )
            )
    for suffix in ("", " (quiet)"):
        if f"deferred{suffix}" not in runs or f"immediate{suffix}" not in runs:
            continue
        d, i = runs[f"deferred{suffix}"], runs[f"immediate{suffix}"]
        bound = runs[f"training alone{suffix}"]["train_tokens_per_s"] * (1 - d["inference_share"])
        print(
            f"\ndeferred{suffix} / immediate training throughput (tokens): {d['train_tokens_per_s'] / i['train_tokens_per_s']:.2f}x (goal >= 1.5x)"
        )
        if f"fineinfer{suffix}" in runs:
            print(
                f"deferred{suffix} / fineinfer training throughput (tokens): {d['train_tokens_per_s'] / runs[f'fineinfer{suffix}']['train_tokens_per_s']:.2f}x"
            )
        print(
            f"deferred{suffix} vs switching-free bound (alone x non-inference share {1 - d['inference_share']:.2f}): {d['train_tokens_per_s'] / bound:.0%} (goal >= 90%)"
        )
    if windows.get("deferred"):
        c = windows["deferred"][-1]["costs"]
        print(
            "deferred's cost model at the end (seconds = fixed + per unit): "
            + ", ".join(
                f"{k} {c[k]['fixed']:.3f} + {c[k]['per_unit']:.5f}"
                for k in ("prefill", "decode", "train")
            )
            + f", optimizer step {c['optimizer']:.3f}"
        )
    path = OUT / "coserve.png"
    plot(path, {k: v for k, v in runs.items() if not k.startswith("training alone")}, args.duration)
    print(f"timeline: {path}")


if __name__ == "__main__":
    main()
