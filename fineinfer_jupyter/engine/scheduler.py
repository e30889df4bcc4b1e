"""What the next engine iteration runs: prefill, decode, a training micro-step, or nothing.

The scheduler owns the waiting queue, the running batch's membership and the cost model it
plans with. schedule() decides and admits; update() applies what the executor reports
(docs/design.md, "One iteration" and "Scheduling").

Policies:
- immediate: inference preempts training the moment it arrives.
- exclusive: inference waits until training has ended.
- fineinfer: the prototype's fixed deferral bound; once served, a batch runs until it drains.
- deferred: training runs while every waiting request's time-to-first-token slack and every
  running row's time-per-token room survive it.

A training micro-step runs in units (a layer's forward or backward, the head), as many per
iteration as fit: it pauses between two units whenever inference is due, so its size can stay
the most efficient one, and an arrival waits at most one segment (max_segment seconds, or one
unit if a unit is longer).

The time-per-output-token target is a pace: a request's n-th token after its first is due
n * tpot after the first one, so a reader going at 1/tpot tokens a second never waits. Tokens
delivered ahead of that pace bank time that a training step may use, but no pause between two
tokens is planned longer than STALL_TPOTS * tpot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .costmodel import CostModel, prefill_units
from .outputs import IterationResult, SchedulerOutput
from .sequence import Sequence, Status

INF = float("inf")
STALL_TPOTS = 4.0  # the longest planned pause between two tokens, in units of the tpot target


class Training(Protocol):
    active: bool

    def next_tokens(self) -> list[int]:
        """Token counts of the examples the next micro-steps of the current effective batch
        train on, in order."""

    def max_examples(self) -> int:
        """The job's micro_batch_size: the largest micro-step it allows."""

    def in_progress(self) -> tuple[int, int, bool] | None:
        """A micro-step under way: (padded tokens, units done, whether it ends its effective
        batch, so that the optimizer step follows its last unit)."""


@dataclass
class MicroStepPlan:
    examples: int  # of a new micro-step (0: the one under way goes on)
    padded: int  # tokens it computes: examples x the longest
    done: int  # units already run
    last: bool  # it ends the effective batch: the optimizer steps after its last unit


