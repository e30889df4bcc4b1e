"""Threads and OpenMP waiting when other programs use the cores: which configuration slows
the engine's work in proportion to the cores a busy neighbour takes, and which collapses.

Each configuration runs in a fresh process (OpenMP reads its waiting policy when its runtime
starts, before torch is imported) on the default model: a PEFT LoRA micro-step of 1 x 64
tokens (forward and backward) and a decode step of a batch of 8 rows. Each is measured on the
machine as it is, then with 1 and 2 busy neighbour processes (pure-Python spins started and
stopped here). Prints medians, their ratio to torch's defaults with no neighbour and to the
same configuration with no neighbour, from the same run, and how many cores other programs
kept busy meanwhile (the machine may be shared); saves a plot.

    python benchmarks/threads.py [--model default] [--neighbours 0,1,2] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, Neighbours, table  # noqa: E402

# name -> (environment before torch starts, intra-op threads or None for torch's default)
CONFIGS = {
    "torch defaults": ({}, None),
    "PASSIVE, 2 threads": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "1 thread": ({}, 1),
    "GOMP_SPINCOUNT=1e3, 2 threads": ({"GOMP_SPINCOUNT": "1000"}, 2),
    "GOMP_SPINCOUNT=1e4, 2 threads": ({"GOMP_SPINCOUNT": "10000"}, 2),
    "GOMP_SPINCOUNT=1e5, 2 threads": ({"GOMP_SPINCOUNT": "100000"}, 2),
}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")


def measure(model_name: str, threads: int | None, steps: int, budget: float) -> dict:
    """In the child: LoRA micro-steps and decode steps, each timed on its own."""
    import torch  # first: nothing of ours may set the OpenMP environment before it
    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache

    from fineinfer_jupyter.engine.models import load_model

    if threads is not None:
        torch.set_num_threads(threads)
    loaded = load_model(model_name)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lora).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 64), generator=g)  # [1, 64]

    def micro_step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    prompt = torch.randint(0, vocab, (8, 32), generator=g)  # [8, 32]

    def decoder():
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            position = prompt.shape[1]
            while True:
                token = out.logits[:, -1].argmax(-1, keepdim=True)  # [8, 1]
                out = model(
                    input_ids=token,
                    past_key_values=cache,
                    position_ids=torch.full((8, 1), position),
                    use_cache=True,
                    logits_to_keep=1,
                )
                position += 1
                yield

    def timed(step, n: int) -> list[float]:
        step()  # warm-up
        times, end = [], time.monotonic() + budget
        for _ in range(n):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            if time.monotonic() > end:
                break
        return times

    decode = decoder()
    return {
        "threads": torch.get_num_threads(),
        "train": timed(micro_step, steps),
        "decode": timed(lambda: next(decode), 4 * steps),
    }


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy, all cores together (the engine's own
    counter: psutil.cpu_times)."""
    from fineinfer_jupyter.engine.threads import machine_busy_seconds

    return machine_busy_seconds()


def measure_others(seconds: float) -> float:
    busy, ours = busy_seconds(), our_seconds()
    time.sleep(seconds)
    return (busy_seconds() - busy - (our_seconds() - ours)) / seconds


def our_seconds() -> float:
    """CPU seconds of our finished child processes (the measured one and the neighbours)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child_run(args, name: str) -> dict:
    env_vars, threads = CONFIGS[name]
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    env.update(env_vars)
    cmd = [sys.executable, __file__, "--child", name, "--model", args.model]
    cmd += ["--steps", str(args.steps), "--budget", str(args.budget)]
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=4 * args.budget + 120
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert threads is None or result["threads"] == threads
    return result


def plot(path: Path, results: dict, loads: list[int], names: list[str], baseline: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / len(names)
    for ax, kind, title in zip(
        axes, ("train", "decode"), ("LoRA micro-step 1 x 64", "decode step, batch 8")
    ):
        for i, name in enumerate(names):
            ratios = [statistics.median(results[n][name][kind]) / baseline[kind] for n in loads]
            xs = [x + (i - len(names) / 2 + 0.5) * width for x in range(len(loads))]
            ax.bar(xs, ratios, width, label=name)
        ax.set_xticks(range(len(loads)), [f"{n} busy neighbour(s)" for n in loads])
        ax.set_yscale("log")
        ax.axhline(1, color="gray", linewidth=0.5)
        ax.set_title(title)
    axes[0].set_ylabel(f"median time / {names[0]}, no neighbour")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--neighbours", default="0,1,2", help="busy processes, one run for each")
    ap.add_argument("--steps", type=int, default=5, help="micro-steps (and 4x decode steps)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per kind at most")
    ap.add_argument("--configs", help="only these configurations (comma-separated numbers, from 1)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, CONFIGS[args.child][1], args.steps, args.budget)))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the neighbours die with us
    loads = [int(n) for n in args.neighbours.split(",")]
    names = list(CONFIGS)
    if args.configs:
        names = [names[int(i) - 1] for i in args.configs.split(",")]
    print(f"model {args.model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"other programs kept {measure_others(5.0):.1f} cores busy over 5 s before we started")
    results: dict[int, dict[str, dict]] = {n: {} for n in loads}
    for n in loads:
        for name in names:
            busy, ours, start = busy_seconds(), our_seconds(), time.monotonic()
            with Neighbours(n, seconds=4 * args.budget + 120):
                time.sleep(0.5 if n else 0)  # let them get going
                r = results[n][name] = child_run(args, name)
            others = busy_seconds() - busy - (our_seconds() - ours)
            r["others"] = max(0.0, others / (time.monotonic() - start))
            print(
                f"  {n} neighbour(s), {name}: micro-step {statistics.median(r['train']):.2f} s,"
                f" decode {statistics.median(r['decode']) * 1000:.0f} ms"
                f" (other programs kept {r['others']:.1f} cores busy)",
                flush=True,
            )
    quiet = results[loads[0]][names[0]]
    baseline = {k: statistics.median(quiet[k]) for k in ("train", "decode")}
    headers = ["configuration", "neighbours", "micro-step s (median)", "max", "vs baseline"]
    headers += ["vs itself quiet", "decode ms (median)", "max", "vs baseline"]
    headers += ["vs itself quiet", "other programs (cores)"]
    rows = []
    for name in names:
        for n in loads:
            r, quiet_self = results[n][name], results[loads[0]][name]
            row = [name, n]
            for kind, scale in (("train", 1), ("decode", 1000)):
                median = statistics.median(r[kind])
                row += [median * scale, max(r[kind]) * scale, median / baseline[kind]]
                row.append(median / statistics.median(quiet_self[kind]))
            rows.append(row + [r["others"]])
    print()
    print(table(headers, rows))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (ours included)")
    print(f'baseline: {names[0]} with no neighbour; "quiet": none of our neighbours')
    path = OUT / "threads.png"
    plot(path, results, loads, names, baseline)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
