"""Against what people run today: llama.cpp's server + a PEFT training script, two processes on
the same cores, versus this engine's policies, at every load, quiet and with a busy neighbour.

One command runs the matrix: loads (light/medium/overload: the arrival rate at which inference
alone keeps this machine ~30/70/95% busy, from a calibration window of coserve's), each quiet
and with one busy neighbour process, and per cell:
- the engine (coserve.py's windows): inference alone, deferred, fineinfer, immediate in the
  default dtype (auto: bf16 on CPUs with bf16 matrix units), deferred in float32;
- two processes: llama.cpp's `llama-server` (parallel slots, continuous batching; the default
  model's shipped Q4_1 .gguf) answering the same seeded trace over its OpenAI API, and a plain
  PEFT loop (benchmarks/peft_trainer.py: same data, r 16, batch 8 in micro-batches of 4,
  max_length 128, the engine's dtype) training in a second process. `2p-defaults`: each process
  with its own default threads; `2p-split`: the cores split by hand (llama-server -t 1, torch 1
  thread). More setups: --twoproc NAME=SERVER_THREADS/TORCH_THREADS[/DTYPE][/q4_1|f32], or
  `py-` before the name for llama-cpp-python's server (--llama-cpp-python: its interpreter).
Windows are interleaved (round-robin over every cell and setup), >= 2 rounds. Prints one table
with training tokens/s, SLO attainment, TTFT/TPOT percentiles, the cores' worth of CPU time the
training, the serving and the neighbour used (common.CpuMeter) and the peak RSS of the processes
that serve and train (the engine: this one process; two processes: both summed); saves a bar
plot and the engine's timelines under benchmarks/out/.

    bash benchmarks/build_llama_server.sh     # once: ~/.cache/fineinfer-bench/llama.cpp/bin/
    python benchmarks/twoproc.py [--duration 20] [--rounds 2] [--loads light,medium,overload]

The two-process setup cannot serve the adapter it trains until training ends (and the adapter is
saved and converted to a llama.cpp LoRA .gguf, and the server restarted with it); the engine
serves it, pinned to a snapshot, while it trains.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import http.client
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
import coserve  # noqa: E402
from common import OUT, CpuMeter, Neighbours, table  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from fineinfer_jupyter.engine import Slo  # noqa: E402
from fineinfer_jupyter.engine.models import default_gguf, prepare  # noqa: E402
from fineinfer_jupyter.engine.precision import auto_cpu_dtype  # noqa: E402
from fineinfer_jupyter.engine.threads import WAIT  # noqa: E402

HERE = Path(__file__).parent
BENCH_CACHE = Path.home() / ".cache" / "fineinfer-bench"
LLAMA_SERVER = BENCH_CACHE / "llama.cpp" / "bin" / "llama-server"
LLAMA_CPP_PYTHON = BENCH_CACHE / "llama.cpp" / "venv" / "bin" / "python"  # WITH_PYTHON=1 build
F32_GGUF = BENCH_CACHE / "gguf" / "SmolLM2-135M-Instruct.f32.gguf"
LOADS = {"light": 0.3, "medium": 0.7, "overload": 0.95}
ENGINE_SETUPS = {  # name: (policy, serve, train, dtype[, more EngineConfig fields])
    "inference alone": ("immediate", True, False, "auto"),
    "deferred": ("deferred", True, True, "auto"),
    "fineinfer": ("fineinfer", True, True, "auto"),
    "immediate": ("immediate", True, True, "auto"),
    "deferred fp32": ("deferred", True, True, "float32"),
    # one-row decodes by int4 copies (a setting a user chooses: int8rows.py)
    "deferred int4": ("deferred", True, True, "auto", {"decode_weights": "int4"}),
}


# ---------------------------------------------------------------- processes


def rss(pid: int) -> int:
    """Resident bytes of a process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """The largest sum of the processes' resident memory, sampled every 0.25 s while open."""

    def __init__(self, pids: list[int]):
        self.pids, self.peak, self._stop = pids, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(rss(p) for p in self.pids))
            self._stop.wait(0.25)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, sum(rss(p) for p in self.pids))


