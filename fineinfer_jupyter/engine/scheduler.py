"""What the next engine iteration runs: prefill, decode, a training micro-step, or nothing.

The scheduler owns the waiting queue, the running batch's membership and the cost model it
plans with. schedule() decides and admits; update() applies what the executor reports
(docs/design.md, "One iteration" and "Scheduling").

Policies:
- immediate: inference preempts training the moment it arrives.
- exclusive: inference waits until training has ended.
- fineinfer: the prototype's fixed deferral bound; once served, a batch runs until it drains.
- deferred: training runs while every waiting request's time-to-first-token slack and every
  running row's time-per-token room survive it. In split mode (worker.py) training runs on a
  thread of its own instead, and requests are served as `immediate` serves them.

A training micro-step runs in units (a layer's forward or backward, the head), as many per
iteration as fit: it pauses between two units whenever inference is due, so its size can stay
the most efficient one, and an arrival waits at most one segment (max_segment seconds, or one
unit if a unit is longer).

The time-per-output-token target is a pace: a request's n-th token after its first is due
n * tpot after the first one, so a reader going at 1/tpot tokens a second never waits. Tokens
delivered ahead of that pace bank time that a training step may use, but no pause between two
tokens is planned longer than STALL_TPOTS * tpot.

Chunked prefill: no prefill pass is planned longer than that pause either (with no running rows:
than a first-token target), nor longer than the running rows' room before their next token; a prompt that does not fit is prefilled in chunks
(each attends to the earlier ones through its KV cache) between the rows' decodes. A request
whose first token cannot be on time any more yields to those that still can be; one that can be
on time only if its chunks take more than the rows' pace leaves them takes up to their longest
planned pause (the rows fall behind their pace, as one pass would have made them, less far). A
late one takes that pause only while the rows are on their pace (they catch up in between: their
mean pace holds), and under `deferred` takes turns with training segments.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .costmodel import CostModel, pass_units, prefill_units
from .outputs import IterationResult, SchedulerOutput
from .sequence import Sequence, Status

INF = float("inf")
STALL_TPOTS = 4.0  # the longest planned pause between two tokens, in units of the tpot target
MIN_CHUNK = 64  # prompt tokens: a smaller chunk would pay its pass's fixed cost for too little
LARGER_WITHIN = 0.93  # a larger micro-step is preferred while its estimated rate is this close
# split mode: the running rows decode on this share of their time-per-token target, not as fast
# as they can: rows that live longer overlap more, a decode pass serves them all at once, and
# the time between passes goes to the second training stream, or, beside a busy neighbour, back
# to the worker's core. 0.7 leaves each token 0.2 x tpot of bank (planning headroom 0.9) for a
# newcomer's prefill and a slow step; 0.85 trained no more and missed a target once
# (docs/design.md, "The training worker"; docs/benchmarks.md, "The pace")
PACE = 0.7


class Training(Protocol):
    active: bool
    busy: bool  # its micro-step runs on the training worker now (split mode)

    def next_tokens(self) -> list[int]:
        """Token counts of the examples the next micro-steps of the current effective batch
        train on, in order."""

    def max_examples(self) -> int:
        """The job's micro_batch_size: the largest micro-step it allows."""

    def in_progress(self) -> tuple[int, int, bool] | None:
        """A micro-step under way: (padded tokens, units done, whether it ends its effective
        batch, so that the optimizer step follows its last unit)."""

    def side_ready(self) -> bool:
        """Split mode: a second micro-step can run beside the worker's (side_stream)."""

    def side_progress(self) -> tuple[int, int, bool] | None:
        """The second stream's micro-step under way, as in_progress."""


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
        # split mode (worker.py, deferred policy only): training runs on the training worker,
        # inference is planned as if nothing else ran on the engine thread
        self.split_training = False
        # split mode with two threads or more (EngineCore.iterate sets it each iteration): an
        # iteration with nothing to serve runs a second micro-step on the engine thread
        self.side_stream = False
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # the decode batch, in row order
        self.prefilling: list[Sequence] = []  # admitted, their prompt prefilled in part (chunks)
        self.chunked = True  # False: a prompt in one pass, whatever the running rows' pace
        self.prefilled_at = -INF  # when the last prefill pass was planned
        self.hurrying: set[Sequence] = set()  # chunked prompts the rows' pace yields to
        self.owed = 0.0  # seconds of the late prompt's chunk that ran last: training's turn

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Take a request out of the queues (cancelled); False if it was in neither."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        else:
            return False
        seq.status = Status.FINISHED
        return True

    def abort_all(self, seqs: list[Sequence]) -> None:
        """Empty the queues and end `seqs`: every request in the engine, including those
        admitted by an iteration that broke before update() (they are in no queue then)."""
        self.waiting.clear()
        self.running, self.prefilling = [], []
        for seq in seqs:
            seq.status = Status.FINISHED

    @property
    def num_running(self) -> int:
        """Requests holding a KV cache: the decode batch's rows and prompts being chunked."""
        return len(self.running) + len(self.prefilling)

    def schedule(self, now: float, training: Training | None = None) -> SchedulerOutput:
        """Decide what the next iteration runs; requests chosen for a prefill are admitted
        (they leave the waiting queue; update() adds them to the batch)."""
        out = self._plan(now, training)
        if out.prefill:
            self.prefilled_at = now
            self.owed = sum(
                self._pass_cost(s, end - s.prefilled)
                for s, end in out.chunks.items()
                if self._lagging(now, s)
            )
        elif out.train_units:
            self.owed = 0.0
        for seq in out.admitted:
            if seq.status is not Status.WAITING:
                continue  # a chunked prompt going on
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            seq.admitted = now
            seq.slack_at_admission = seq.ttft_deadline - now
            whole = self._cost([seq])
            if seq in out.chunks and seq not in self.hurrying and now + whole > seq.ttft_deadline:
                seq.note = (
                    f"its {seq.num_todo} prompt tokens take ~{whole:.1f} s to prefill, more "
                    f"than its {seq.slo.ttft:g} s time-to-first-token target leaves: prefilled "
                    "in chunks, at a pace that keeps the other requests on target"
                )
        return out

    def update(self, out: SchedulerOutput, result: IterationResult) -> list[Sequence]:
        """Apply what the executor did: the cost model learns the measured times, admitted
        requests that got their first token join the batch, finished ones leave. Returns the
        requests that finished in this iteration."""
        for timing in result.timings:
            self.costs.observe(*timing)
        self.costs.observe_units(result.padded, result.first_unit, result.unit_seconds)
        self.running = [s for s in self.running if not s.is_finished]
        live = [s for s in out.admitted if not s.is_finished]
        self.running += [s for s in live if s not in out.chunks]  # (they got their first token)
        self.prefilling = [s for s in self.prefilling if s not in out.admitted]
        self.prefilling += [s for s in live if s in out.chunks]
        self.hurrying &= set(self.prefilling)
        ended = [s for s in out.admitted + out.decode if s.is_finished]
        for seq in ended:
            seq.status = Status.FINISHED
        return ended

    def _plan(self, now: float, training: Training | None) -> SchedulerOutput:
        room = self.max_batch_size - self.num_running
        newcomers = self.prefilling + sorted(self.waiting, key=self.ttft_due)[: max(room, 0)]
        running = self.running
        training_active = training is not None and training.active
        if training_active and self.split_training:
            return self._beside(now, newcomers, running, training)
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
        # a prompt whose first token is late whatever runs (chunked) does not hold training
        # back: its chunks and training segments (as long as its last chunk) take turns
        late = [s for s in newcomers if self._lagging(now, s)]
        on_time = [s for s in newcomers if s not in late]
        prefill_slack = self.prefill_slack(now, on_time, running) if on_time else INF
        decode_room = self.decode_room(now, running)
        segment = min(self.max_segment, self.owed) if late and not on_time else self.max_segment
        n = self._units_within(micro, min(prefill_slack, decode_room), segment) if segment else 0
        if len(self.waiting) > len(newcomers) - len(self.prefilling):
            n = 0  # the batch is full and requests wait for a row: finish the running ones first
        elif not newcomers and not running:
            n = max(n, 1)  # nothing to protect: never starve training
        elif running and self._rides_along(micro):
            n = 0  # with offload, a layer's forward shares the fetch of the rows' next decode
        if n:
            return SchedulerOutput(train_examples=micro.examples, train_units=n)
        out = self._serve(now, newcomers, running)
        if self._rides_along(micro) and (out.prefill or out.decode):
            # heterogeneous batching: the layers this pass fetches serve training too, for as
            # many of the micro-step's forward units as the requests' slack allows
            room = min(prefill_slack, decode_room)
            out.train_units = self._units_within(micro, room, self.max_segment, shared=True)
            out.train_examples = micro.examples if out.train_units else 0
        return out

    def _beside(
        self, now: float, newcomers: list[Sequence], running: list[Sequence], training: Training
    ) -> SchedulerOutput:
        """Split mode: the requests are served as `immediate` serves them (training does not
        take the engine thread's time), and the training worker, when idle, gets the rest of
        the micro-step under way or a whole new one (its size as with nothing to serve),
        unless the requests have fallen behind their targets: then the engine thread serves
        them on every thread until they catch up (a run under way stops after its unit in
        progress: `worker_hold`). The running rows decode on PACE x their tpot target, not as
        fast as they can, while that keeps them on target; meanwhile the engine thread trains
        a second micro-step (side_stream) or waits (`wake_at`)."""
        out = self._serve(now, newcomers, running)
        if out.decode and not out.prefill and not newcomers:
            due = min(self.paced(s, now) for s in running)
            if due > now and self.decode_room(due, running) >= 0:
                out = SchedulerOutput(wake_at=due)  # the rows are ahead of the pace: hold
        on_time = [s for s in newcomers if not self.late(now, s)]
        behind = self.decode_room(now, running) < 0 or (
            bool(on_time) and self.prefill_slack(now, on_time, running) < 0
        )
        if training.busy:
            out.worker_hold = behind
        elif not behind:
            micro = self._micro_step(training)
            out.worker_units = len(self.costs.shares) - micro.done
            out.worker_examples = micro.examples
        if self.side_stream and not (out.prefill or out.decode) and training.side_ready():
            # nothing to serve: a second stream, one thread each, rather than the worker's
            # micro-step on two (docs/design.md, "The training worker"); the engine thread
            # stops it after a unit once anything arrives (Executor.interrupted) or before
            # the held decodes fall due (wake_at)
            state = training.side_progress()
            examples = 0 if state is not None else self._new_micro_step(training).examples
            out.train_units = len(self.costs.shares) - (state[1] if state else 0)
            out.train_examples, out.side = examples, True
        return out

    def paced(self, s: Sequence, now: float) -> float:
        """When split mode decodes running row `s` next: its n-th token after its first at
        n x PACE x its tpot target from its first (`now` before it has one)."""
        if not s.token_times:
            return now
        return s.token_times[0] + len(s.token_times) * PACE * s.slo.tpot

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
        return self._new_micro_step(training, ceiling)

    def _new_micro_step(self, training: Training, ceiling: float = INF) -> MicroStepPlan:
        """The next micro-step's size (_micro_step), whatever is under way."""
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
        need their second one. Prompts that would need a pass longer than the longest
        planned pause (chunked) or are partly prefilled already are left out."""
        c, room = self.costs, self.decode_room(now, running)
        group = [newcomers[0]]
        for seq in newcomers[1:]:
            if seq.prefilled or self._cost([seq]) > self.longest_pass([seq], running):
                continue
            trial = group + [seq]
            passes = [self._cost(p) for p in self.prefill_passes(trial, now)]
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
        ends before every member's first token is due. A request with tokens in its KV cache
        already (a chunked prompt) has a pass of its own."""
        passes, start = [], now
        for seq in seqs:
            last = passes[-1] if passes else None
            if last and not seq.prefilled and not last[0].prefilled:
                cost = self._cost(last + [seq])
                cheaper = cost <= self._cost(last) + self._cost([seq])
                in_time = start is None or start + cost <= min(
                    self.ttft_due(s) for s in last + [seq]
                )
                if cheaper and in_time:
                    last.append(seq)
                    continue
            if last and start is not None:
                start += self._cost(last)
            passes.append([seq])
        return passes

    def _cost(self, seqs: list[Sequence]) -> float:
        """Estimated seconds of one prefill pass over the rest of these prompts (with margin)."""
        c = self.costs
        return c.margin * c.prefill(prefill_units(seqs, c.span, split=c.split))

    def longest_pass(self, pending: list[Sequence], running: list[Sequence] = ()) -> float:
        """The longest prefill pass planned: with running rows, the longest planned pause
        between two of their tokens; without, what still lets a request that arrives now be
        on time (the pending requests' first-token target)."""
        if not self.chunked:
            return INF
        if running:
            return self.headroom * STALL_TPOTS * min(s.slo.tpot for s in [*pending, *running])
        return self.headroom * min(s.slo.ttft for s in pending)

    def late(self, now: float, seq: Sequence) -> bool:
        """Its first token cannot be on time any more, even if it were prefilled now."""
        return now + self._cost([seq]) > self.ttft_due(seq)

    def _lagging(self, now: float, seq: Sequence) -> bool:
        """A prompt to be chunked that is late and not hurrying: its chunks take turns with
        training segments (`owed`), and it does not hold training back."""
        return self.chunked and seq not in self.hurrying and self.late(now, seq)

    def _chunk(self, seq: Sequence, room: float) -> int:
        """The most prompt tokens of `seq` after those already prefilled that one pass can
        prefill within `room` seconds (0: not even one)."""
        lo, hi = 0, seq.num_todo
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._pass_cost(seq, mid) <= room else (lo, mid - 1)
        return lo

    def _pass_cost(self, seq: Sequence, n: int) -> float:
        """Estimated seconds of a one-row pass over the next n prompt tokens of `seq`, after
        those already prefilled (with margin)."""
        c = self.costs
        return c.margin * c.prefill(pass_units(n, seq.prefilled, c.span, split=c.split))

    def _prefill_next(
        self, now: float, pending: list[Sequence], running: list[Sequence]
    ) -> SchedulerOutput | None:
        """The next prefill pass, or None when the running rows must decode first. Requests
        that can still get their first token on time go first (earliest deadline first), then
        late ones; a prompt too long for the room left (the rows' next token, the longest
        planned pause) is prefilled a chunk at a time, each chunk as large as the room allows."""
        pending = sorted(pending, key=lambda s: (self.late(now, s), self.ttft_due(s)))
        head = pending[0]
        cap = self.longest_pass(pending, running)
        room = min(self.decode_room(now, running), cap) if self.chunked else INF
        whole = self._cost([head])
        hurry = (
            bool(running) and self.chunked and whole > room and self._hurried(now, head, running)
        )
        # a late prompt's chunks go at the rows' longest pause too, but only while the rows
        # are on their pace: they catch up between two chunks (their mean pace holds), and the
        # prompt takes few chunks (each pays a fixed cost and re-reads the KV cache)
        wide = hurry or (
            bool(running)
            and self.chunked
            and whole > room
            and self.late(now, head)
            and self.decode_room(now, running) >= 0
        )
        if wide:
            room = min(self.stall_room(now, running), cap)  # the rows' pace yields to it
        scoring = head.sampling.prompt_logprobs is not None  # needs every position in one pass
        if not head.prefilled and (whole <= room or scoring):
            group = self._group(now, [s for s in pending if not s.prefilled], running)
            return SchedulerOutput(prefill=self.prefill_passes(group, now))
        after = -INF
        if running:
            stall = self.costs.margin * self.costs.decode(len(running))
            stall = self.headroom * STALL_TPOTS * min(s.slo.tpot for s in running) - 2 * stall
            after = stall if wide else self.room_after_decode(now, running)
        if room < whole <= min(cap, after):
            return None  # the rest of the prompt fits right after the rows' next token
        n, least = self._chunk(head, room), min(MIN_CHUNK, head.num_todo)
        decoded = all(s.token_times and s.token_times[-1] > self.prefilled_at for s in running)
        if running and not decoded and 2 * n < self._chunk(head, min(cap, after)):
            return None  # after the rows' token, a chunk twice as large fits: fewer passes
        if n < least:
            # too little room: the rows decode first if they have not since the last prefill
            # pass, or if their token leaves room for a chunk; else (a decode alone takes up
            # the pace) the chunk takes what the longest planned pause leaves after the rows'
            # decode, so decodes and chunks alternate, and a long prompt takes few passes
            if running and (not decoded or self._chunk(head, min(cap, after)) >= least):
                return None
            d = self.costs.margin * self.costs.decode(len(running)) if running else INF
            if not hurry and 2 * d <= self.headroom * min(s.slo.tpot for s in running or pending):
                return None  # the rows are behind their pace and catch up at least as fast as
                # they fell behind: a prompt not hurrying waits (its chunks follow the rows'
                # mean pace, not their longest pause)
            n = max(least, self._chunk(head, min(cap, self.stall_room(now, running))))
        end = head.prefilled + n
        chunks = {head: end} if end < head.num_prompt_tokens else {}
        return SchedulerOutput(prefill=[[head]], chunks=chunks)

    def _hurried(self, now: float, head: Sequence, running: list[Sequence]) -> bool:
        """The head can still be on time, but not if its chunks only take what the running
        rows' pace leaves them (between two decodes, headroom x tpot less the decode): then
        its chunks may take up to the rows' longest planned pause, as one pass would have
        taken more (the rows fall behind their pace, never beyond the longest pause)."""
        if head in self.hurrying:
            return True  # (its chunks went at the longest pause: they go on so to the end)
        c = self.costs
        if now + c.prefill(prefill_units([head], c.span, split=c.split)) > self.ttft_due(head):
            return False  # late even by the bare estimate (the margin would hand a prompt that
            # one pass just keeps on time to the late path, which is twice as slow)
        d = self.costs.margin * self.costs.decode(len(running))
        beat = self.headroom * min(s.slo.tpot for s in running)
        share = max(beat - d, 0.0) / beat  # of the time, what the pace leaves to chunks
        if share <= 0 or now + self._cost([head]) / share > self.ttft_due(head):
            self.hurrying.add(head)
            return True
        return False

    def stall_room(self, now: float, running: list[Sequence]) -> float:
        """Seconds before the running rows must decode so that no pause between two of their
        tokens exceeds the longest planned pause (their pace aside)."""
        if not running:
            return INF
        d = self.costs.margin * self.costs.decode(len(running))
        longest = self.headroom * STALL_TPOTS
        due = min(
            (s.token_times[-1] + longest * s.slo.tpot for s in running if s.token_times),
            default=INF,
        )
        return due - now - d

    def _step_cost(self, tokens: list[int]) -> float:
        """Estimated seconds of one micro-step on these examples (padded to the longest)."""
        return self.costs.train(len(tokens) * max(tokens)) if tokens else 0.0

    def _best(self, tokens: list[int], most: int) -> int:
        """The micro-step of at most `most` examples that trains the most tokens a second: the
        largest whose estimate is within LARGER_WITHIN of the best one. The train line is
        least sure of a step's fixed cost (collating, each unit's Python, the optimizer step
        as often) at the sizes not measured lately, and underestimated it there: steps of 2
        examples estimated 3-6% faster per token than 4 measured 1.5x slower (docs/benchmarks.md,
        "The light-load gap")."""
        sizes = range(1, max(most, 1) + 1)
        top = max(self._rate(tokens[:k]) for k in sizes)
        return max(k for k in sizes if self._rate(tokens[:k]) >= LARGER_WITHIN * top)

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
            first = min(self._cost([s]), self.longest_pass(newcomers, running))  # (or chunks)
            room = min(room, self.headroom * s.slo.ttft - first)
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
            p = self._cost(group)
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
            out = self._prefill_next(now, newcomers, running)
            if out is not None:
                return out
        if running:
            return SchedulerOutput(decode=list(running))
        if training is not None:  # (immediate) an arrival waits at most one segment
            return self._train(now, self._micro_step(training), self.max_segment)
        return SchedulerOutput()

    def queue_stats(self, now: float) -> dict:
        """For the metrics: waiting and running requests, and the waiting ones' slack."""
        waiting = self.prefilling + sorted(self.waiting, key=self.ttft_due)
        slack = self.prefill_slack(now, waiting, self.running) if waiting else None
        return {"waiting": len(self.waiting), "running": self.num_running, "slack": slack}
