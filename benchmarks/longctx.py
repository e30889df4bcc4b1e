"""Long contexts: chunked prefill and the prefix cache, each on vs off, in one run.

(a) a long prompt (~3,000 words) arrives while N answers stream: the streams' longest gap
    between two tokens and their gap p99, and the long prompt's TTFT, chunked prefill on vs off;
(b) an 8-turn chat whose history grows to thousands of tokens: TTFT per turn, prefix cache on
    vs off (each turn's prompt is sent twice, once each way, with the same history);
(c) (a) again while a LoRA job trains: training tokens/s over the window and the share of
    requests that met both targets, chunked prefill on vs off (about 3 minutes on a quiet
    machine with --parts c --rounds 2 --stream-tokens 150);
(d) (b) again while the job trains (prefix cache on vs off, training tokens/s per turn).
On and off run interleaved in the same engine (one process, the same model), so the machine's
noise hits both alike. Prints tables, saves a plot.

    python benchmarks/longctx.py [--model default] [--streams 3] [--words 3000] [--rounds 2]
        [--parts a,b,c,d]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, TOPICS, table  # noqa: E402
from coserve import train_tokens_in  # noqa: E402

from fineinfer_jupyter.engine import Engine, EngineConfig, Slo, TrainParams  # noqa: E402
from fineinfer_jupyter.engine.costmodel import prefill_units  # noqa: E402

DATA = Path(__file__).parent.parent / "notebooks" / "data" / "herbology.jsonl"


def essay(words: int, seed: int = 0) -> str:
    """About `words` words of plain prose (a different text per seed, so no prefix repeats)."""
    sentences = [
        f"Section {seed}.{i}: {TOPICS[(i + seed) % len(TOPICS)]} is a subject that rewards a "
        f"careful reader, and note {i} adds one more detail to what came before it."
        for i in range(words // 25 + 1)
    ]
    return " ".join(sentences)


def gaps(times: list[float], since: float, until: float) -> list[float]:
    return [b - a for a, b in zip(times, times[1:]) if b >= since and a <= until]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def long_prompt_window(engine: Engine, args, seed: int) -> dict:
    """N streams start; once they stream, the long prompt arrives; until its first token."""
    slo = engine.core.slo
    streams = [
        engine.generate(
            f"Write a long story about {TOPICS[i]}.", max_new_tokens=args.stream_tokens,
            ignore_eos=True,
        )
        for i in range(args.streams)
    ]  # fmt: skip
    time.sleep(2.0)
    long = engine.generate(
        "Summarize this text in one line.\n\n" + essay(args.words, seed), max_new_tokens=4
    )
    done = long.result()
    results = [s.result() for s in streams]
    arrival, first = TIMES[long.id][0] - done.stats["ttft"], TIMES[long.id][0]
    g = [x for s in streams for x in gaps(TIMES[s.id], arrival, first)]
    met = [
        r.stats["ttft"] <= slo.ttft and (r.stats["tpot_mean"] or 0) <= slo.tpot
        for r in results + [done]
    ]
    return {
        "longest_gap": max(g, default=float("nan")),
        "gap_p99": pct(g, 0.99),
        "long_ttft": done.stats["ttft"],
        "prompt_tokens": done.usage["prompt_tokens"],
        "chunks": done.stats["prefill_chunks"],
        "note": done.stats["note"],
        "estimate": ESTIMATES.get(long.id),
        "met": sum(met) / len(met),
    }


TIMES: dict[str, list[float]] = {}
ESTIMATES: dict[str, float] = {}  # a request's one-pass prefill estimate at its admission


def record_estimates(engine: Engine) -> None:
    """Keep the cost model's bare estimate of each request's prefill in one pass, as the
    scheduler saw it when it admitted the request (the note shows it only when late)."""
    sched = engine.core.scheduler
    schedule = sched.schedule

    def _schedule(now, training=None):
        out = schedule(now, training)
        c = sched.costs
        for seq in out.admitted:
            if seq.request_id not in ESTIMATES:
                ESTIMATES[seq.request_id] = c.prefill(prefill_units([seq], c.span))
        return out

    sched.schedule = _schedule


def record_token_times(engine: Engine) -> None:
    """Keep each request's token times (the done event has only summaries)."""
    executor = engine.core.executor
    end = executor._end

    def _end(seq, result=None):
        TIMES[seq.request_id] = list(seq.token_times)
        return end(seq, result)

    executor._end = _end