def user_env(**extra: str) -> dict:
    """This process's environment without the OpenMP waiting settings the engine's import put
    there (GOMP_SPINCOUNT, KMP_BLOCKTIME): the two processes run as a user would start them."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT}
    return {**env, **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Trainer:
    """benchmarks/peft_trainer.py in its own process; follows its progress lines."""

    def __init__(self, model: str, dtype: str, threads: int, log: Path):
        cmd = [sys.executable, str(HERE / "peft_trainer.py"), "--model", model, "--dtype", dtype]
        if threads:
            cmd += ["--threads", str(threads)]
        env = user_env(PYTHONPATH=str(HERE.parent))
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env
        )
        self.info: dict = {}
        self.progress: list[tuple[float, int, int, int]] = []  # (t, tokens, samples, steps)
        self.pauses: list[list[float]] = []  # [SIGSTOP, SIGCONT] wall-clock times
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            rec = json.loads(line)
            if "t" in rec:
                self.progress.append((rec["t"], rec["tokens"], rec["samples"], rec["steps"]))
            else:
                self.info = rec

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.pauses.append([time.time(), math.inf])

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        if self.pauses and self.pauses[-1][1] == math.inf:
            self.pauses[-1][1] = time.time()

    def active(self, t: float) -> float:
        """Wall-clock time t on the trainer's own clock, which stands still while it is stopped."""
        return t - sum(min(t, b) - a for a, b in self.pauses if a < t)

    def at(self, t: float) -> tuple[float, float]:
        """(tokens, samples) trained by wall-clock time t: linear between the progress lines
        around it, on the trainer's own clock (a micro-batch can span a pause)."""
        points = [(self.active(p[0]), p[1], p[2]) for p in self.progress]
        t = self.active(t)
        after = next((i for i, p in enumerate(points) if p[0] >= t), None)
        if after is None or after == 0:
            p = points[-1] if after is None else points[0]
            return float(p[1]), float(p[2])
        (t0, k0, s0), (t1, k1, s1) = points[after - 1], points[after]
        f = (t - t0) / max(t1 - t0, 1e-9)
        return k0 + f * (k1 - k0), s0 + f * (s1 - s0)

    def next_line(self, after: float, timeout: float = 300.0) -> None:
        """Wait for a progress line stamped after `after` (wall clock)."""
        deadline = time.monotonic() + timeout
        while not (self.progress and self.progress[-1][0] > after):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the trainer stopped reporting (exit code {self.proc.poll()})")
            time.sleep(0.02)

    def steps(self) -> int:
        return self.progress[-1][3] if self.progress else 0


