"""Shared bits of the benchmark scripts: prompts, tables, plots, output folder, busy neighbours."""

from __future__ import annotations

import atexit
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

OUT = Path(__file__).parent / "out"

TOPICS = [
    "the water cycle",
    "photosynthesis",
    "how bees make honey",
    "the French revolution",
    "black holes",
    "compound interest",
    "the rules of chess",
    "how vaccines work",
    "volcanoes",
    "the history of tea",
    "plate tectonics",
    "why the sky is blue",
    "the Roman empire",
    "machine learning",
    "sourdough bread",
    "the moon landing",
    "electric cars",
    "the human heart",
    "origami",
    "climate change",
    "jazz music",
    "the printing press",
    "coral reefs",
    "the Great Wall of China",
    "recycling",
    "the internet",
]
STYLES = [
    "Explain {t} in one sentence.",
    "Write a short paragraph about {t} for a ten-year-old.",
    "Give three facts about {t}.",
    "What is the most surprising thing about {t}? Answer briefly, then explain why in a few sentences.",
    "Summarize {t}.",
    "I am writing a school report about {t}. List the key points I should cover, with a short note on each.",
]


def workload(
    n: int, *, seed: int = 0, min_new: int = 16, max_new: int = 160
) -> list[tuple[list[dict], int]]:
    """n chat requests with varied prompts and seeded answer-length limits."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.choice(STYLES).format(t=rng.choice(TOPICS))
        out.append(([{"role": "user", "content": prompt}], rng.randint(min_new, max_new)))
    return out


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):  # (3 significant digits, but whole numbers from 1,000 up: never 1.03e+03)
        if not isinstance(v, float):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_bar_plot(
    path: Path, labels: list[str], values: list[float], *, title: str, ylabel: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, values, color="#4a7ab5")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


class Neighbours:
    """`n` busy processes (a pure-Python spin each, one core's worth) that compete with the
    benchmark for the cores, as a compile, an indexer or a browser tab would. Each stops by
    itself after `seconds`; `stop()` (or leaving the `with`, or Ctrl-C) kills them sooner."""

    def __init__(self, n: int, seconds: float = 600.0):
        self.n, self.seconds = n, seconds
        self.procs: list[subprocess.Popen] = []

    def start(self) -> Neighbours:
        code = SPIN.format(seconds=self.seconds)
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []
        atexit.unregister(self.stop)

    def __enter__(self) -> Neighbours:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


class CpuMeter:
    """Cores' worth of CPU that groups of processes and threads used over a span: `groups` maps a
    name to (pid, thread id or None for the whole process) pairs. `start()`, then `stop()`
    returns {name: CPU seconds per wall second}. Beside a busy neighbour it shows who paid for
    the cores: the training, the serving, the neighbour (psutil's per-process and per-thread
    user + system times, in the kernel's clock ticks; a process or thread gone by `stop()`
    counts nothing for the span). On Linux `stop()` also sets `waited`: {name: seconds per
    wall second its members were ready to run but waited for a CPU} (/proc's schedstat); a
    member's share of its ready time is cores / (cores + waited): what the OS gave each one
    when they all wanted a core (docs/benchmarks.md, "Twentieth run")."""

    def __init__(self, groups: dict[str, list[tuple[int, int | None]]]):
        self.groups = groups
        self.began: tuple[float, dict[str, float]] | None = None
        self.waits: dict[str, float] | None = None
        self.waited: dict[str, float] | None = None

    def _waits(self) -> dict[str, float] | None:
        """Seconds each group's members have waited ready to run (Linux), or None."""
        if not os.path.isdir("/proc/self/task"):
            return None
        waits = {}
        for name, members in self.groups.items():
            total = 0
            for pid, tid in members:
                tasks = [tid] if tid is not None else None
                try:
                    tasks = tasks or [int(t) for t in os.listdir(f"/proc/{pid}/task")]
                    for t in tasks:
                        with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                            total += int(f.read().split()[1])  # nanoseconds on a run queue
                except (OSError, ValueError, IndexError):
                    pass
            waits[name] = total / 1e9
        return waits

    def _read(self) -> dict[str, float]:
        seconds = {}
        for name, members in self.groups.items():
            total = 0.0
            for pid, tid in members:
                try:
                    p = psutil.Process(pid)
                    if tid is None:
                        t = p.cpu_times()
                        total += t.user + t.system
                    else:
                        total += sum(
                            t.user_time + t.system_time for t in p.threads() if t.id == tid
                        )
                except psutil.Error:
                    pass
            seconds[name] = total
        return seconds

    def start(self) -> CpuMeter:
        self.waits = self._waits()
        self.began = (time.monotonic(), self._read())
        return self

    def stop(self) -> dict[str, float]:
        t0, before = self.began
        after, wall = self._read(), time.monotonic() - t0
        waits = self._waits()
        if waits is not None and self.waits is not None:
            self.waited = {
                k: max(0.0, waits[k] - self.waits[k]) / max(wall, 1e-9) for k in self.groups
            }
        return {k: max(0.0, after[k] - before[k]) / max(wall, 1e-9) for k in self.groups}