def part_a(engine: Engine, args, label: str, train=None, base: int = 0) -> dict:
    rows = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in ("on", "off"):  # interleaved: the machine's noise hits both alike
            engine.core.scheduler.chunked = mode == "on"
            rate = Rate(train, engine)
            w = long_prompt_window(engine, args, seed=base + 100 * r + (mode == "on"))
            w["train_tps"], w["train_tps_counted"] = rate(), rate.counted
            rows[mode].append(w)
            print(f"  {label} round {r + 1} chunking {mode}: {w}", flush=True)
    engine.core.scheduler.chunked = True
    return rows


def chat_turn(engine: Engine, messages: list[dict], n: int):
    return engine.generate(messages, max_new_tokens=n, ignore_eos=True).result()


def part_b(engine: Engine, args, train=None, seed: int = 1000) -> list[dict]:
    prefix = engine.core.executor.prefix
    budget, messages, out = prefix.budget, [], []
    for turn in range(1, args.turns + 1):
        messages.append(
            {"role": "user", "content": essay(args.turn_words, seed + turn) + " What do you think?"}
        )
        rate = Rate(train, engine)
        on = chat_turn(engine, messages, args.answer_tokens)  # the cache has turns 1 .. n-1
        tps_on, rate = rate(), Rate(train, engine)
        prefix.budget = 0  # off: no lookup, nothing kept
        off = chat_turn(engine, messages, args.answer_tokens)
        prefix.budget = budget
        tps_off = rate()
        messages.append({"role": "assistant", "content": on.text})
        row = {
            "turn": turn,
            "prompt_tokens": on.usage["prompt_tokens"],
            "cached": on.usage["prompt_tokens_details"]["cached_tokens"],
            "ttft_on": on.stats["ttft"],
            "ttft_off": off.stats["ttft"],
            "train_tps_on": tps_on,
            "train_tps_off": tps_off,
        }
        out.append(row)
        print(f"  chat turn {turn}: {row}", flush=True)
    return out


class Rate:
    """Training tokens/s from now until called: the seconds of training in the window (the
    engine's timeline) times the rate of the micro-steps it saw end (coserve.train_tokens_in).
    Counting the micro-steps that end inside the window (`counted`) is off by up to a
    micro-step at each end: ~400 tokens, +-10% of a 30 s window's training on a quiet machine."""

    def __init__(self, job, engine=None):
        self.job, self.engine, self.wall = job, engine, time.time()
        self.tokens, self.start = job.tokens_done if job else 0, time.monotonic()
        self.counted = None

    def __call__(self) -> float | None:
        if self.job is None:
            return None
        seconds = time.monotonic() - self.start
        self.counted = (self.job.tokens_done - self.tokens) / seconds
        if self.engine is None:
            return self.counted
        steps = list(self.engine.metrics.timeline)
        return train_tokens_in(steps, self.wall, self.wall + seconds) / seconds


