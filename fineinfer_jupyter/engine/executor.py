"""Runs the step the scheduler picked, on the engine thread: a prefill, a decode or a training
micro-step. Streams the new tokens, finishes and fails requests, and feeds the measured step
times to the cost model and the metrics. The Engine owns the thread and the public API; this
owns what happens in one step (where layer offload will stream the weights through)."""

from __future__ import annotations

import logging
import threading
import time

import torch

from .adapters import AdapterStore
from .batch import Batch
from .config import SamplingParams, Slo
from .costmodel import CostModel
from .metrics import Metrics
from .runner import Runner
from .scheduler import Scheduler, Step, StepKind
from .sequence import Sequence, Status
from .training import Trainer

log = logging.getLogger("fineinfer")


class Executor:
    def __init__(
        self,
        *,
        runner: Runner,
        adapters: AdapterStore,
        trainer: Trainer,
        scheduler: Scheduler,
        costs: CostModel,
        metrics: Metrics,
        tokenizer,
        tokenizer_lock: threading.Lock,
        eos_ids: set[int],
        slo: Slo,
        requests: dict[str, Sequence],
    ):
        self.runner, self.adapters, self.trainer = runner, adapters, trainer
        self.scheduler, self.costs, self.metrics = scheduler, costs, metrics
        self.tokenizer, self.tokenizer_lock, self.eos_ids = tokenizer, tokenizer_lock, eos_ids
        self.slo = slo  # default targets, for the calibration requests
        self.requests = requests  # the engine's live requests by id: finished ones leave it

    def calibrate(self) -> None:
        """Measure prefill, decode and (forward and backward) training steps once, so the
        scheduler plans with this machine's figures from the first step on (also warms the
        kernels up)."""
        sampling = SamplingParams(max_new_tokens=2)
        for n in (16, 16, 64):
            seq = Sequence(
                [self.eos_ids and min(self.eos_ids) or 0] * n, sampling=sampling, slo=self.slo
            )
            start = time.perf_counter()
            cache, mask, _ = self.runner.prefill([seq])
            self.costs.observe("prefill", n, time.perf_counter() - start)
        batch = Batch()
        batch.join([seq], cache, mask)
        seq.output_ids.append(0)
        for _ in range(2):
            start = time.perf_counter()
            self.runner.decode(batch)
            self.costs.observe("decode", 1, time.perf_counter() - start)
        for rows, length in ((1, 16), (1, 32), (2, 64)):  # a micro-step's fixed and per-token cost
            start = time.perf_counter()
            self.runner.train_probe(rows, length)
            self.costs.observe("train", rows * length, time.perf_counter() - start)

    def run(self, step: Step) -> None:
        kind = step.kind.value
        self.metrics.step_started_now(kind)
        start = time.perf_counter()
        rows = tokens = 0
        if step.kind is StepKind.PREFILL:
            self._prefill(step.seqs)
            rows, tokens = len(step.seqs), sum(s.num_prompt_tokens for s in step.seqs)
        elif step.kind is StepKind.DECODE:
            rows = tokens = len(step.seqs)
            self._decode(step.seqs)
            self.costs.observe("decode", rows, time.perf_counter() - start)
        elif step.kind is StepKind.TRAIN:
            rows, tokens, padded, optimizer = self.trainer.step(step.train_examples or None)
            if rows:
                self.costs.observe("train", padded, time.perf_counter() - start - optimizer)
                if optimizer:
                    self.costs.observe("optimizer", 1, optimizer)
            self._publish_training(rows, tokens)
        self.metrics.record_step(kind, time.perf_counter() - start, rows=rows, tokens=tokens)
        self.publish_queue()

    def _prefill(self, seqs: list[Sequence]) -> None:
        admitted = []
        for seq in seqs:
            self.scheduler.admitted(seq)
            seq.admitted = time.monotonic()
            seq.slack_at_admission = seq.ttft_deadline - seq.admitted
            try:
                if seq.adapter is not None:
                    seq.adapter = self.adapters.pin(seq.adapter)  # a training adapter's snapshot
                admitted.append(seq)
            except Exception as e:
                self.fail(seq, e)
        for group in self.scheduler.prefill_passes(admitted, time.monotonic()):
            start = time.perf_counter()
            try:
                cache, mask, logits = self.runner.prefill(group)
                tokens = self.runner.sample(logits, group)
            except Exception as e:  # this pass failed: its rows fail, the rest go on
                for seq in group:
                    self.fail(seq, e)
                continue
            self.costs.observe(
                "prefill", self.scheduler.pass_tokens(group), time.perf_counter() - start
            )
            for seq, token in zip(group, tokens, strict=True):
                self._append(seq, token)
            keep = [i for i, s in enumerate(group) if not s.is_finished]
            if keep:
                if len(keep) < len(group):
                    cache.batch_select_indices(torch.tensor(keep, device=mask.device))
                    mask = mask[keep]
                self.scheduler.batch.join([group[i] for i in keep], cache, mask)

    def _decode(self, seqs: list[Sequence]) -> None:
        batch = self.scheduler.batch
        try:
            logits = self.runner.decode(batch)
        except Exception as e:  # the whole pass failed: every row in it fails, the engine goes on
            for seq in seqs:
                self.fail(seq, e)
            batch.keep([])
            return
        tokens = self.runner.sample(logits, seqs)
        for seq, token in zip(seqs, tokens, strict=True):
            self._append(seq, token)
        batch.keep([i for i, s in enumerate(seqs) if not s.is_finished])

    def _append(self, seq: Sequence, token: int) -> None:
        """Add one sampled token: stop checks, incremental text, the stream."""
        try:
            seq.output_ids.append(token)
            seq.token_times.append(time.monotonic())
            with self.tokenizer_lock:
                text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            delta = seq.update_text(text, eos=token in self.eos_ids)
            if delta:
                seq.stream.put({"type": "delta", "text": delta})
            if seq.finish_reason:
                self.finish(seq)
        except Exception as e:
            self.fail(seq, e)

    def finish(self, seq: Sequence, outcome: str = "finished") -> None:
        seq.status = Status.FINISHED
        self._unpin(seq)
        self.requests.pop(seq.request_id, None)
        self.metrics.record_request(
            seq.stats(), outcome=outcome, ttft_target=seq.slo.ttft, tpot_target=seq.slo.tpot
        )
        try:
            seq.stream.put(seq.final_event())
        except Exception:
            log.exception("stream consumer failed for %s", seq.request_id)

    def fail(self, seq: Sequence, error: Exception) -> None:
        log.warning("request %s failed: %s", seq.request_id, error)
        seq.status, seq.finish_reason = Status.FINISHED, "error"
        self._unpin(seq)
        self.requests.pop(seq.request_id, None)
        self.metrics.record_request(
            seq.stats(), outcome="failed", ttft_target=seq.slo.ttft, tpot_target=seq.slo.tpot
        )
        try:
            seq.stream.put(
                {
                    "type": "error",
                    "id": seq.request_id,
                    "message": f"{type(error).__name__}: {error}",
                }
            )
        except Exception:
            log.exception("stream consumer failed for %s", seq.request_id)

    def _unpin(self, seq: Sequence) -> None:
        if seq.admitted is not None:
            self.adapters.unpin(seq.adapter)

    def _publish_training(self, samples: int, tokens: int) -> None:
        job = self.trainer.current or next((j for j in reversed(self.trainer.jobs.values())), None)
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

    def reap_cancelled(self) -> None:
        for seq in self.scheduler.drop(lambda s: s.cancelled or s.is_finished):
            if not seq.is_finished:
                seq.finish_reason = "cancelled"
                self.finish(seq, "cancelled")

    def publish_queue(self) -> None:
        sched, now = self.scheduler, time.monotonic()
        waiting = sorted(sched.waiting, key=sched.ttft_due)
        slack = sched.prefill_slack(now, waiting, sched.batch.seqs) if waiting else None
        self.metrics.record_queue(
            waiting=len(waiting), running=self.scheduler.num_running, slack=slack
        )