class Scheduler:
    def __init__(
        self,
        *,
        policy: str = "immediate",
        max_batch_size: int = 32,
        costs: CostModel | None = None,
        max_segment: float = 0.3,
        fineinfer_bound: float = 2.0,
        min_train_efficiency: float = 0.9,
    ):
        self.policy = policy
        self.max_batch_size = max_batch_size
        self.costs = costs or CostModel()
        self.max_segment = max_segment  # seconds of training an arrival may wait behind
        self.fineinfer_bound = fineinfer_bound
        # a micro-step squeezed between requests must train at least this fraction of the
        # tokens/s of a full one; a smaller step wastes more than serving the requests first
        self.min_train_efficiency = min_train_efficiency
        self.headroom = 0.9  # plan to land within 90% of each latency target
        self.heterogeneous = False  # with offload: forward units ride along inference passes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # the decode batch, in row order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Take a request out of the queues (cancelled); False if it was in neither."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        else:
            return False
        seq.status = Status.FINISHED
        return True

    def abort_all(self, seqs: list[Sequence]) -> None:
        """Empty both queues and end `seqs`: every request in the engine, including those
        admitted by an iteration that broke before update() (they are in neither queue)."""
        self.waiting.clear()
        self.running = []
        for seq in seqs:
            seq.status = Status.FINISHED

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self, now: float, training: Training | None = None) -> SchedulerOutput:
        """Decide what the next iteration runs; requests chosen for a prefill are admitted
        (they leave the waiting queue; update() adds them to the batch)."""
        out = self._plan(now, training)
        for seq in out.admitted:
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            seq.admitted = now
            seq.slack_at_admission = seq.ttft_deadline - now
        return out

    def update(self, out: SchedulerOutput, result: IterationResult) -> list[Sequence]:
        """Apply what the executor did: the cost model learns the measured times, admitted
        requests that got their first token join the batch, finished ones leave. Returns the
        requests that finished in this iteration."""
        for timing in result.timings:
            self.costs.observe(*timing)
        self.costs.observe_units(result.padded, result.first_unit, result.unit_seconds)
        self.running = [s for s in self.running if not s.is_finished]
        self.running += [s for s in out.admitted if not s.is_finished]
        ended = [s for s in out.admitted + out.decode if s.is_finished]
        for seq in ended:
            seq.status = Status.FINISHED
        return ended

    def _plan(self, now: float, training: Training | None) -> SchedulerOutput:
        room = self.max_batch_size - len(self.running)
        newcomers = sorted(self.waiting, key=self.ttft_due)[: max(room, 0)]
        running = self.running
        training_active = training is not None and training.active
        if not training_active or self.policy == "immediate":
            return self._serve(now, newcomers, running, training if training_active else None)
        if self.policy == "exclusive":
            return self._train(now, self._micro_step(training), INF)
        if self.policy == "fineinfer":  # the prototype's whole micro-steps
            if running or (newcomers and now - newcomers[0].arrival >= self.fineinfer_bound):
                return self._serve(now, newcomers, running)
            return self._train(now, self._micro_step(training), INF)
        return self._deferred(now, newcomers, running, training)

    def _deferred(
        self, now: float, newcomers: list[Sequence], running: list[Sequence], training: Training
    ) -> SchedulerOutput:
        micro = self._micro_step(training, self._ceiling(newcomers, running))
        prefill_slack = self.prefill_slack(now, newcomers, running)
        decode_room = self.decode_room(now, running)
        n = self._units_within(micro, min(prefill_slack, decode_room), self.max_segment)
        if len(self.waiting) > len(newcomers):
            n = 0  # the batch is full and requests wait for a row: finish the running ones first
        elif not newcomers and not running:
            n = max(n, 1)  # nothing to protect: never starve training
        elif running and self._rides_along(micro):
            n = 0  # with offload, a layer's forward shares the fetch of the rows' next decode
        if n:
            return SchedulerOutput(train_examples=micro.examples, train_units=n)
        out = None
        if newcomers and running:
            c = self.costs
            p = c.margin * c.prefill(newcomers[0].num_prompt_tokens)
            if decode_room < p <= self.room_after_decode(now, running):
                out = SchedulerOutput(decode=list(running))  # the prefill fits after a token
        out = out or self._serve(now, newcomers, running)
        if self._rides_along(micro) and (out.prefill or out.decode):
            # heterogeneous batching: the layers this pass fetches serve training too, for as
            # many of the micro-step's forward units as the requests' slack allows
            room = min(prefill_slack, decode_room)
            out.train_units = self._units_within(micro, room, self.max_segment, shared=True)
            out.train_examples = micro.examples if out.train_units else 0
        return out

    def _rides_along(self, micro: MicroStepPlan) -> bool:
        """Offloaded layers, heterogeneous batching on, and the micro-step's next unit is a
        layer's forward: it should run inside an inference pass, not pay a fetch of its own."""
        c = self.costs
        return self.heterogeneous and bool(c.offloaded) and c.unit_layer(micro.done) == micro.done

    def _train(self, now: float, micro: MicroStepPlan, segment: float) -> SchedulerOutput:
        """As many units as fit in a segment of `segment` seconds, one at least."""
        n = max(self._units_within(micro, INF, segment), 1)
        return SchedulerOutput(train_examples=micro.examples, train_units=n)

    def _micro_step(self, training: Training, ceiling: float = INF) -> MicroStepPlan:
        """The micro-step under way, or the next one: the size that trains the most tokens a
        second among those whose longest unit fits in `ceiling` (the most room the requests
        in the engine can ever leave between their tokens), and whose rest of the effective
        batch still splits into efficient micro-steps."""
        state = training.in_progress()
        if state is not None:
            padded, done, last = state
            return MicroStepPlan(0, padded, done, last)
        tokens = training.next_tokens()
        most = min(training.max_examples(), len(tokens))
        fits = [k for k in range(1, most + 1) if self._longest_unit(tokens[:k]) <= ceiling]
        best = self._best(tokens, max(fits, default=1))
        k = next((j for j in range(best, 0, -1) if self._worth_it(tokens, j, best)), best)
        return MicroStepPlan(k, k * max(tokens[:k]), 0, k == len(tokens))

    def _longest_unit(self, tokens: list[int]) -> float:
        c = self.costs
        return c.margin * c.train(len(tokens) * max(tokens)) * max(c.shares)

    def _units_within(
        self, micro: MicroStepPlan, budget: float, segment: float, *, shared: bool = False
    ) -> int:
        """How many of the micro-step's next units fit in `budget` seconds (with the optimizer
        step after the last unit of an effective batch) and in one segment: a unit longer
        than a segment runs alone. `shared`: only layers' forwards, riding along an inference
        pass that fetches their layers anyway."""
        c, n, total = self.costs, 0, 0.0
        last = len(c.shares) - 1
        for u in range(micro.done, last + 1):
            if shared and c.unit_layer(u) != u:
                break
            total += c.margin * (
                c.unit(micro.padded, u, shared=shared)
                + (c.optimizer if u == last and micro.last else 0.0)
            )
            if total > budget or (n and total > segment):
                break
            n += 1
        return n

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
                c.margin * c.prefill(prefill_units(p)) for p in self.prefill_passes(trial, now)
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

    def _step_cost(self, tokens: list[int]) -> float:
        """Estimated seconds of one micro-step on these examples (padded to the longest)."""
        return self.costs.train(len(tokens) * max(tokens)) if tokens else 0.0

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
        """The most room for training that these requests can leave between their tokens: the
        longest planned pause (or, for a waiting request, its whole first-token slack) less
        the step that must follow it."""
        c, seqs = self.costs, running + newcomers
        if not seqs:
            return INF
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
            p = c.margin * c.prefill(prefill_units(group))
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
        now: float,
        newcomers: list[Sequence],
        running: list[Sequence],
        training: Training | None = None,
    ) -> SchedulerOutput:
        if newcomers:
            group = self._group(now, newcomers, running)
            return SchedulerOutput(prefill=self.prefill_passes(group, now))
        if running:
            return SchedulerOutput(decode=list(running))
        if training is not None:  # (immediate) an arrival waits at most one segment
            return self._train(now, self._micro_step(training), self.max_segment)
        return SchedulerOutput()

    def queue_stats(self, now: float) -> dict:
        """For the metrics: waiting and running requests, and the waiting ones' slack."""
        waiting = sorted(self.waiting, key=self.ttft_due)
        slack = self.prefill_slack(now, waiting, self.running) if waiting else None
        return {"waiting": len(waiting), "running": len(self.running), "slack": slack}
