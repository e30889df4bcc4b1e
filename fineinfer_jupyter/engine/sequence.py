"""One inference request: its tokens, timings and the stream its caller reads."""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable, Iterator
from enum import Enum, auto

from .config import SamplingParams, Slo

_ids = itertools.count(1)


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class RequestError(RuntimeError):
    """A request failed while running; the engine and the other requests go on."""


class RequestStream:
    """What a caller reads: {"type": "delta"} events, then one "done" or "error" event.

    Iterate it from any thread (events are queued), or pass `callback` to receive each event
    in the engine thread as it happens (the server bridges that to asyncio).
    """

    def __init__(self, request_id: str, callback: Callable[[dict], None] | None = None):
        self.id = request_id
        self.final: dict | None = None
        self._callback = callback
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.cancel: Callable[[], None] = lambda: None  # set by the engine

    def put(self, event: dict) -> None:
        if event["type"] != "delta":
            self.final = event
        if self._callback is not None:
            self._callback(event)
        else:
            self._queue.put(event)

    def __iter__(self) -> Iterator[dict]:
        while True:
            event = self._queue.get()
            yield event
            if event["type"] != "delta":
                return

    def result(self) -> Completion:
        text = "".join(e["text"] for e in self if e["type"] == "delta")
        final = self.final or {}
        if final.get("type") == "error":
            raise RequestError(final["message"])
        return Completion(text, final)


class Completion:
    """The blocking result: the whole text plus the final event's fields."""

    def __init__(self, text: str, final: dict):
        self.text = text
        self.finish_reason: str = final.get("finish_reason", "")
        self.usage: dict = final.get("usage", {})
        self.stats: dict = final.get("stats", {})
        self.token_ids: list[int] = final.get("token_ids", [])

    def __repr__(self) -> str:
        return f"Completion({self.text!r}, finish_reason={self.finish_reason!r})"


class Sequence:
    def __init__(
        self,
        prompt_ids: list[int],
        *,
        sampling: SamplingParams,
        slo: Slo,
        adapter: str | None = None,
        stream: RequestStream | None = None,
        max_context: int = 2048,
    ):
        self.request_id = f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.sampling = sampling
        self.slo = slo
        self.adapter = (
            adapter  # PEFT adapter name (a snapshot while its adapter trains), None = base
        )
        self.adapter_label = adapter  # what the caller asked for, for stats
        self.stream = stream or RequestStream(self.request_id)
        self.max_context = max_context
        self.status = Status.WAITING
        self.arrival = time.monotonic()
        self.admitted: float | None = None  # prefill start
        self.slack_at_admission: float | None = None  # seconds left before the TTFT target
        self.token_times: list[float] = []
        self.finish_reason: str | None = None
        self.cancelled = False  # set from any thread
        self.generator = None  # torch.Generator, made by the runner
        self.text = ""  # decoded output so far
        self.sent = 0  # characters of text already streamed

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def ttft_deadline(self) -> float:
        return self.arrival + self.slo.ttft

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def update_text(self, text: str, *, eos: bool) -> str:
        """Take the decoded text after a new token; set finish_reason when a stop condition
        holds; return the part of the text that can be streamed now. Holds back the start of a
        stop string and an incomplete UTF-8 character until they resolve."""
        p = self.sampling
        if eos and not p.ignore_eos:
            self.finish_reason = "eos"
        self.text, hold = text, 0
        for stop in p.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.finish_reason = text[:at], "stop"
                break
            hold = max(hold, _partial_suffix(text, stop))
        if self.finish_reason is None:
            if len(self.output_ids) >= p.max_new_tokens:
                self.finish_reason = "length"
            elif self.num_tokens >= self.max_context:
                self.finish_reason = "context"
        end = len(self.text)
        if not self.finish_reason:
            end = min(end - hold, len(self.text.rstrip("\ufffd")))
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def stats(self) -> dict:
        first = self.token_times[0] if self.token_times else None
        end = self.token_times[-1] if self.token_times else time.monotonic()
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        decode_time = end - first if first is not None else 0.0
        return {
            "ttft": None if first is None else first - self.arrival,
            "tpot_mean": sum(gaps) / len(gaps) if gaps else None,
            "tpot_max": max(gaps) if gaps else None,
            "tokens_per_s": len(gaps) / decode_time if gaps and decode_time > 0 else None,
            "deferred": None if self.admitted is None else self.admitted - self.arrival,
            "slack_at_admission": self.slack_at_admission,
            "slo": {"ttft": self.slo.ttft, "tpot": self.slo.tpot},
            "total": end - self.arrival,
            "adapter": self.adapter_label,
        }

    def final_event(self) -> dict:
        return {
            "type": "done",
            "id": self.request_id,
            "finish_reason": self.finish_reason,
            "token_ids": list(self.output_ids),
            "usage": {
                "prompt_tokens": self.num_prompt_tokens,
                "completion_tokens": len(self.output_ids),
            },
            "stats": self.stats(),
        }


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop` (held back while streaming)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
