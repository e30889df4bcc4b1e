"""Runs what the scheduler decided, on the engine thread (docs/design.md, "One iteration").

A prefill, a decode or a training micro-step goes through the runner; new tokens are
detokenized and streamed. The result says what happened (tokens, finished requests, timings);
the executor never changes the scheduler's queues or its cost model. It owns the running batch's KV cache, kept row for row equal to the scheduler's batch.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from .adapters import AdapterStore
from .attention import chunks_split
from .batch import Batch
from .config import SamplingParams, Slo
from .costmodel import attention_span, prefill_units
from .metrics import Metrics
from .oom import decode_fitting, free_memory, halves, is_oom, too_big
from .outputs import IterationKind, IterationResult, SchedulerOutput, Timing
from .prefix import PrefixCache
from .request import Tokenizer
from .runner import Runner
from .sequence import Sequence
from .training import MicroStep, Trainer
from .worker import Apart, TrainWorker

log = logging.getLogger("fineinfer")
GROW_BELOW = 0.2  # seconds: a calibration probe this fast is doubled (Executor.calibrate)


class Executor:
    def __init__(
        self,
        *,
        runner: Runner,
        adapters: AdapterStore,
        trainer: Trainer,
        tokenizer: Tokenizer,
        metrics: Metrics,
        prefix: PrefixCache | None = None,
    ):
        self.runner, self.adapters, self.trainer = runner, adapters, trainer
        self.tokenizer, self.metrics = tokenizer, metrics
        self.batch = Batch()  # KV cache rows of the running requests
        # prompts prefilled in part (chunked prefill): their KV cache and its mask, until the
        # last chunk's pass gives the first token and the row joins the batch
        self.partial: dict[Sequence, tuple] = {}
        self.prefix = prefix or PrefixCache(0)  # KV of finished requests, by token prefix
        self.versions: dict[Sequence, int] = {}  # its adapter's weights version at its pin
        self.span = attention_span(runner.config)  # (the cost model's prefill units)
        self.split = chunks_split(runner.config, runner.device)  # (and how chunks attend)
        self.worker: TrainWorker | None = None  # split mode: micro-steps run there (worker.py)
        self._launched = 0  # the first unit of the run handed to the worker
        # split mode's second stream stops after a unit once this says so (the engine: its
        # inbox holds something, a request or the worker's end); None: it never stops early
        self.interrupted: Callable[[], bool] | None = None
        self.side_units = 0  # units the second stream ran (status)
        self.apart = Apart()  # the engine thread's passes beside the worker's run (worker.py)

    def calibrate(self, slo: Slo) -> tuple[list[Timing], list[tuple[int, int, float]]]:
        """Time prefill, decode and (forward and backward) training passes once, so the
        scheduler plans with this machine's figures from the first iteration on (this also
        warms the kernels up). Prefill probes come apart, as (new tokens, past tokens,
        seconds): short ones, a longer one, a chunk of that length after earlier tokens, from
        which the cost model measures attention (CostModel.calibrate_prefill), and the one
        pass over those earlier tokens."""
        self.runner.choose_prefill_threads()  # (a bf16 model on a CPU: one thread may be faster)
        timings, probes = [], []
        for n in (16, 16, 64, 64):
            probes.append(self._probe(n, 0, slo))
        seq, (cache, mask, _) = self._probed  # (the decode probes extend it)
        # a longer pass, twice as long while it takes little time (matrix units, a GPU: the
        # cost per token keeps falling with the size), then a chunk of that size after twice
        # as many tokens: what long prompts are planned from
        text = self.runner.config.get_text_config()
        context = getattr(text, "max_position_embeddings", None) or 1024
        size = min(256, context // 4)
        while True:
            probes += [self._probe(size, 0, slo) for _ in range(2)]
            fast = min(seconds for _, _, seconds in probes[-2:]) < GROW_BELOW
            if not fast or size >= 1024 or 6 * size > context:
                break
            size *= 2
        past = min(2 * size, context - size)
        probes += self._probe(size, past, slo, repeat=2)
        probes.append(self._setup)  # (its first `past` tokens: a one pass twice as long)
        batch = Batch()
        batch.join([seq], cache, mask)
        seq.output_ids.append(0)
        # (a bf16 model on a CPU: its passes the chosen way are the decode timings too)
        passes = self.runner.choose_row_threads(batch)
        for seconds in passes[-2:] or [self._decode_seconds(batch) for _ in range(2)]:
            timings.append(Timing("decode", 1, seconds))
        for rows, length in ((1, 16), (1, 32), (2, 64)):  # a micro-step's fixed and per-token cost
            start = time.perf_counter()
            fetching = self._fetch_seconds()
            self.runner.train_probe(rows, length)
            seconds = time.perf_counter() - start - (self._fetch_seconds() - fetching)
            timings.append(Timing("train", rows * length, seconds))
        off = self.runner.walk.offload
        if off is not None:  # what fetching a layer costs, too
            timings += [Timing("fetch", f.bytes, f.seconds) for f in off.take()]
            off.take_shared()
        return timings, probes

    def _probe(self, n: int, past: int, slo: Slo, repeat: int = 1):
        """Time a prefill pass of n tokens after `past` tokens (their KV computed first): one
        (n, past, seconds), or a list of `repeat` of them."""
        token = min(self.tokenizer.eos_ids, default=0)
        probe = Sequence([token] * (past + n), sampling=SamplingParams(max_new_tokens=2), slo=slo)
        start = time.perf_counter()
        cache = self.runner.prefill([probe], end=past)[0] if past else None
        self._setup = (past, 0, time.perf_counter() - start)
        probe.prefilled = past
        out = []
        for _ in range(repeat):
            kept = copy.deepcopy(cache)  # (a pass extends the cache it is given)
            start = time.perf_counter()
            made = self.runner.prefill([probe], cache=kept)
            out.append((n, past, time.perf_counter() - start))
        self._probed = probe, made
        return out if repeat > 1 else out[0]

    def _decode_seconds(self, batch: Batch) -> float:
        start = time.perf_counter()
        self.runner.decode(batch)
        return time.perf_counter() - start

    def _fetch_seconds(self) -> float:
        off = self.runner.walk.offload
        return off.fetch_seconds if off is not None else 0.0

    def execute(self, out: SchedulerOutput) -> IterationResult:
        kind = out.kind.value
        self.metrics.iteration_started(kind)
        result, start = IterationResult(), time.perf_counter()
        if self.worker is not None:  # its units' thread count, from its next unit on
            self.worker.threads = self._worker_threads(out)
            self.worker.hold = out.worker_hold
        if out.worker_units:  # first: it runs beside this iteration's pass
            self._launch(out.worker_units, out.worker_examples)
        with self._beside_worker(out.kind is not IterationKind.IDLE):
            return self._execute(out, result, start)

    def _execute(self, out: SchedulerOutput, result: IterationResult, start: float):
        kind = out.kind.value
        rows = tokens = 0
        shared = None  # training units riding along this inference pass (heterogeneous)
        if out.train_units and (out.prefill or out.decode):
            shared = RideAlong(self.trainer, self.runner, out.train_units, out.train_examples)
        if out.prefill:
            before = sum(s.prefilled for s in out.admitted)
            self._prefill(out.prefill, result, shared, out.chunks)
            rows, tokens = len(out.admitted), sum(s.prefilled for s in out.admitted) - before
        elif out.decode:
            self._decode(out.decode, result, shared)
            rows = tokens = len(out.decode)
        elif out.train_units and out.side:
            rows, tokens = self._side(out.train_units, out.train_examples, out.wake_at)
        elif out.train_units:
            rows, tokens = self._train(out.train_units, out.train_examples, result)
        if shared is not None:
            result.unit_seconds, result.first_unit = shared.seconds, shared.first
            result.padded = shared.padded
        self._count_fetches(result)
        result.seconds = time.perf_counter() - start
        train = sum(shared.seconds) if shared is not None else 0.0
        self.metrics.record_iteration(kind, result.seconds, rows=rows, tokens=tokens, train=train)
        return result

    def _count_fetches(self, result: IterationResult) -> None:
        off = self.runner.walk.offload
        if off is None:
            return
        fetches = off.take()
        for f in fetches:
            result.timings.append(Timing("fetch", f.bytes, f.seconds))
        self.metrics.record_offload(fetches, shared=off.take_shared())

    def _prefill(
        self, passes: list[list[Sequence]], result: IterationResult, shared=None, chunks=None
    ) -> None:
        """Prefill passes; a request in `chunks` is prefilled up to that prompt position only
        (its KV cache waits in `partial` for its next chunk). The adapter a request is pinned
        to at its first pass stays its adapter for every later chunk."""
        chunks = chunks or {}
        for seq in (s for group in passes for s in group):
            if seq.chunks:
                continue  # pinned at its first pass
            try:
                seq.pinned = self.adapters.pin(seq.adapter)  # a training adapter's snapshot
                self.versions[seq] = self.adapters.version(seq.pinned)
            except Exception as e:
                self._fail(seq, e, result)
                continue
            hit = self.partial.get(seq)
            if hit is not None and hit[2:] != (seq.pinned, self.versions[seq]):
                self._miss(seq)  # the adapter changed since the lookup: prefill it all
        todo = list(passes)
        while todo:
            group = [s for s in todo.pop(0) if not s.is_finished]
            if not group:
                continue
            start, also = time.perf_counter(), shared
            shared = None  # (riding along the first pass only)
            end = chunks.get(group[0]) if len(group) == 1 else None
            past = self.partial.pop(group[0], (None,))[0] if len(group) == 1 else None
            try:
                cache, mask, logits = self.runner.prefill(group, also, cache=past, end=end)
                units = prefill_units(group, self.span, end, split=self.split)
                for seq in group:
                    seq.prefilled, seq.chunks = end or seq.num_prompt_tokens, seq.chunks + 1
                tokens = [] if end is not None else self.runner.sample(logits, group)
            except Exception as e:  # this pass failed: its rows fail, the rest go on
                if is_oom(e) and len(group) > 1:  # (or fewer rows at a time fit: oom.py)
                    free_memory()
                    todo[:0] = halves(group)
                    continue
                for seq in group:
                    self._fail(seq, too_big(seq, e) if is_oom(e) else e, result)
                continue
            seconds = time.perf_counter() - start - (sum(also.seconds) if also else 0.0)
            result.timings.append(Timing("prefill", units, seconds))
            if end is not None:  # a chunk: the next one extends this cache
                self.partial[group[0]] = (cache, mask)
                continue
            now = time.monotonic()
            for seq, token in zip(group, tokens, strict=True):
                if seq.prompt_logprobs is not None:
                    seq.stream.put(seq.echo_event())
                if seq.score_only:  # its answer is the prompt's logprobs: no token
                    seq.scored(now)
                    self._end(seq, result)
                else:
                    self._emit(seq, token, now, result)
            keep = [i for i, s in enumerate(group) if not s.is_finished]
            if keep:
                if len(keep) < len(group):
                    cache.batch_select_indices(torch.tensor(keep, device=mask.device))
                    mask = mask[keep]
                self.batch.join([group[i] for i in keep], cache, mask)

    def lookup(self, seq: Sequence) -> None:
        """A new request: take the longest prefix of its prompt the prefix cache keeps for the
        adapter it would run now, so that only the rest is prefilled (not for a request that
        asks for its prompt's logprobs: they need every position's logits)."""
        if seq.sampling.prompt_logprobs is not None:
            return
        try:
            owner = self.adapters.pin_name(seq.adapter)
        except Exception:
            return  # (the adapter went: its first pass fails it)
        n, cache = self.prefix.lookup(owner, seq.prompt_ids)
        if n:
            mask = torch.ones((1, n), dtype=torch.long, device=cache.layers[0].keys.device)
            self.partial[seq] = (cache, mask, owner, self.adapters.version(owner))
            seq.prefilled = seq.cached_tokens = n

    def _miss(self, seq: Sequence) -> None:
        del self.partial[seq]
        self.prefix.hits -= 1
        self.prefix.tokens_saved -= seq.cached_tokens
        seq.prefilled = seq.cached_tokens = 0

    def _decode(self, seqs: list[Sequence], result: IterationResult, shared=None) -> None:
        start = time.perf_counter()
        self.batch.align(seqs)
        try:  # out of memory: the longest rows leave until the rest fit (oom.py)
            logits, seqs = decode_fitting(
                self.runner, self.batch, seqs, lambda s, e: self._fail(s, e, result), shared
            )
            tokens = self.runner.sample(logits, seqs)
        except Exception as e:  # the whole pass failed: every row in it fails, the engine goes on
            for seq in seqs:
                if not seq.is_finished:
                    self._fail(seq, too_big(seq, e) if is_oom(e) else e, result)
            self.batch.keep([])
            return
        now = time.monotonic()
        for seq, token in zip(seqs, tokens, strict=True):
            self._emit(seq, token, now, result)
        self.batch.keep([i for i, s in enumerate(seqs) if not s.is_finished])
        seconds = time.perf_counter() - start - (sum(shared.seconds) if shared else 0.0)
        result.timings.append(Timing("decode", len(seqs), seconds))

    def _train(self, units: int, examples: int, result: IterationResult) -> tuple[int, int]:
        """Units of the micro-step under way, or of a new one on `examples` examples."""
        progress = self.trainer.work(units, examples or None)
        result.unit_seconds, result.first_unit = progress.seconds, progress.first
        result.padded = progress.padded
        step = progress.step
        if step is not None and step.optimizer:
            result.timings.append(Timing("optimizer", 1, step.optimizer))
        return self._published(step)

    def _published(self, step: MicroStep | None) -> tuple[int, int]:
        """The micro-steps that ended in this iteration (None: none) in the training figures;
        their (examples, tokens)."""
        if step is None:
            self._publish_training(0, 0)
            return 0, 0
        self._publish_training(step.examples, step.tokens)
        return step.examples, step.tokens

    # -- the training worker (split mode, worker.py) -------------------------------------------

    def _side(self, units: int, examples: int, until: float | None = None) -> tuple[int, int]:
        """The second stream's units (split mode, nothing to serve), on the engine thread beside
        the worker's run, until one unit after anything arrives, or before a unit as long as the
        last would end past `until` (held decodes fall due then). Like the worker's, they stay
        out of the cost model. A failure waits for the worker's run to end, then fails alone
        (a smaller retry after running out of memory, else the job)."""
        last = [time.monotonic()]

        def stop() -> bool:
            now = time.monotonic()
            unit, last[0] = now - last[0], now
            if until is not None and now + unit > until:
                return True
            return self.interrupted is not None and self.interrupted()

        try:
            progress = self.trainer.work_side(units, examples or None, stop=stop)
        except Exception as e:
            self.collect(wait=True)
            progress = self.trainer.fail_side(e)
        self.side_units += len(progress.seconds)
        return self._published(progress.step)

    def _launch(self, units: int, examples: int) -> None:
        """Hand the micro-step under way (or a new one on `examples` examples) to the worker;
        what comes before its units (a job's start, its examples) runs here, first."""
        run = self.trainer.prepare(examples or None)
        if run is None:
            self._publish_training(0, 0)  # (a job that failed to start shows it)
            return
        self._launched, sync, worker = run.done, self.runner.sync, self.worker

        def compute():  # (in the worker) each unit on the count the engine thread last gave,
            seconds = []  # until the engine thread holds it (one unit at least)
            while len(seconds) < units and not run.finished and not (seconds and worker.hold):
                if torch.get_num_threads() != worker.threads:
                    torch.set_num_threads(worker.threads)
                seconds += run.run(1, sync=sync)
            return seconds

        self.trainer.busy = True
        worker.start(compute)

    def collect(self, *, wait: bool = False) -> None:
        """The run the worker finished (with `wait`, once it finishes): its end here, on the
        engine thread (the micro-step's end, the optimizer step, checkpoints, evaluation; a
        failure in the worker fails the job), and its figures in the metrics. Its units' seconds
        stay out of the cost model: they ran on one thread, beside the engine thread's passes."""
        w = self.worker
        if w is None or not w.pending or (w.busy and not wait):
            return
        future = w.take()
        self.apart.restore()  # (nothing to keep apart from until the next run)
        self.trainer.busy = False
        try:
            seconds, error = future.result(), None
        except Exception as e:
            seconds, error = [], e
        step = self.trainer.collect(self._launched, seconds, error).step
        if step is None:
            self._publish_training(0, 0)
            return
        self.metrics.record_iteration(
            "train", sum(seconds) + step.optimizer, rows=step.examples, tokens=step.tokens
        )
        self._publish_training(step.examples, step.tokens)

    def _worker_threads(self, out: SchedulerOutput) -> int:
        """The worker's intra-op threads: one beside an inference pass or the second training
        stream (`out.side`); every thread of the engine's when this iteration runs nothing.
        float32 training gains from the second core on both CPUs measured (225 against 178
        tokens/s alone); bf16 did not on a Xeon with AMX (271-291 on two threads, 305-321 on
        one) but does on a Zen 4 without AMX
        (bf16 alone with the worker 224 tokens/s on every thread against 191 on one, 0.85x
        against 0.72x the time-sliced engine's): every thread here, one CPU's loss against
        the other's gain (docs/design.md, "The training worker")."""
        idle = not (out.prefill or out.decode or out.side)
        return torch.get_num_threads() if idle else 1

    def settle(self) -> None:
        """Stop the worker's run in flight after its unit in progress, wait for it and end it
        here (before a job's state changes). The engine thread waits a unit, not the rest of
        a micro-step (~1 s): the requests in flight wait with it (docs/design.md, "The training
        worker"). The micro-step's remaining units run later, or are dropped with the job's
        partial batch, as in a time-sliced micro-step."""
        with self._holding():
            self.collect(wait=True)

    def quiesce(self) -> None:
        """Stop the worker's run in flight after its unit in progress and wait for it (its end
        waits for the next collect): before the model's structure, its active adapter or LoRA
        weights change (AdapterStore)."""
        if self.worker is not None:
            with self._holding():
                self.worker.wait()

    @contextmanager
    def _holding(self):
        """The worker's run in flight stops after its unit in progress while inside; the hold
        this iteration set comes back after (a run launched later must not inherit it)."""
        w = self.worker
        if w is None:
            yield
            return
        held, w.hold = w.hold, True
        try:
            yield
        finally:
            w.hold = held

    @contextmanager
    def _beside_worker(self, runs: bool = True):
        """The engine thread's passes on one thread fewer while the worker trains on its own;
        a pass (`runs`) on one thread keeps off the worker's CPU every other time (Apart)."""
        threads = torch.get_num_threads()
        if self.worker is None or not self.worker.busy:
            self.apart.restore()
            yield
            return
        if threads > 2:
            self.apart.restore()
        elif runs:  # (one thread: two less the worker's, or one where a neighbour took a core)
            self.apart.before_pass(self.worker.native_id)
        if threads < 2:
            yield
            return
        torch.set_num_threads(threads - 1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _emit(self, seq: Sequence, token: int, now: float, result: IterationResult) -> None:
        """One sampled token: the request's text, its stream, its end."""
        try:
            delta = seq.append_token(token, now, eos=token in self.tokenizer.eos_ids)
            if delta:
                event = {"type": "delta", "text": delta}
                if seq.sampling.logprobs is not None:
                    event["logprobs"] = seq.take_logprobs()
                seq.stream.put(event)
            if seq.is_finished:
                self._end(seq, result)
        except Exception as e:
            self._fail(seq, e, result)

    def _fail(self, seq: Sequence, error: Exception, result: IterationResult) -> None:
        log.error("request %s failed", seq.request_id, exc_info=error)
        seq.finish_reason, seq.error = "error", f"{type(error).__name__}: {error}"
        self._end(seq, result)

    def _end(self, seq: Sequence, result: IterationResult | None = None) -> None:
        """Free what a request that just ended held. Its final event goes out once the
        scheduler has taken it out of the batch (deliver), so that a caller who sees it also
        sees the engine without it."""
        if result is None and seq in self.batch.seqs:  # (in an iteration, the step drops rows)
            self.batch.drop(seq)
        self.partial.pop(seq, None)
        version = self.versions.pop(seq, None)
        if (
            result is not None
            and seq.finish_reason not in ("error", "cancelled")
            and seq in self.batch.seqs
            and version == self.adapters.version(seq.pinned)
        ):  # its KV, for later requests that start the same way (prefix.py)
            tokens = (seq.prompt_ids + seq.output_ids)[:-1]  # (the last one has no KV yet)
            self.prefix.store(seq.pinned, tokens, self.batch.cache, self.batch.seqs.index(seq))
        if seq.pinned is not None:
            self.adapters.unpin(seq.pinned)
            seq.pinned = None
        outcome = {"error": "failed", "cancelled": "cancelled"}.get(seq.finish_reason, "finished")
        self.metrics.record_request(seq.stats(), outcome=outcome, slo=seq.slo)
        if result is None:  # (in an iteration: after update(), by EngineCore.iterate)
            deliver(seq)

    def cancel(self, seq: Sequence) -> None:
        """A request the scheduler dropped (the caller cancelled it)."""
        seq.finish_reason = "cancelled"
        self._end(seq)

    def fail(self, seq: Sequence, error: Exception) -> None:
        """A request the scheduler dropped because the engine cannot go on with it."""
        seq.finish_reason, seq.error = "error", f"{type(error).__name__}: {error}"
        self._end(seq)

    def _publish_training(self, samples: int, tokens: int) -> None:
        job = self.trainer.current or next(reversed(self.trainer.jobs.values()), None)
        summary = {"job": None, "loss": None, "step": None, "total_steps": None, "state": None}
        if job is not None:
            summary = {
                "job": job.id,
                "adapter": job.adapter,
                "state": job.state.value,
                "loss": job.loss_history[-1][1] if job.loss_history else None,
                "step": job.step,
                "total_steps": job.total_steps,
            }
        self.metrics.record_training(
            samples=samples, tokens=tokens, loss=summary["loss"] if samples else None, job=summary
        )


def deliver(seq: Sequence) -> None:
    """A request's final event ("done" or "error")."""
    try:
        seq.stream.put(seq.final_event())
    except Exception:
        log.exception("stream consumer failed for %s", seq.request_id)


class RideAlong:
    """Training units that run inside an inference pass (heterogeneous batching): when the pass
    reaches the layer whose forward is the micro-step's next unit, that unit runs too, while
    the layer is fetched. Called by the layer walk with each layer's index."""

    def __init__(self, trainer: Trainer, runner: Runner, units: int, examples: int):
        self.trainer, self.left = trainer, units
        self.seconds: list[float] = []
        progress = trainer.work(0, examples or None)  # the micro-step under way, or a new one
        self.first, self.padded = progress.first, progress.padded
        self.offload = runner.walk.offload

    def __call__(self, layer: int) -> None:
        run = self.trainer.run
        if not self.left or run is None or run.next_layer != layer:
            return
        progress = self.trainer.work(1)
        self.seconds += progress.seconds
        self.left -= 1
        if self.offload is not None:
            self.offload.shared_use(layer)
