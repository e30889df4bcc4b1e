"""Which step runs next: prefill, decode, a training micro-step, or idle. Owns only its queues.

Policies (DESIGN.md "Scheduling"):
- immediate: inference preempts training the moment it arrives.
- exclusive: inference waits until training has ended.
- fineinfer: the prototype's fixed deferral bound; once served, a batch runs until it drains.
- deferred: training runs while every waiting request's time-to-first-token slack and every
  running row's time-per-token room survive the step, with the micro-batch sized to fit.

The time-per-output-token target is a pace: a request's n-th token after its first is due
n * tpot after the first one, so a reader going at 1/tpot tokens a second never waits. Tokens
delivered ahead of that pace bank time that a training step may use, but no pause between two
tokens is planned longer than STALL_TPOTS * tpot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from .batch import Batch
from .costmodel import CostModel
from .sequence import Sequence, Status

INF = float("inf")
STALL_TPOTS = 4.0  # the longest planned pause between two tokens, in units of the tpot target


class StepKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    TRAIN = "train"
    IDLE = "idle"


@dataclass
class Step:
    kind: StepKind
    seqs: list[Sequence] = field(default_factory=list)  # prefill: newcomers; decode: the batch
    train_examples: int = 0  # train: examples in the micro-step (0 = the job's micro_batch_size)
    budget: float = INF  # train: seconds the step may take before inference must run
    wait: float | None = None  # idle: sleep at most this long (None = until woken)


class Training(Protocol):
    active: bool

    def next_tokens(self) -> list[int]:
        """Token counts of the examples left in the job's current effective batch, in order."""

    def max_examples(self) -> int:
        """The job's micro_batch_size: the largest micro-step it allows."""


