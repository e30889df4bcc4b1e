"""The running decode batch's tensors: its rows' left-padded KV cache and attention mask.

The executor owns it; the scheduler decides who is in the batch, and the executor keeps these
rows equal to that list (align). Rows join after their own prefill and leave the moment they
finish. Caches are right-aligned: every row's newest token sits in the last column, shorter
rows are padded on the left and masked out.

Every cache layer has seen the mask's columns: a full-attention layer keeps them all (its keys
are as wide as the mask), a sliding-window layer (transformers' DynamicSlidingWindowLayer) counts
them in `cumulative_length` and keeps only the last `sliding_window - 1`. Padding a row on the
left or trimming columns changes each layer by what it keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .sequence import Sequence


class Batch:
    def __init__(self):
        self.seqs: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L], 1 = real token

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add prefilled rows (their own cache and mask [len(seqs), P], left-padded)."""
        if not self.seqs:
            self.seqs, self.cache, self.mask = list(seqs), cache, mask
            return
        n = mask.shape[1] - self.length
        if n > 0:
            _left_pad(self.cache, n)
            self.mask = F.pad(self.mask, (n, 0))
        elif n < 0:
            _left_pad(cache, -n)
            mask = F.pad(mask, (-n, 0))
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, mask])
        self.seqs.extend(seqs)

    def grow(self) -> torch.Tensor:
        """Open a column for the tokens about to be decoded; returns the mask for the forward."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask

    def align(self, seqs: list[Sequence]) -> None:
        """Make the rows exactly `seqs`, in that order (each must have a row already)."""
        index = {id(s): i for i, s in enumerate(self.seqs)}
        missing = [s.request_id for s in seqs if id(s) not in index]
        if missing:
            raise RuntimeError(f"no KV cache rows for {', '.join(missing)}")
        self.keep([index[id(s)] for s in seqs])

    def drop(self, seq: Sequence) -> None:
        self.keep([i for i, s in enumerate(self.seqs) if s is not seq])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, in that order (finished and cancelled rows leave), then trim
        all-padding columns."""
        if rows == list(range(len(self.seqs))):
            return
        if not rows:
            self.seqs, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.seqs = [self.seqs[i] for i in rows]
        start = int(self.mask.any(0).int().argmax())
        if start > 0:
            _drop_left(self.cache, start)
            self.mask = self.mask[:, start:]

    def mark(self) -> tuple:
        """What `rewind` needs to undo a pass that fails half-way: the width of each full layer,
        a reference to each sliding layer's keys (a window's worth: it drops its oldest column
        when it grows, and its update makes new tensors)."""
        layers = [
            (x.keys, x.values, x.cumulative_length)
            if getattr(x, "is_sliding", False)
            else x.keys.shape[-2]
            for x in self.cache.layers
        ]
        return self.length, layers

    def rewind(self, mark: tuple) -> None:
        columns, layers = mark
        self.mask = self.mask[:, :columns]
        for layer, kept in zip(self.cache.layers, layers, strict=True):
            if isinstance(kept, tuple):
                layer.keys, layer.values, layer.cumulative_length = kept
            else:
                layer.keys, layer.values = layer.keys[..., :kept, :], layer.values[..., :kept, :]


def _left_pad(cache: DynamicCache, n: int) -> None:
    """n more columns of padding on the left of every row."""
    for layer in cache.layers:
        pad = n
        if getattr(layer, "is_sliding", False):
            layer.cumulative_length += n
            pad = min(n, max(layer.sliding_window - 1 - layer.keys.shape[-2], 0))
        layer.keys = F.pad(layer.keys, (0, 0, pad, 0))
        layer.values = F.pad(layer.values, (0, 0, pad, 0))


def _drop_left(cache: DynamicCache, n: int) -> None:
    """The first n columns leave (all padding)."""
    for layer in cache.layers:
        gone = n
        if getattr(layer, "is_sliding", False):
            gone = max(n - (layer.cumulative_length - layer.keys.shape[-2]), 0)  # not kept anyway
            layer.cumulative_length -= n
        layer.keys = layer.keys[..., gone:, :]
        layer.values = layer.values[..., gone:, :]