class Server:
    """An OpenAI-compatible inference server in its own process: llama.cpp's llama-server, or
    llama-cpp-python's (`python -m llama_cpp.server`, interrupt_requests off)."""

    def __init__(self, kind: str, gguf: Path, threads: int, log: Path, args):
        self.port = free_port()
        if kind == "llama-server":
            cmd = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1"]
            cmd += ["--port", str(self.port), "-np", str(args.slots), "-c", str(512 * args.slots)]
            cmd += ["--no-webui"] + (["-t", str(threads), "-tb", str(threads)] if threads else [])
        else:
            cmd = [args.llama_cpp_python, "-m", "llama_cpp.server", "--model", str(gguf)]
            cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048"]
            cmd += ["--interrupt_requests", "false"]
            cmd += (
                ["--n_threads", str(threads), "--n_threads_batch", str(threads)] if threads else []
            )
        self.proc = subprocess.Popen(
            cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=user_env()
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{cmd[0]} exited ({self.proc.returncode}); see {log}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{cmd[0]} did not answer in 120 s; see {log}")


def request(port: int, messages: list[dict], max_tokens: int, sent: float) -> SimpleNamespace:
    """One streamed chat completion: times of its content chunks, as the engine's stats."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times, n, error = [], 0, None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            error = f"HTTP {resp.status}"
        while error is None:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    times.append(time.monotonic())
            if chunk.get("usage"):
                n = chunk["usage"].get("completion_tokens", 0)
        conn.close()
    except (OSError, ValueError) as e:
        error = str(e)
    n = n or len(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    stats = {
        "ttft": times[0] - sent if times and not error else float("inf"),
        "tpot_mean": (times[-1] - times[0]) / (n - 1) if len(times) > 1 and n > 1 else None,
        "tpot_max": max(gaps) if gaps else None,
        "deferred": 0.0,
        "slack_at_admission": None,
        "error": error,
    }
    return SimpleNamespace(stats=stats, usage={"completion_tokens": n if times else 0})


def fill(results: list, i: int, *req) -> None:
    results[i] = request(*req)


@dataclass
class TwoProc:
    """A setup of two processes, started on its first window and paused (SIGSTOP) between its
    windows, so that windows of other setups run on a machine without them."""

    name: str
    server_threads: int
    torch_threads: int
    dtype: str = "auto"
    weights: str = "q4_1"
    kind: str = "llama-server"
    server: Server | None = None
    trainer: Trainer | None = None
    info: dict = field(default_factory=dict)
    windows: list = field(default_factory=list)

    def start(self, args, logs: Path) -> None:
        gguf = default_gguf() if self.weights == "q4_1" else F32_GGUF
        slug = self.name.replace(" ", "_")
        self.server = Server(
            self.kind, gguf, self.server_threads, logs / f"{slug}.server.log", args
        )
        self.trainer = Trainer(
            args.model, self.dtype, self.torch_threads, logs / f"{slug}.trainer.log"
        )
        while not self.trainer.progress:  # past start-up and the first micro-batch
            if self.trainer.proc.poll() is not None:
                raise SystemExit(f"the trainer exited; see {logs / f'{slug}.trainer.log'}")
            time.sleep(0.1)
        self.info = self.trainer.info

    def signal(self, sig: int) -> None:
        for p in (self.server, self.trainer):
            if p and p.proc.poll() is None:
                p.proc.send_signal(sig)

    def close(self) -> None:
        """Count every window's training now that the lines after their ends are in (the
        trainer runs until its next line first), then end both processes."""
        if self.trainer and self.trainer.proc.poll() is None and self.windows:
            self.trainer.cont()
            try:
                self.trainer.next_line(time.time())
            except SystemExit:
                pass
            self.trainer.stop()
            for w in self.windows:
                self.count(w)
        self.signal(signal.SIGCONT)
        for p in (self.server, self.trainer):
            if p and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()

    def window(self, args, requests, duration: float, background: int, logs: Path) -> dict:
        with Neighbours(background, seconds=duration + 600) as neighbours:
            if self.server is None:
                self.start(args, logs)
            else:
                self.server.proc.send_signal(signal.SIGCONT)
                self.trainer.cont()
            pids = [self.server.proc.pid, self.trainer.proc.pid]
            cpu = CpuMeter(
                {
                    "train": [(self.trainer.proc.pid, None)],
                    "serve": [(self.server.proc.pid, None)],
                    "neighbour": [(pid, None) for pid in neighbours.pids],
                }
            )
            with PeakRss(pids) as peak:
                cpu.start()
                start, wall = time.monotonic(), time.time()
                threads, results = [], [None] * len(requests)
                for i, (at, messages, n) in enumerate(requests):
                    time.sleep(max(0.0, start + at - time.monotonic()))
                    sent = start + at  # TTFT from the arrival the trace gives, as the engine's
                    job = (results, i, self.server.port, messages, n, sent)
                    threads.append(threading.Thread(target=fill, args=job, daemon=True))
                    threads[-1].start()
                time.sleep(max(0.0, start + duration - time.monotonic()))
                cores = cpu.stop()
                self.trainer.stop()  # the requests still running finish without it
                for t in threads:
                    t.join()
            self.server.proc.send_signal(signal.SIGSTOP)
        w = {"busy": {"prefill": 0.0, "decode": 0.0}, "results": results, "timeline": []}
        w["cpu"] = cores
        w["rss"], w["span"] = peak.peak, (wall, wall + duration)
        self.windows.append(w)
        self.count(w)  # so far: the end of the window is known once a later line is in (close)
        return w

    def count(self, w: dict) -> None:
        (k0, s0), (k1, s1) = (self.trainer.at(t) for t in w["span"])
        w["train_tokens"], w["samples"] = k1 - k0, s1 - s0


def parse_twoproc(spec: str) -> TwoProc:
    """NAME=SERVER_THREADS/TORCH_THREADS[/DTYPE][/q4_1|f32]; 0 threads = the process's default;
    a name starting with `py-` runs llama-cpp-python's server instead of llama-server."""
    name, rest = spec.split("=")
    parts = rest.split("/")
    kind = "llama-cpp-python" if name.startswith("py-") else "llama-server"
    return TwoProc(
        name,
        int(parts[0]),
        int(parts[1]),
        parts[2] if len(parts) > 2 else "auto",
        parts[3] if len(parts) > 3 else "q4_1",
        kind,
    )