class Scheduler:
    def __init__(
        self,
        *,
        policy: str = "immediate",
        max_batch_size: int = 32,
        costs: CostModel | None = None,
        max_train_step: float = 1.5,
        fineinfer_bound: float = 2.0,
        min_train_efficiency: float = 0.9,
    ):
        self.policy = policy
        self.max_batch_size = max_batch_size
        self.costs = costs or CostModel()
        self.max_train_step = (
            max_train_step  # seconds: an arrival must not wait longer behind training
        )
        self.fineinfer_bound = fineinfer_bound
        # a micro-step squeezed between requests must train at least this fraction of the
        # tokens/s of a full one; a smaller step wastes more than serving the requests first
        self.min_train_efficiency = min_train_efficiency
        self.headroom = 0.9  # plan to land within 90% of each latency target
        self.waiting: deque[Sequence] = deque()
        self.batch = Batch()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_running(self) -> int:
        return len(self.batch)

    def schedule(self, now: float, training: Training | None = None) -> Step:
        room = self.max_batch_size - len(self.batch)
        newcomers = sorted(self.waiting, key=self.ttft_due)[: max(room, 0)]
        running = self.batch.seqs
        training_active = training is not None and training.active
        if not training_active or self.policy == "immediate":
            return self._serve(newcomers, running, training_active, now)
        if self.policy == "exclusive":
            return Step(StepKind.TRAIN)
        if self.policy == "fineinfer":
            if running or (newcomers and now - newcomers[0].arrival >= self.fineinfer_bound):
                return self._serve(newcomers, running, now=now)
            return Step(StepKind.TRAIN)
        return self._deferred(now, newcomers, running, training)

    def _deferred(
        self, now: float, newcomers: list[Sequence], running: list[Sequence], training: Training
    ) -> Step:
        prefill_slack = self.prefill_slack(now, newcomers, running)
        decode_room = self.decode_room(now, running)
        budget = min(prefill_slack, decode_room, self.max_train_step)
        tokens = training.next_tokens()  # what is left of the effective batch
        most = training.max_examples()
        k = self._fit(tokens, most, budget)
        if len(self.waiting) > len(newcomers):
            k = 0  # the batch is full and requests wait for a row: finish the running ones first
        elif not newcomers and not running:
            k = self._best(tokens, k) if k else 1  # nothing to protect: never starve training
        elif k:
            # the best step these requests could ever leave room for (all the way up to the
            # longest planned pause, or their whole slack): what fits now must be worth it
            ceiling = min(self.max_train_step, self._ceiling(newcomers, running))
            best = self._best(tokens, self._fit(tokens, most, ceiling))
            k = next((j for j in range(k, 0, -1) if self._worth_it(tokens, j, best)), 0)
        if k:
            return Step(StepKind.TRAIN, train_examples=k, budget=budget)
        if newcomers and running:
            c = self.costs
            p = c.margin * c.prefill(newcomers[0].num_prompt_tokens)
            if decode_room < p <= self.room_after_decode(now, running):
                return Step(StepKind.DECODE, list(running))  # the prefill fits right after a token
        return self._serve(newcomers, running, now=now)

    def _group(
        self, now: float, newcomers: list[Sequence], running: list[Sequence]
    ) -> list[Sequence]:
        """Newcomers to prefill in one step, earliest deadline first: as many as fit before the
        running rows need their next token, and before the newcomers whose pass ends first
        need their second one."""
        c, room = self.costs, self.decode_room(now, running)
        group = [newcomers[0]]
        for seq in newcomers[1:]:
            trial = group + [seq]
            passes = [
                c.margin * c.prefill(self.pass_tokens(p)) for p in self.prefill_passes(trial, now)
            ]
            decode = c.margin * c.decode(len(running) + len(trial))
            if sum(passes) > room or sum(passes) - passes[0] + decode > self.headroom * min(
                s.slo.tpot for s in trial
            ):
                break
            group = trial
        return group

    def prefill_passes(
        self, seqs: list[Sequence], now: float | None = None
    ) -> list[list[Sequence]]:
        """Split newcomers (earliest deadline first) into prefill passes. A request joins the
        current pass when one pass is cheaper than two (it saves the fixed cost per call;
        padding to the longest prompt costs per token) and, planned from `now`, the pass still
        ends before every member's first token is due."""
        c, passes, start = self.costs, [], now
        for seq in seqs:
            last = passes[-1] if passes else None
            if last:
                cost = c.prefill(
                    (len(last) + 1)
                    * max(seq.num_prompt_tokens, *(s.num_prompt_tokens for s in last))
                )
                cheaper = cost <= c.prefill(
                    len(last) * max(s.num_prompt_tokens for s in last)
                ) + c.prefill(seq.num_prompt_tokens)
                in_time = start is None or start + c.margin * cost <= min(
                    self.ttft_due(s) for s in last + [seq]
                )
                if cheaper and in_time:
                    last.append(seq)
                    continue
                if start is not None:
                    start += c.margin * c.prefill(
                        len(last) * max(s.num_prompt_tokens for s in last)
                    )
            passes.append([seq])
        return passes

    @staticmethod
    def pass_tokens(group: list[Sequence]) -> int:
        """Tokens a pass computes: every prompt padded to the longest."""
        return len(group) * max(s.num_prompt_tokens for s in group)

    def _step_cost(self, tokens: list[int]) -> float:
        """Estimated seconds of one micro-step on these examples (padded to the longest)."""
        return self.costs.train(len(tokens) * max(tokens)) if tokens else 0.0

    def _fit(self, tokens: list[int], most: int, budget: float) -> int:
        """The largest micro-step of at most `most` of these examples (what is left of the
        effective batch) whose estimated time fits the budget; the step that ends the batch
        also runs the optimizer step."""
        for k in range(min(most, len(tokens)), 0, -1):
            last = self.costs.optimizer if k == len(tokens) else 0.0
            if self.costs.margin * (self._step_cost(tokens[:k]) + last) <= budget:
                return k
        return 0

    def _best(self, tokens: list[int], most: int) -> int:
        """The micro-step of at most `most` examples that trains the most tokens a second."""
        return max(range(1, max(most, 1) + 1), key=lambda k: (self._rate(tokens[:k]), k))

    def _rate(self, tokens: list[int]) -> float:
        """Training tokens/s of one micro-step on these examples."""
        return sum(tokens) / max(self._step_cost(tokens), 1e-9)

    def _worth_it(self, tokens: list[int], k: int, best: int) -> bool:
        """Is a micro-step of the first k examples left in the effective batch worth squeezing
        between requests? It must train at min_train_efficiency of the best step there is
        room for (a step's fixed cost weighs more on small steps; on a CPU large ones can be
        slower per token too), and so must the steps of at most that size that the rest of
        the batch then splits into (a step that leaves a small remainder costs a small step
        later). The batch's own last examples are never held back."""
        floor = self.min_train_efficiency * self._rate(tokens[:best])
        if self._rate(tokens[:k]) < floor:
            return k == len(tokens) <= best
        rest = len(tokens) - k
        if rest == 0:
            return True
        size = rest // -(-rest // best)  # the smallest part when the rest splits evenly
        return self._rate(tokens[k : k + size]) >= floor

    def _ceiling(self, newcomers: list[Sequence], running: list[Sequence]) -> float:
        """The most room for a training step that these requests can leave between their
        tokens: the longest planned pause (or, for a waiting request, its whole first-token
        slack) less the step that must follow it."""
        c, seqs = self.costs, running + newcomers
        d = c.margin * c.decode(len(seqs))
        room = min(self.headroom * STALL_TPOTS * s.slo.tpot - d for s in seqs)
        for s in newcomers:
            room = min(room, self.headroom * s.slo.ttft - c.margin * c.prefill(s.num_prompt_tokens))
        return room

    def prefill_slack(
        self, now: float, newcomers: list[Sequence], running: list[Sequence] = ()
    ) -> float:
        """Seconds the waiting requests can still be deferred and all meet their first-token
        targets: prefilled in the passes the engine would run (each request gets its first
        token at the end of its pass), with the decode steps that rows admitted on the way
        need for their own per-token targets."""
        c, slack, t = self.costs, INF, now
        rows, room = len(running), self.decode_room(now, running)
        for group in self.prefill_passes(newcomers, now):
            p = c.margin * c.prefill(self.pass_tokens(group))
            if rows and p > room:  # the rows need a token before this pass
                d = c.margin * c.decode(rows)
                t, room = t + d, self.headroom * min(r.slo.tpot for r in running + newcomers) - d
            t, room, rows = t + p, room - p, rows + len(group)
            room = min(
                room, self.headroom * min(s.slo.tpot for s in group) - c.margin * c.decode(rows)
            )
            slack = min(slack, min(self.ttft_due(s) for s in group) - t)
        return slack

    def decode_room(self, now: float, running: list[Sequence]) -> float:
        """Seconds before the running rows must decode to keep their per-token target."""
        if not running:
            return INF
        cost = self.costs.margin * self.costs.decode(len(running))
        return min(self.token_due(s) for s in running) - now - cost

    def ttft_due(self, s: Sequence) -> float:
        """When the first token is due, planning with headroom against noise."""
        return s.arrival + self.headroom * s.slo.ttft

    def token_due(self, s: Sequence) -> float:
        """When the next token is due: on the request's pace since its first token, and not
        more than the longest allowed pause after the last one (planning with headroom)."""
        if not s.token_times:
            return self.ttft_due(s) + self.headroom * s.slo.tpot
        return self._due(s, s.token_times[0], s.token_times[-1], len(s.token_times))

    def _due(self, s: Sequence, first: float, last: float, n: int) -> float:
        pace = first + n * self.headroom * s.slo.tpot
        return min(pace, last + self.headroom * STALL_TPOTS * s.slo.tpot)

    def room_after_decode(self, now: float, running: list[Sequence]) -> float:
        """decode_room right after one decode step that starts now."""
        d = self.costs.margin * self.costs.decode(len(running))
        end = now + d
        due = min(
            self._due(s, s.token_times[0] if s.token_times else end, end, len(s.token_times) + 1)
            for s in running
        )
        return due - end - d

    def _serve(
        self,
        newcomers: list[Sequence],
        running: list[Sequence],
        training: bool = False,
        now: float = 0.0,
    ) -> Step:
        if newcomers:
            return Step(StepKind.PREFILL, self._group(now, newcomers, running))
        if running:
            return Step(StepKind.DECODE, list(running))
        return Step(StepKind.TRAIN) if training else Step(StepKind.IDLE)

    def admitted(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = Status.RUNNING

    def drop(self, predicate) -> list[Sequence]:
        """Remove waiting and running rows for which predicate(seq) holds; returns them."""
        gone = [s for s in self.waiting if predicate(s)]
        for s in gone:
            self.waiting.remove(s)
        rows = self.batch.seqs
        keep = [i for i, s in enumerate(rows) if not predicate(s)]
        gone += [s for s in rows if predicate(s)]
        self.batch.keep(keep)
        return gone
