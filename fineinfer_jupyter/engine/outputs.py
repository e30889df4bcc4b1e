"""The contract between the scheduler and the executor (docs/design.md, "One iteration").

schedule() -> SchedulerOutput -> Executor.execute() -> IterationResult -> Scheduler.update().
The scheduler decides and owns its queues; the executor runs what it is told, streams, and
reports what happened; only update() changes the queues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from .sequence import Sequence


class IterationKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    TRAIN = "train"
    IDLE = "idle"


@dataclass
class SchedulerOutput:
    """What one engine iteration runs."""

    prefill: list[list[Sequence]] = field(default_factory=list)  # admitted now, in their passes
    decode: list[Sequence] = field(default_factory=list)  # the running batch, in row order
    train_units: int = 0  # units of the training micro-step to run now (0: no training)
    train_examples: int = 0  # examples of a new micro-step (0: the one under way goes on)
    # split mode (worker.py): start the micro-step under way (or a new one of this many
    # examples, 0: the job's own size) on the training worker; unlike train_units, these run
    # beside this iteration, on their own thread, and are not measured for the cost model
    worker_units: int = 0
    worker_examples: int = 0
    # the worker's run in flight stops after the unit it is in (the requests fell behind: the
    # engine thread serves them on every thread; the micro-step resumes later where it stopped)
    worker_hold: bool = False
    # split mode, nothing to serve: train_units belong to a second micro-step that the engine
    # thread runs on one thread beside the worker's (Trainer.work_side), not measured either
    side: bool = False
    # chunked prefill: a request in `prefill` listed here is prefilled up to this prompt
    # position only (its pass has one row; it gets no token yet)
    chunks: dict[Sequence, int] = field(default_factory=dict)
    # an idle iteration that holds the running rows' decode back (split mode's pace,
    # scheduler.PACE): when it falls due (time.monotonic() seconds); the engine thread waits
    # until then unless something arrives
    wake_at: float | None = None

    @property
    def admitted(self) -> list[Sequence]:
        """Every request this iteration prefills (new ones, and chunked ones going on)."""
        return [s for group in self.prefill for s in group]

    @property
    def kind(self) -> IterationKind:
        if self.prefill:
            return IterationKind.PREFILL
        if self.decode:
            return IterationKind.DECODE
        if self.train_units:
            return IterationKind.TRAIN
        return IterationKind.IDLE


class Timing(NamedTuple):
    kind: str  # a cost model line: prefill, decode, train or optimizer
    units: float  # prompt tokens of a pass, rows decoded, padded tokens of a micro-step
    seconds: float


@dataclass
class IterationResult:
    """What the executor did with a SchedulerOutput."""

    timings: list[Timing] = field(default_factory=list)  # measured, for the cost model
    unit_seconds: list[float] = field(default_factory=list)  # of each training unit run
    first_unit: int = 0  # the index of the first of them in its micro-step
    padded: int = 0  # padded tokens of that micro-step
    seconds: float = 0.0  # the whole iteration