def make_f32(model: str) -> Path:
    """An f32 .gguf of the engine's weights (the default model's converted folder: the shipped
    Q4_1 dequantized), beside the shipped Q4_1 one, made once into the bench cache."""
    from export_llamacpp import f32_base

    _, folder = prepare(model)
    F32_GGUF.parent.mkdir(parents=True, exist_ok=True)
    tmp = F32_GGUF.with_suffix(".tmp")
    f32_base(Path(folder), default_gguf(), tmp)
    tmp.rename(F32_GGUF)
    print(f"made {F32_GGUF}", flush=True)
    return F32_GGUF


# ---------------------------------------------------------------- the matrix


def engine_window(args, setup: str, requests, background: int, slo: Slo, params) -> dict:
    policy, serve, train, dtype, *more = ENGINE_SETUPS[setup]
    gc.collect()  # the last window's engine: its memory back to the system before this one's
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with PeakRss([os.getpid()]) as peak:
        w = coserve.run(
            args.model,
            policy,
            requests if serve else [],
            args.duration,
            train,
            slo,
            params,
            background,
            dtype=dtype,
            **(more[0] if more else {}),
        )
    w["rss"] = peak.peak
    return w


def gaps_for(args, slo: Slo, params) -> dict[str, float]:
    """Mean arrival gap per load: given (--gaps), or one calibration of coserve's at the medium
    level (inference alone, quiet), scaled to the others' busy shares."""
    if args.gaps:
        return dict(zip(args.loads, map(float, args.gaps.split(","))))
    args.busy, args.gap = LOADS["medium"], 1.0
    medium = coserve.calibrate_gap(args, slo, params)
    return {load: round(medium * LOADS["medium"] / LOADS[load], 2) for load in args.loads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per window")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loads", default="light,medium,overload")
    ap.add_argument("--gaps", help="mean arrival gaps per load (skips the calibration)")
    ap.add_argument("--background", type=int, default=1, help="the busy neighbours' count")
    ap.add_argument("--no-quiet", action="store_true", help="only windows with the neighbours")
    ap.add_argument("--no-alone", action="store_true", help="no windows of training alone")
    ap.add_argument("--engine", default=",".join(ENGINE_SETUPS), help="engine setups")
    ap.add_argument("--twoproc", default="2p-defaults=0/0,2p-split=1/1", help="see the top")
    ap.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    ap.add_argument(
        "--llama-cpp-python", default=str(LLAMA_CPP_PYTHON), help="interpreter for py- setups"
    )
    ap.add_argument("--slots", type=int, default=4, help="llama-server's parallel slots")
    ap.add_argument("--ttft", type=float, default=3.0)
    ap.add_argument("--tpot", type=float, default=0.2)
    args = ap.parse_args()
    args.loads = args.loads.split(",")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    slo = Slo(ttft=args.ttft, tpot=args.tpot)
    params = coserve.job_params()
    engine_setups = [s for s in args.engine.split(",") if s]
    twoprocs = [parse_twoproc(s) for s in args.twoproc.split(",") if s]
    _, folder = prepare(args.model)
    # the trainer's dtype "auto" is the engine's choice, decided here on a quiet machine (the
    # trainer's own probe would run beside llama-server's spinning threads and pick float32)
    dtype = auto_cpu_dtype(AutoConfig.from_pretrained(folder))[0] if folder else "float32"
    for t in twoprocs:
        t.dtype = str(dtype).removeprefix("torch.") if t.dtype == "auto" else t.dtype
    if (
        twoprocs
        and not args.llama_server.exists()
        and any(t.kind == "llama-server" for t in twoprocs)
    ):
        raise SystemExit(f"no {args.llama_server}: bash benchmarks/build_llama_server.sh first")
    if any(t.weights == "f32" for t in twoprocs) and not F32_GGUF.exists():
        make_f32(args.model)
    gaps = gaps_for(args, slo, params)
    backgrounds = [args.background] + ([] if args.no_quiet or not args.background else [0])
    cells = [(load, bg) for load in args.loads for bg in backgrounds]
    setups = engine_setups + [t.name for t in twoprocs]
    print(
        f"model {args.model}, {args.rounds} rounds of {args.duration:.0f} s windows; mean gaps "
        + ", ".join(f"{k} {v} s" for k, v in gaps.items())
        + f"; targets TTFT {slo.ttft} s / TPOT {slo.tpot} s; neighbours {backgrounds}",
        flush=True,
    )
    logs = Path(tempfile.mkdtemp(prefix="twoproc-"))
    windows: dict[tuple, list[dict]] = {}
    procs = {t.name: t for t in twoprocs}
    began = time.monotonic()
    try:
        for r in range(args.rounds):
            for bg in backgrounds if not args.no_alone else []:  # the same at every load
                w = engine_window(args, "deferred", [], bg, slo, params)
                windows.setdefault(("-", bg, "training alone"), []).append(w)
            for c, (load, bg) in enumerate(cells):
                # a trace per round and cell, the same for every setup in it (different prompts
                # in every cell: llama-server keeps its slots' prompt caches between windows)
                requests = coserve.trace(args.duration, gaps[load], seed=1000 * r + c)
                for setup in setups:
                    if setup in procs:
                        w = procs[setup].window(args, requests, args.duration, bg, logs)
                    else:
                        w = engine_window(args, setup, requests, bg, slo, params)
                    windows.setdefault((load, bg, setup), []).append(w)
                    met = coserve.summarize([w], args.duration, slo)["slo"]
                    counted = w.get("train_tokens_counted")  # (the engine's whole micro-steps)
                    whole = (
                        f" ({counted / args.duration:.0f} in whole micro-steps)" if counted else ""
                    )
                    print(
                        f"  round {r + 1} {load} bg{bg} {setup}: "
                        f"{w['train_tokens'] / args.duration:.0f} train tokens/s{whole}, "
                        f"{len(w['results'])} requests, SLO {met:.0%}, "
                        f"{time.monotonic() - began:.0f} s in",
                        flush=True,
                    )
                    if "watch" in w:  # where the engine's threads were (coserve.Watch)
                        print(f"    {watched(w['watch'])}", flush=True)
    except (KeyboardInterrupt, SystemExit) as e:  # (timeout's SIGTERM): what was measured
        print(f"stopped early ({e!r}): the table has the windows that ended", flush=True)
    finally:
        for t in twoprocs:
            t.close()
    report(args, windows, gaps, slo, twoprocs, logs)


