"""The running decode batch's tensors: its rows' left-padded KV cache and attention mask.

The executor owns it; the scheduler decides who is in the batch, and the executor keeps these
rows equal to that list (align). Rows join after their own prefill and leave the moment they
finish. Caches are right-aligned: every row's newest token sits in the last column, shorter
rows are padded on the left and masked out.
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
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., start:, :]
                layer.values = layer.values[..., start:, :]
            self.mask = self.mask[:, start:]


def _left_pad(cache: DynamicCache, n: int) -> None:
    for layer in cache.layers:
        layer.keys = F.pad(layer.keys, (0, 0, n, 0))
        layer.values = F.pad(layer.values, (0, 0, n, 0))
