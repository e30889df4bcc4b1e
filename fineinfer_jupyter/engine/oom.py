"""Out of memory in an iteration: fewer rows and the same work again, or a clear failure.

A prefill pass that runs out of memory is split in two (down to one row, which then fails);
a decode drops its longest row and runs again; a training micro-step runs its effective batch
again with half as many examples at a time (training.py). On a CPU torch reports a failed
allocation as a RuntimeError, on a GPU as torch.OutOfMemoryError.
"""

from __future__ import annotations

import gc

import torch

from .batch import Batch
from .sequence import Sequence


class OutOfMemory(MemoryError):
    """A request that does not fit in memory, alone or next to the others."""


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halves(group: list[Sequence]) -> list[list[Sequence]]:
    mid = len(group) // 2
    return [group[:mid], group[mid:]]


def too_big(seq: Sequence, error: BaseException) -> OutOfMemory:
    what = "its prompt" if not seq.output_ids else "its context"
    return OutOfMemory(
        f"out of memory: {what} of {seq.num_tokens} tokens does not fit next to the requests "
        f"in flight ({str(error).splitlines()[0][:120]})"
    )


def decode_fitting(
    runner, batch: Batch, seqs: list[Sequence], fail, also=None
) -> tuple[object, list]:
    """runner.decode(batch, also); when it runs out of memory, the cache is put back as it was,
    the longest row fails (`fail(seq, error)`) and leaves, and the rest decode again. Returns
    the logits and the rows they are for."""
    while True:
        mark = batch.mark()
        try:
            return runner.decode(batch, also), seqs
        except Exception as e:
            if not is_oom(e) or len(seqs) == 1:
                raise
            batch.rewind(mark)
            free_memory()
            i = max(range(len(seqs)), key=lambda j: seqs[j].num_tokens)
            fail(seqs[i], too_big(seqs[i], e))
            seqs = seqs[:i] + seqs[i + 1 :]
            batch.keep([j for j in range(len(batch.seqs)) if j != i])
