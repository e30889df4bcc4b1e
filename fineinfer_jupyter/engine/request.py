"""What a caller hands the engine and gets back: prompts (checked and encoded here, the one
place for their rules), the stream of events, the blocking result."""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Iterator

from .config import check

ROLES = ("system", "user", "assistant", "tool")


class Tokenizer:
    """The model's tokenizer, shared by callers' threads (encoding prompts, building data sets)
    and the engine thread (decoding answers). A fast tokenizer must not be used from two
    threads at once, so every use holds the lock, and only briefly: an answer is decoded a few
    tokens at a time (sequence.Detokenizer) and a data set tokenizes with its own copy."""

    def __init__(self, hf, eos_ids: set[int]):
        self.hf = hf
        self.eos_ids = eos_ids
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        self._lock = threading.Lock()
        self._texts: dict[int, str] = {}  # token_text's

    @property
    def has_chat_template(self) -> bool:
        return self.hf.chat_template is not None

    def encode(self, prompt: str | list[dict] | list[int]) -> list[int]:
        """Token ids of a text prompt, or of chat messages rendered with the chat template (and
        the assistant's turn opened); token ids are taken as they are (the caller checks them).
        Bad input raises ValueError naming the field."""
        if is_token_ids(prompt):
            return list(prompt)
        if isinstance(prompt, str):
            check(prompt != "", "prompt", "must not be empty")
            with self._lock:
                return list(self.hf(prompt, add_special_tokens=False)["input_ids"])
        check_messages(prompt)
        check(self.has_chat_template, "messages", "this model has no chat template; send a prompt")
        with self._lock:
            ids = self.hf.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.hf.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's text, special tokens included (for logprobs); cached."""
        text = self._texts.get(token)
        if text is None:
            with self._lock:
                text = self.hf.decode([token], skip_special_tokens=False)
            self._texts[token] = text
        return text

    def copy(self):
        """A private copy of the HF tokenizer, for long work off the engine thread."""
        with self._lock:
            return copy.deepcopy(self.hf)


def is_token_ids(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and all(type(t) is int for t in prompt)


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    check(bad is None, "prompt", f"token id {bad} is not in the vocabulary (0 to {vocab_size - 1})")


def check_messages(messages) -> None:
    check(
        isinstance(messages, list) and len(messages) > 0,
        "messages",
        "must be a non-empty list of {role, content}",
    )
    for i, m in enumerate(messages):
        check(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str),
            f"messages[{i}]",
            "must be {role: str, content: str}",
        )
        check(m["role"] in ROLES, f"messages[{i}].role", f"unknown role {m['role']!r}")


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
