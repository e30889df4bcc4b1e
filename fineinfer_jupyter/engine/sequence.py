"""One inference request inside the engine: its tokens, text, timings and stream."""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto

from . import logprobs
from .config import SamplingParams, Slo
from .request import RequestStream, Tokenizer

_ids = itertools.count(1)
MAX_PENDING = 16  # tokens the detokenizer waits for an incomplete character, at most


class Status(Enum):  # the scheduler's: which queue the request is in
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Detokenizer:
    """Text from a growing list of token ids, a few tokens at a time: each new token decodes
    only the window since the text last advanced (plus the chunk before it, so that decoders
    that treat a leading space or a byte sequence by context see the same context). The cost
    per token stays flat however long the answer gets. Text that ends in an incomplete
    character waits for the next tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.prefix = self.read = 0  # ids[prefix:read]: the chunk last emitted

    def __call__(self, ids: list[int]) -> str:
        decode = self.tokenizer.decode
        before = decode(ids[self.prefix : self.read]) if self.read > self.prefix else ""
        text = decode(ids[self.prefix :])
        stuck = len(ids) - self.read > MAX_PENDING
        if len(text) > len(before) and (not text.endswith("\ufffd") or stuck):
            self.prefix, self.read = self.read, len(ids)
            return text[len(before) :]
        return ""


class Sequence:
    def __init__(
        self,
        prompt_ids: list[int],
        *,
        sampling: SamplingParams,
        slo: Slo,
        adapter: str | None = None,
        stream: RequestStream | None = None,
        tokenizer: Tokenizer | None = None,
        max_context: int = 2048,
    ):
        self.request_id = f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.sampling = sampling
        self.slo = slo
        self.adapter = adapter  # the adapter asked for (None = base)
        self.pinned: str | None = None  # what its rows run: a snapshot while `adapter` trains
        self.stream = stream or RequestStream(self.request_id)
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.max_context = max_context
        self.status = Status.WAITING
        self.arrival = time.monotonic()
        self.admitted: float | None = None  # prefill start
        self.slack_at_admission: float | None = None  # seconds left before the TTFT target
        self.prefilled = 0  # prompt tokens whose KV is computed (chunked prefill, prefix cache)
        self.cached_tokens = 0  # of those, taken from the prefix cache
        self.chunks = 0  # prefill passes its prompt took (more than 1: chunked)
        self.note: str | None = None  # why its first token came late, if the scheduler knew
        self.token_times: list[float] = []
        self.finish_reason: str | None = None  # eos, stop, length, context, cancelled, error
        self.error: str | None = None
        self.generator = None  # torch.Generator, made by the runner
        self.decoded = ""  # the output's text so far
        self.text = ""  # what the caller gets: decoded, cut at a stop string
        self.sent = 0  # characters of text already streamed
        self.logprobs: list = []  # entries of the sampled tokens (logprobs.py), if asked for
        self.logprobs_sent = 0  # entries already streamed
        self.prompt_logprobs: list | None = None  # the prompt's entries (echo), if asked for

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_todo(self) -> int:
        """Prompt tokens still to prefill."""
        return len(self.prompt_ids) - self.prefilled

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
        return self.finish_reason is not None

    @property
    def score_only(self) -> bool:
        return self.sampling.score_only

    def scored(self, now: float) -> None:
        """A score-only request's prefill is done: its answer is the prompt's logprobs."""
        self.token_times.append(now)
        self.finish_reason = "length"

    def append_token(self, token: int, now: float, *, eos: bool) -> str:
        """Take one sampled token: returns the text that can be streamed now, and sets
        finish_reason when a stop condition holds."""
        self.output_ids.append(token)
        self.token_times.append(now)
        delta = self.detokenizer(self.output_ids) if self.detokenizer else ""
        return self.update_text(delta, eos=eos)

    def update_text(self, delta: str, *, eos: bool) -> str:
        """Add newly decoded text; set finish_reason when a stop condition holds; return the
        part of the text that can be streamed now. Holds back the start of a stop string until
        it resolves."""
        p = self.sampling
        if eos and not p.ignore_eos:
            self.finish_reason = "eos"
        self.decoded += delta
        self.text, hold = self.decoded, 0
        for stop in p.stop:
            at = self.decoded.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.finish_reason = self.decoded[:at], "stop"
                break
            hold = max(hold, _partial_suffix(self.decoded, stop))
        if self.finish_reason is None:
            if len(self.output_ids) >= p.max_new_tokens:
                self.finish_reason = "length"
            elif self.num_tokens >= self.max_context:
                self.finish_reason = "context"
        end = len(self.text)
        if not self.finish_reason:
            end = min(end - hold, len(self.text.rstrip("\ufffd")))
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

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
            "prefill_chunks": self.chunks,
            "cached_tokens": self.cached_tokens,
            "note": self.note,
            "slo": {"ttft": self.slo.ttft, "tpot": self.slo.tpot},
            "total": end - self.arrival,
            "adapter": self.adapter,
        }

    def final_event(self) -> dict:
        if self.finish_reason == "error":
            return {"type": "error", "id": self.request_id, "message": self.error}
        return {
            "type": "done",
            "id": self.request_id,
            "finish_reason": self.finish_reason,
            "token_ids": list(self.output_ids),
            "usage": {
                "prompt_tokens": self.num_prompt_tokens,
                "completion_tokens": len(self.output_ids),
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            },
            "stats": self.stats(),
            **self.logprob_fields(),
        }

    def logprob_fields(self) -> dict:
        """The logprobs asked for, with each token's text (for the final event)."""
        text = self.detokenizer.tokenizer.token_text if self.detokenizer else str
        out = {}
        if self.sampling.logprobs is not None:
            out["logprobs"] = logprobs.as_json(self.logprobs, text)
        return out

    def echo_event(self) -> dict:
        """The prompt's logprobs (and text), as a delta event without new text: the first event
        of a request that asked for them."""
        text = self.detokenizer.tokenizer if self.detokenizer else None
        return {
            "type": "delta",
            "text": "",
            "prompt_text": text.decode(self.prompt_ids) if text else "",
            "prompt_logprobs": logprobs.as_json(
                self.prompt_logprobs, text.token_text if text else str
            ),
        }

    def take_logprobs(self) -> list[dict]:
        """Entries not yet streamed (they go out with a delta event)."""
        text = self.detokenizer.tokenizer.token_text if self.detokenizer else str
        new = self.logprobs[self.logprobs_sent :]
        self.logprobs_sent = len(self.logprobs)
        return logprobs.as_json(new, text)


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop` (held back while streaming)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
