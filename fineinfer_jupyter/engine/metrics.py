"""Counters, per-second series and a ring of recent iterations; snapshot() -> a JSON-ready dict.

Written by the engine thread, read by any (snapshot takes the lock)."""

from __future__ import annotations

import os
import threading
import time
from collections import deque

import psutil

SERIES_SECONDS = 300
TIMELINE_ITERATIONS = 200
KINDS = ("prefill", "decode", "train", "idle")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._process = psutil.Process(os.getpid())
        self.start = time.time()
        self.iteration_kind = "idle"
        self.iteration_started_at = self.start
        self.timeline: deque[dict] = deque(maxlen=TIMELINE_ITERATIONS)
        self.busy = dict.fromkeys(KINDS, 0.0)
        self.requests = {"finished": 0, "failed": 0, "cancelled": 0}
        self.waiting = self.running = 0
        self.slack: float | None = None
        self.prefix: dict = {}  # the prefix cache's figures (PrefixCache.stats), each iteration
        self.ttfts: deque[float] = deque(maxlen=1000)
        self.tpots: deque[float] = deque(maxlen=1000)
        self.slo_met = {"ttft": [0, 0], "tpot": [0, 0]}  # [met, total]
        self.training: dict = {"job": None, "loss": None, "step": None, "total_steps": None}
        self.offload: dict | None = None  # offload.LayerOffload.describe(), None: no offload
        self.offload_bytes = self.offload_fetches = self.offload_shared = 0
        self.offload_by_source: dict[str, int] = {}
        self.offload_by_kind: dict[str, int] = {}
        self.device_bytes = 0
        self._buckets: deque[dict] = deque(maxlen=SERIES_SECONDS)

    def _bucket(self, now: float) -> dict:
        second = int(now)
        if not self._buckets or self._buckets[-1]["t"] != second:
            self._buckets.append(
                {
                    "t": second,
                    "tokens": 0,
                    "samples": 0,
                    "train_tokens": 0,
                    "loss": None,
                    "slack": None,
                    "offload": 0,
                }
            )
        return self._buckets[-1]

    def iteration_started(self, kind: str) -> None:
        self.iteration_kind, self.iteration_started_at = kind, time.time()

    def record_iteration(
        self, kind: str, duration: float, *, rows: int = 0, tokens: int = 0, train: float = 0.0
    ) -> None:
        """`train`: seconds of it spent on training units that rode along an inference pass."""
        now = time.time()
        with self._lock:
            self.busy[kind] += duration - train
            self.busy["train"] += train
            if kind != "idle":
                self.timeline.append(
                    {
                        "kind": kind,
                        "start": now - duration,
                        "duration": duration,
                        "rows": rows,
                        "tokens": tokens,
                        "train": train,  # seconds of training units riding along
                    }
                )
            if kind in ("prefill", "decode"):
                self._bucket(now)["tokens"] += rows  # one new token per row
            self.iteration_kind = "idle"

    def record_training(self, *, samples: int, tokens: int, loss: float | None, job: dict) -> None:
        with self._lock:
            b = self._bucket(time.time())
            b["samples"] += samples
            b["train_tokens"] += tokens
            if loss is not None:
                b["loss"] = loss
            self.training = job

    def record_offload(self, fetches, *, shared: int = 0) -> None:
        """Layer fetches (offload.Fetch) of one iteration, and the bytes a training unit did
        not fetch because an inference pass had."""
        with self._lock:
            bucket = self._bucket(time.time())
            for f in fetches:
                self.offload_bytes += f.bytes
                bucket["offload"] += f.bytes
                self.offload_by_source[f.source] = self.offload_by_source.get(f.source, 0) + f.bytes
                self.offload_by_kind[f.kind] = self.offload_by_kind.get(f.kind, 0) + f.bytes
                self.offload_fetches += 1
            self.offload_shared += shared

    def record_queue(self, *, waiting: int, running: int, slack: float | None) -> None:
        self.waiting, self.running, self.slack = waiting, running, slack
        if slack is not None:
            with self._lock:
                b = self._bucket(time.time())
                b["slack"] = slack if b["slack"] is None else min(b["slack"], slack)

    def record_request(self, stats: dict, *, outcome: str, slo) -> None:
        with self._lock:
            self.requests[outcome] += 1
            if outcome != "finished" or stats.get("ttft") is None:
                return
            self.ttfts.append(stats["ttft"])
            self.slo_met["ttft"][0] += stats["ttft"] <= slo.ttft
            self.slo_met["ttft"][1] += 1
            if stats.get("tpot_mean") is not None:  # the target is a pace: the mean per token
                self.tpots.append(stats["tpot_mean"])
                self.slo_met["tpot"][0] += stats["tpot_mean"] <= slo.tpot
                self.slo_met["tpot"][1] += 1

    def snapshot(self, *, state: str = "ready") -> dict:
        now = time.time()
        with self._lock:
            buckets = [b for b in self._buckets if b["t"] < int(now)]  # whole seconds only
            recent = buckets[-5:]
            span = max(len(recent), 1)
            total = sum(self.busy.values()) or 1.0
            return {
                "time": now,
                "state": state,
                "iteration": {"kind": self.iteration_kind, "started": self.iteration_started_at},
                "requests": {"waiting": self.waiting, "running": self.running, **self.requests},
                "slack": {"min": self.slack},
                "inference": {
                    "tokens_per_s": sum(b["tokens"] for b in recent) / span,
                    "ttft_p50": percentile(list(self.ttfts), 0.5),
                    "ttft_p99": percentile(list(self.ttfts), 0.99),
                    "tpot_p50": percentile(list(self.tpots), 0.5),
                    "tpot_p99": percentile(list(self.tpots), 0.99),
                    "slo": {k: (m / n if n else None) for k, (m, n) in self.slo_met.items()},
                },
                "training": {
                    **self.training,
                    "samples_per_s": sum(b["samples"] for b in recent) / span,
                    "tokens_per_s": sum(b["train_tokens"] for b in recent) / span,
                },
                "offload": {
                    "enabled": self.offload is not None,
                    **(self.offload or {"mode": "none"}),
                    "bytes_per_s": sum(b["offload"] for b in recent) / span,
                    "bytes_total": self.offload_bytes,
                    "fetches": self.offload_fetches,
                    "by_source": dict(self.offload_by_source),
                    "by_kind": dict(self.offload_by_kind),
                    "shared_bytes": self.offload_shared,
                },
                "prefix_cache": dict(self.prefix),
                "memory": {
                    "rss_bytes": self._process.memory_info().rss,
                    "device_bytes": self.device_bytes,
                },
                "share": {k: v / total for k, v in self.busy.items()},
                "series": {
                    "t": [b["t"] for b in buckets],
                    "inference_tokens_per_s": [b["tokens"] for b in buckets],
                    "train_samples_per_s": [b["samples"] for b in buckets],
                    "loss": [b["loss"] for b in buckets],
                    "slack": [b["slack"] for b in buckets],
                    "offload_bytes_per_s": [b["offload"] for b in buckets],
                },
                "timeline": list(self.timeline),
            }