def watched(watch: dict) -> str:
    """coserve.Watch's figures on one line."""
    return (
        f"worker busy {watch['worker_busy']:.0%}, engine thread kept apart "
        f"{watch['engine_kept']:.0%}, same CPU {watch['same_cpu']:.0%}, intra-op counts "
        f"{watch['intra_op']}, other threads kept {watch['others_kept']}, second stream units "
        f"{watch['second_stream_units']}, passes apart {watch['passes_apart']}; busiest threads "
        f"(cores, of them in the kernel) {watch['top_threads']}"
    )


def cores(cpu: dict, neighbours: int) -> str:
    """CpuMeter's cores per group as "train / serve / neighbour" ("-": not measured)."""
    keys = ("train", "serve") + (("neighbour",) if neighbours else ())
    return " / ".join(f"{cpu[k]:.2f}" if k in cpu else "-" for k in keys)


def report(args, windows, gaps, slo: Slo, twoprocs, logs: Path) -> None:
    runs = {k: coserve.summarize(ws, args.duration, slo) for k, ws in windows.items()}
    peak = {k: max(w["rss"] for w in ws) for k, ws in windows.items()}
    headers = ["load", "neighbour", "setup", "train tokens/s", "SLO met", "TTFT p50", "TTFT p99"]
    headers += ["TPOT p50", "TPOT p99", "inference tokens/s", "inference share"]
    headers += ["CPU train / serve / neighbour", "peak RSS GB"]
    rows = []
    for (load, bg, setup), r in runs.items():
        served = setup != "training alone"
        rows.append(
            [load, "yes" if bg else "no", setup, r["train_tokens_per_s"]]
            + (
                [f"{r['slo']:.0%}", r["ttft_p50"], r["ttft_p99"], r["tpot_p50"], r["tpot_p99"]]
                if served
                else ["-"] * 5
            )
            + [r["tokens_per_s"], r["inference_share"], cores(r["cpu"], bg)]
            + [peak[(load, bg, setup)] / 2**30]
        )
    print(f"\nthe two-process setups (their logs: {logs}):")
    for t in twoprocs:
        print(f"  {t.name}: {t.kind} threads {t.server_threads or 'default'}, trainer {t.info}")
    print()
    print(table(headers, rows))
    print(
        "\n(inference share: the engine's own prefill + decode seconds per second; for the two "
        "processes not measured. CPU: cores' worth of CPU time per second over the window, of the "
        "training (the engine's worker thread; the trainer process), the serving (the engine "
        "thread; llama-server) and the busy neighbour; on two threads or more OpenMP's pool "
        "threads and split mode's second stream blur the engine's split. The two-process setup "
        "cannot serve the adapter it trains until training ends; the engine serves it while it "
        "trains.)\n"
    )
    for load, bg in {(k[0], k[1]) for k in runs if k[0] != "-"}:
        cell = {k[2]: v for k, v in runs.items() if k[:2] == (load, bg)}
        d = cell.get("deferred")
        if not d:
            continue
        others = {k: v for k, v in cell.items() if k not in ("deferred", "inference alone")}
        worst = [k for k, v in others.items() if v["slo"] > d["slo"]]
        engine = [
            k for k in ("fineinfer", "immediate") if k in cell and cell[k]["train_tokens_per_s"]
        ]
        line = f"{load}, neighbour {'yes' if bg else 'no'}: deferred SLO {d['slo']:.0%}"
        if "inference alone" in cell:
            line += f" (inference alone {cell['inference alone']['slo']:.0%})"
        line += "; baselines with better attainment: " + (", ".join(worst) or "none")
        for k in engine:
            line += f"; /{k} {d['train_tokens_per_s'] / cell[k]['train_tokens_per_s']:.2f}x"
        for t in twoprocs:
            if t.name in cell and cell[t.name]["train_tokens_per_s"]:
                line += f"; /{t.name} {d['train_tokens_per_s'] / cell[t.name]['train_tokens_per_s']:.2f}x"
                line += f" (its SLO {cell[t.name]['slo']:.0%})"
        if cell.get("deferred fp32", {}).get("train_tokens_per_s"):
            f32 = cell["deferred fp32"]
            line += (
                f"; deferred auto / fp32 {d['train_tokens_per_s'] / f32['train_tokens_per_s']:.2f}x"
                f" (fp32 SLO {f32['slo']:.0%})"
            )
        print(line)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "twoproc.json").write_text(
        json.dumps(
            {
                "gaps": gaps,
                "duration": args.duration,
                "rounds": args.rounds,
                "rows": rows,
                "headers": headers,
            },
            indent=1,
        )
    )
    path = OUT / "twoproc.png"
    plot(path, runs)
    print(f"\nplot: {path}")
    for load in args.loads:
        timelines = {k[2]: v for k, v in runs.items() if k[0] == load and k[1] == 0}
        timelines = {k: v for k, v in timelines.items() if v["timeline"]}
        if timelines:
            coserve.plot(OUT / f"twoproc-timeline-{load}.png", timelines, args.duration)
            print(f"timeline: {OUT / f'twoproc-timeline-{load}.png'}")


def plot(path: Path, runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted(
        {k[:2] for k in runs if k[0] != "-"}, key=lambda c: (list(LOADS).index(c[0]), c[1])
    )
    setups = [
        s
        for s in dict.fromkeys(k[2] for k in runs)
        if s not in ("training alone", "inference alone")
    ]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cells)), 4))
    width = 0.8 / max(len(setups), 1)
    for j, setup in enumerate(setups):
        xs, ys, labels = [], [], []
        for i, cell in enumerate(cells):
            r = runs.get((*cell, setup))
            if r:
                xs.append(i + j * width)
                ys.append(r["train_tokens_per_s"])
                labels.append(f"{r['slo']:.0%}")
        bars = ax.bar(xs, ys, width, label=setup)
        for b, label in zip(bars, labels):
            ax.text(
                b.get_x() + b.get_width() / 2,
                b.get_height(),
                label,
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90,
            )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))])
    ax.set_xticklabels([f"{load}\n{'neighbour' if bg else 'quiet'}" for load, bg in cells])
    ax.set_ylabel("training tokens/s (label: SLO met)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
