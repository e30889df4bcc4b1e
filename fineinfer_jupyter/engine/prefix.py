"""The prefix cache: the KV of finished requests, kept by token prefix, so that a request
that starts with tokens already seen (a chat resending its history, a shared system prompt)
prefills only the rest (docs/design.md, "The prefix cache").

An entry is one request's tokens (its prompt and answer, less the last token, which has no KV
yet) with their KV cache, under the adapter its rows ran: None (the base model), an adapter's
name, or a snapshot "<name>@<step>" (an adapter changes the KV; a snapshot's weights never
change). Entries live where the KV was made (the device, with offload too), within a byte
budget, least recently used out first. When an adapter's weights change (a training step, a
load under its name, a restore, a delete), its entries go; a snapshot's go when it is unloaded.
The executor owns it, on the engine thread.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

MIN_HIT = 16  # tokens: a shorter common prefix is not worth a pass of its own
DEFAULT_SHARE = 8  # with no setting: an eighth of the device's free memory ...
DEFAULT_MOST = 2 << 30  # ... and at most 2 GiB


def default_budget(device: torch.device) -> int:
    """Bytes of KV the prefix cache keeps when the setting does not say (at engine start)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(min(free // DEFAULT_SHARE, DEFAULT_MOST))


@dataclass
class Entry:
    owner: str | None
    tokens: torch.Tensor  # [T] on the CPU, to compare prompts with
    keys: list[torch.Tensor]  # per layer [1, kv_heads, T, head_dim]
    values: list[torch.Tensor]
    bytes: int


class PrefixCache:
    def __init__(self, budget: int, config=None):
        self.budget = budget  # bytes of KV kept at most (0: off)
        self.config = config  # the model's: a hit's cache has its layer kinds (sliding windows)
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._ids = 0
        self.bytes = 0
        self.lookups = self.hits = self.tokens_saved = 0

    def lookup(self, owner: str | None, prompt: list[int]) -> tuple[int, DynamicCache | None]:
        """The longest prefix of `prompt` (less its last token, which must run to give the
        first token's logits) whose KV is kept for `owner`: (tokens, a one-row cache of them),
        or (0, None)."""
        if not self.budget:
            return 0, None
        self.lookups += 1
        ids = torch.tensor(prompt[:-1], dtype=torch.long)
        best, best_n = None, 0
        for key, e in self.entries.items():
            if e.owner != owner:
                continue
            n = min(len(ids), len(e.tokens))
            differ = (ids[:n] != e.tokens[:n]).nonzero()
            common = int(differ[0]) if len(differ) else n
            if common > best_n:
                best, best_n = key, common
        if best is None or best_n < MIN_HIT:
            return 0, None
        self.entries.move_to_end(best)
        e = self.entries[best]
        cache = DynamicCache(config=self.config) if self.config is not None else DynamicCache()
        for i, (k, v) in enumerate(zip(e.keys, e.values, strict=True)):
            cache.update(k[:, :, :best_n].clone(), v[:, :, :best_n].clone(), i)
        self.hits += 1
        self.tokens_saved += best_n
        return best_n, cache

    def store(self, owner: str | None, tokens: list[int], cache: DynamicCache, row: int) -> bool:
        """Keep the KV of `tokens`: the last len(tokens) columns of `row` in `cache` (a batch
        whose rows are right-aligned). False if it cannot be kept: over the budget, or a layer
        keeps fewer columns (a sliding-window layer cannot serve a prefix)."""
        n = len(tokens)
        if not self.budget or n < MIN_HIT:
            return False
        layers = cache.layers
        if any(layer.keys is None or layer.keys.shape[-2] < n for layer in layers):
            return False
        keys = [layer.keys[row : row + 1, :, -n:].clone() for layer in layers]
        values = [layer.values[row : row + 1, :, -n:].clone() for layer in layers]
        size = sum(t.numel() * t.element_size() for t in keys + values)
        if size > self.budget:
            return False
        ids = torch.tensor(tokens, dtype=torch.long)
        for key, e in list(self.entries.items()):  # an entry this one extends is redundant
            if (
                e.owner == owner
                and len(e.tokens) <= n
                and torch.equal(e.tokens, ids[: len(e.tokens)])
            ):
                self._remove(key)
        self._ids += 1
        self.entries[self._ids] = Entry(owner, ids, keys, values, size)
        self.bytes += size
        while self.bytes > self.budget:
            self._remove(next(iter(self.entries)))
        return True

    def invalidate(self, owner: str) -> int:
        """Drop the entries of `owner` (its weights changed); returns how many went."""
        gone = [k for k, e in self.entries.items() if e.owner == owner]
        for key in gone:
            self._remove(key)
        return len(gone)

    def clear(self) -> None:
        for key in list(self.entries):
            self._remove(key)

    def _remove(self, key: int) -> None:
        self.bytes -= self.entries.pop(key).bytes

    def stats(self) -> dict:
        return {
            "budget_bytes": self.budget,
            "bytes": self.bytes,
            "entries": len(self.entries),
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": self.hits / self.lookups if self.lookups else None,
            "tokens_saved": self.tokens_saved,
        }