def summarize_a(rows: dict) -> list[list]:
    out = []
    for mode in ("on", "off"):
        ws = rows[mode]
        tps = [w["train_tps"] for w in ws if w["train_tps"] is not None]
        out.append(
            [
                f"chunking {mode}",
                ws[0]["prompt_tokens"],
                max(w["longest_gap"] for w in ws),
                max(w["gap_p99"] for w in ws),
                sum(w["long_ttft"] for w in ws) / len(ws),
                sum(w["chunks"] for w in ws) / len(ws),
                sum(w["met"] for w in ws) / len(ws),
                sum(tps) / len(tps) if tps else "-",
                sum(w["estimate"] or 0 for w in ws) / len(ws),
            ]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--stream-tokens", type=int, default=400)
    ap.add_argument("--words", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--turn-words", type=int, default=250)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--parts", default="a,b,c,d")
    args = ap.parse_args()
    slo = Slo(ttft=3.0, tpot=0.2)
    engine = Engine(
        EngineConfig(
            model=args.model, data_dir=tempfile.mkdtemp(), slo=slo, max_new_tokens_cap=4096
        )
    )
    record_token_times(engine)
    record_estimates(engine)
    engine.metrics.timeline = deque(maxlen=20_000)  # every iteration of a window (Rate)
    parts = args.parts.split(",")
    print(
        f"model {args.model}, targets TTFT {slo.ttft} s / TPOT {slo.tpot} s; prefix cache "
        f"{engine.core.executor.prefix.budget / 2**20:.0f} MiB; on and off interleaved",
        flush=True,
    )
    headers = [
        "", "prompt tokens", "streams' longest gap (s)", "gap p99 (s)",
        "long prompt TTFT (s)", "chunks", "requests on target", "training tokens/s",
        "one-pass estimate at admission (s)",
    ]  # fmt: skip
    report, chats = [], {}
    try:
        if "a" in parts:
            rows = part_a(engine, args, "(a)")
            report.append(
                "(a) a long prompt during running streams\n" + table(headers, summarize_a(rows))
            )
        if "b" in parts:
            chat = chats["chat"] = part_b(engine, args)
            report.append("(b) 8-turn chat, TTFT per turn\n" + chat_table(chat))
        if "c" in parts or "d" in parts:
            params = TrainParams(
                r=16, lora_alpha=32, batch_size=8, micro_batch_size=4, max_length=128,
                max_steps=100_000, checkpoint_every=100_000,
            )  # fmt: skip
            job = engine.core.trainer.jobs[engine.tune("bench", str(DATA), params)["id"]]
            while job.step < 1:
                time.sleep(0.05)
            if "c" in parts:
                rows = part_a(engine, args, "(c)", train=job, base=5000)  # (not a's: cached)
                report.append("(c) (a) while a job trains\n" + table(headers, summarize_a(rows)))
            if "d" in parts:
                chat = chats["chat while a job trains"] = part_b(engine, args, train=job, seed=2000)
                report.append("(d) the chat while a job trains\n" + chat_table(chat, train=True))
            engine.stop_job(job.id)
    finally:
        engine.shutdown()
    print("\n\n".join(report))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "longctx.md").write_text("\n\n".join(report) + "\n")
    if chats:
        plot(OUT / "longctx.png", chats)


def plot(path: Path, chats: dict[str, list[dict]]) -> None:
    """TTFT per chat turn, prefix cache on vs off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(chats), figsize=(6 * len(chats), 3.5), squeeze=False)
    for ax, (title, chat) in zip(axes[0], chats.items()):
        turns = [c["turn"] for c in chat]
        ax.plot(turns, [c["ttft_off"] for c in chat], "o-", label="cache off")
        ax.plot(turns, [c["ttft_on"] for c in chat], "o-", label="cache on")
        ax.set_title(title)
        ax.set_xlabel("turn")
        ax.set_ylabel("TTFT (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def chat_table(chat: list[dict], train: bool = False) -> str:
    headers = [
        "turn",
        "prompt tokens",
        "cached",
        "TTFT cache on (s)",
        "TTFT cache off (s)",
        "speed-up",
    ]
    rows = [
        [
            c["turn"],
            c["prompt_tokens"],
            c["cached"],
            c["ttft_on"],
            c["ttft_off"],
            c["ttft_off"] / c["ttft_on"],
        ]
        for c in chat
    ]
    if train:
        headers += ["training tokens/s, cache on", "cache off"]
        for row, c in zip(rows, chat):
            row += [c["train_tps_on"], c["train_tps_off"]]
    return table(headers, rows)


if __name__ == "__main__":
    main()
