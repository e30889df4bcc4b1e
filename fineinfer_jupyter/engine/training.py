"""LoRA fine-tuning jobs: a queue, one job training at a time, one micro-step per call.

Words (docs/design.md): a micro-step is one forward and backward over part of the current
effective batch; an (optimizer) step updates the weights once the effective batch is complete,
and a job's `step` counts those. Checkpoints (PEFT adapter files plus the trainer state) go
under <model folder>/jobs/<id>/; a finished or stopped adapter is also saved under
<model folder>/adapters/<name>/ and stays loaded for inference. Every job's record (job.py) is
read back at start: a job that was queued or running when the process ended is "interrupted"
and resumes from its last checkpoint (docs/design.md).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

import psutil
import torch
from peft import LoraConfig
from transformers import get_cosine_schedule_with_warmup

from .adapters import AdapterStore
from .config import NameTaken, TrainParams, UnknownName, check, check_adapter_name
from .data import Dataset, Example, collate
from .job import (
    RECORDS,
    RESUMABLE,
    Job,
    JobState,
    checkpoint_step,
    latest_checkpoint,
    write_record,
)
from .oom import free_memory, is_oom
from .runner import Runner
from .storage import atomic_dir, atomic_write, is_scratch, recover
from .walk import TrainingPass

log = logging.getLogger("fineinfer")
KEEP_CHECKPOINTS = 2
# Test-only hooks (tests/test_crash.py, docs/design.md "Faults"), read once per Trainer: a job
# that has made HOLD_STEP optimizer steps waits there, before its next micro-step, while the
# file HOLD_FILE exists (or for good without one), so a test acts at a known step.
HOLD_STEP, HOLD_FILE = "FINEINFER_TEST_HOLD_STEP", "FINEINFER_TEST_HOLD_FILE"
EVAL_SAMPLE = 16  # held-out examples the automatic validation passes before the last score
# The second stream doubles the activations in memory (two micro-steps at once), and a CPU
# process that runs out is killed, not told: it begins a micro-step only while the memory
# available exceeds twice this estimate of one's plus SIDE_RESERVE (docs/design.md, "The second
# stream"). Per token: each layer keeps ~24 hidden-wide tensors for its backward (attention's
# q/k/v/output, norms, residuals, the gated MLP's ~3.5x-wide gate/up/product), the head ~2
# vocabulary-wide float32 rows (its logits and their gradient).
SIDE_ACTIVATIONS, SIDE_RESERVE = 24, 1 << 30


def available_memory() -> int:
    """Bytes of memory the OS can give this process now (psutil: MemAvailable on Linux)."""
    return psutil.virtual_memory().available


class MicroStep(NamedTuple):
    examples: int
    tokens: int  # real tokens, for throughput
    padded: int  # tokens computed: examples x the longest, what the micro-step's time scales with
    optimizer: float = 0.0  # seconds of it spent in the optimizer step (the batch's last one)


NO_STEP = MicroStep(0, 0, 0)


class Progress(NamedTuple):
    """What one call of Trainer.work ran."""

    seconds: list[float]  # of each unit run, in order
    first: int  # the index of the first of them in its micro-step
    padded: int  # padded tokens of that micro-step
    step: MicroStep | None = None  # the micro-step, when it ended here


NO_PROGRESS = Progress([], 0, 0)


class Trainer:
    def __init__(self, runner: Runner, adapters: AdapterStore, *, root: Path, pad_id: int):
        self.runner, self.adapters, self.root, self.pad_id = runner, adapters, root, pad_id
        self.jobs: dict[str, Job] = {}
        self.queue: deque[Job] = deque()
        self.current: Job | None = None
        self.run: TrainingPass | None = None  # the current job's micro-step in progress
        # split mode's second stream (docs/design.md, "The training worker"): a later micro-step
        # of the same effective batch, run by the engine thread when it has nothing to serve
        # while the worker runs `run`
        self.side: TrainingPass | None = None
        # every micro-step begun and not ended yet, in the effective batch's order, with its
        # examples: they end (their loss and gradients added) in this order only
        self._flight: list[tuple[TrainingPass, list[Example]]] = []
        self.busy = False  # `run` is running on the training worker now (Executor sets it)
        self._ids = itertools.count(1)
        self.root.mkdir(parents=True, exist_ok=True)
        hold = os.environ.get(HOLD_STEP)
        self.hold = (int(hold), os.environ.get(HOLD_FILE)) if hold else None  # (test-only)

    @property
    def active(self) -> bool:
        return self.current is not None or bool(self.queue)

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise UnknownName(f"job: no job {job_id!r}")
        return self.jobs[job_id]

    def submit(
        self,
        adapter: str,
        dataset: Dataset,
        params: TrainParams,
        *,
        source: dict | None = None,
        records: list[dict] | None = None,
    ) -> Job:
        """Queue a job. `source` says where its data file is (data.fingerprint); inline
        `records` are kept with the job instead, so that it can resume after a restart."""
        check_adapter_name(adapter)
        if adapter in self.adapters or any(
            j.adapter == adapter and j.active for j in self.jobs.values()
        ):
            raise NameTaken(
                f"adapter: {adapter!r} exists already; pick another name or delete it first"
            )
        job_id = self._new_id()
        job = Job(job_id, adapter, params, dataset, self.root / job_id, source=source)
        if records is not None:
            lines = (json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
            atomic_write(job.folder / RECORDS, "".join(lines))
            job.source = {**(source or {}), "records": RECORDS}
        self._write_job(job)
        self.jobs[job_id] = job
        self.queue.append(job)
        return job

    def load(self) -> list[Job]:
        """Read every job's record back (at engine start). A job that was queued or running
        when the process ended is interrupted, at its last complete checkpoint."""
        numbers = [0]
        loaded = []
        for folder in self.root.iterdir():
            if not folder.is_dir() or is_scratch(folder) or not (folder / "job.json").is_file():
                continue
            try:
                job = Job.from_record(json.loads((folder / "job.json").read_text()), folder)
                check(job.id == folder.name, "job", f"{folder.name}/job.json is {job.id}'s")
                last = latest_checkpoint(folder)
                job.checkpoint = str(last) if last else None
                if job.state in (JobState.QUEUED, JobState.RUNNING):
                    job.state = JobState.INTERRUPTED
                    job.step = checkpoint_step(last) if last else 0
                    job.loss_history = [p for p in job.loss_history if p[0] <= job.step]
                    job.eval_history = [p for p in job.eval_history if p[0] <= job.step]
                    self._write_job(job)
            except Exception:
                log.exception("job record %s does not read; skipped", folder)
                continue
            loaded.append(job)
            number = job.id.removeprefix("job-")
            if number.isdigit():
                numbers.append(int(number))
        for job in sorted(loaded, key=lambda j: (j.created, j.id)):
            self.jobs[job.id] = job
        self._ids = itertools.count(max(numbers) + 1)
        return loaded

    def _new_id(self) -> str:
        while True:
            job_id = f"job-{next(self._ids)}"
            if job_id not in self.jobs and not (self.root / job_id).exists():
                return job_id

    def _next_job(self) -> Job | None:
        return self.current or (self.queue[0] if self.queue else None)

    def max_examples(self) -> int:
        job = self._next_job()
        return _micro(job) if job else 0

    def in_progress(self) -> tuple[int, int, bool] | None:
        """(padded tokens, units done, whether it ends the effective batch) of the micro-step
        under way, if any."""
        if self.run is None:
            return None
        return self.run.padded, self.run.done, self._ends_batch(self.run)

    def side_progress(self) -> tuple[int, int, bool] | None:
        """As in_progress, for the second stream's micro-step under way."""
        if self.side is None:
            return None
        return self.side.padded, self.side.done, self._ends_batch(self.side)

    def side_ready(self) -> bool:
        """The second stream has a micro-step to run beside `run` (split mode): its own under
        way, or a later one of the effective batch `run` belongs to (never a new batch's: its
        optimizer step waits for every micro-step in flight)."""
        job = self.current
        if job is None or self.run is None or not self.runner.walk.supported:
            return False  # (own gradients need the walk's units: TrainingPass.grads)
        if self.side is not None:
            return True
        return bool(job.pending) and available_memory() > 2 * self._side_bytes(job) + SIDE_RESERVE

    def _side_bytes(self, job: Job) -> int:
        """An estimate of what a new second-stream micro-step would hold in memory at its
        peak (its activations: SIDE_ACTIVATIONS)."""
        examples = [job.dataset.train[i] for i in job.pending[: _micro(job)]]
        tokens = len(examples) * max(e.num_tokens for e in examples)
        config = self.runner.config.get_text_config()
        element = 2 if self.runner.autocast is not None else 4  # (bf16 autocast, else float32)
        layer = config.num_hidden_layers * config.hidden_size * SIDE_ACTIVATIONS * element
        return tokens * (layer + 2 * 4 * config.vocab_size)

    def _ends_batch(self, run: TrainingPass) -> bool:
        unfinished = [r for r, _ in self._flight if not r.finished]
        return not self.current.pending and unfinished == [run]

    def next_tokens(self) -> list[int]:
        """Token counts of the examples left in the current effective batch, in the order they
        will be trained, for the scheduler's cost estimate."""
        job = self._next_job()
        if job is None:
            return []
        pending = job.pending or _longest_first(job, job.step)
        return [job.dataset.train[i].num_tokens for i in pending]

    def micro_step(self, max_examples: int | None = None) -> MicroStep:
        """A whole micro-step of the current job (or the rest of the one in progress)."""
        return self.work(1 << 30, max_examples).step or NO_STEP

    def work(self, units: int, max_examples: int | None = None) -> Progress:
        """Run up to `units` units of the current job's micro-step in progress, or of a new one
        on at most `max_examples` examples (starting the next queued job if needed). A
        failure fails the job (its last checkpoint stays), never the caller."""
        run = self.prepare(max_examples)
        if run is None:
            return NO_PROGRESS
        first = run.done
        try:
            seconds = run.run(units, sync=self.runner.sync)
        except Exception as e:
            return self.collect(first, [], e)
        return self.collect(first, seconds)

    def prepare(self, max_examples: int | None = None) -> TrainingPass | None:
        """The current job's micro-step in progress, or a new one on at most `max_examples`
        examples (starting the next queued job if needed); None: nothing to run now. What
        work() does before running units; the training worker runs them (Executor)."""
        job = self.current
        if job is None:
            if not self.queue:
                return None
            job = self.current = self.queue.popleft()
            try:
                self._start(job)
            except Exception as e:
                self._fail(job, e)
                return None
        if self.run is None and not self._flight and self._held(job):
            time.sleep(0.02)  # (test-only: the engine loop goes on, slowly)
            return None
        if self.run is None and not job.pending and self.side is not None:
            self.run, self.side = self.side, None  # the batch's last one: this stream finishes it
        if self.run is None:
            try:
                self.run = self._begin_micro_step(job, max_examples)
            except Exception as e:
                self._fail(job, e)
                return None
        return self.run

    def work_side(self, units: int, max_examples: int | None, stop=None) -> Progress:
        """The second stream (engine thread, while the worker runs `run`): up to `units` units
        of its micro-step under way, or of a new one on at most `max_examples` of the batch's
        examples still pending; `stop()`, asked after each unit, ends the call early. A
        failure raises: the caller waits for the worker's run first, then fail_side()."""
        job = self.current
        if not self.side_ready():
            return NO_PROGRESS
        if self.side is None:
            self.side = self._begin_micro_step(job, max_examples)
        run, first = self.side, self.side.done
        seconds = run.run(units, sync=self.runner.sync, stop=stop)
        if run.finished:
            self.side = None
        return Progress(seconds, first, run.padded, self._end_ready(job))

    def fail_side(self, error: Exception) -> Progress:
        """The second stream's micro-step failed (the worker's run has ended): as collect()
        does with a failure (a smaller retry after running out of memory, else the job fails)."""
        job = self.current
        return NO_PROGRESS if job is None else self._failed(job, error, self.side)

    def _failed(self, job: Job, error: Exception, run: TrainingPass | None) -> Progress:
        """Micro-step `run` failed with `error`: a smaller retry of its effective batch after
        running out of memory, else the job fails (its last checkpoint stays)."""
        try:
            if is_oom(error) and self._retry_smaller(job, error, run):
                return NO_PROGRESS
            raise error
        except Exception as e:
            self._fail(job, e)
            return NO_PROGRESS

    def collect(self, first: int, seconds: list[float], error: Exception | None = None) -> Progress:
        """After units of the prepared micro-step ran (from its unit `first`, each taking
        `seconds`) or failed with `error`: its end once its last unit ran (the optimizer step
        after an effective batch's last), a smaller retry after running out of memory, or the
        job failed."""
        job, run = self.current, self.run
        if job is None or run is None:
            return NO_PROGRESS  # (the job ended meanwhile)
        if error is not None:
            return self._failed(job, error, run)
        try:
            if run.finished:
                self.run = None
            step = self._end_ready(job)
        except Exception as e:
            self._fail(job, e)
            return NO_PROGRESS
        return Progress(seconds, first, run.padded, step)

    def _held(self, job: Job) -> bool:
        """The test-only hold (HOLD_STEP): at that step, between two effective batches."""
        if self.hold is None or job.step < self.hold[0] or job.pending:
            return False
        return self.hold[1] is None or os.path.exists(self.hold[1])

    def _begin_micro_step(self, job: Job, max_examples: int | None) -> TrainingPass:
        if not job.pending:
            self._begin_batch(job)
        micro = _micro(job)
        k = min(micro, max_examples or micro, len(job.pending))
        take, job.pending = job.pending[:k], job.pending[k:]
        examples = [job.dataset.train[i] for i in take]
        run = self.runner.micro_step(
            collate(examples, self.pad_id), scale=1.0 / job.batch_tokens, own_grads=True
        )
        run.padded = k * max(e.num_tokens for e in examples)
        self._flight.append((run, examples))
        return run

    def _end_ready(self, job: Job) -> MicroStep | None:
        """End the micro-steps in flight that are finished and first in the batch's order (their
        loss and gradients added in that order: the sums do not depend on which stream ran
        which, or when), then the optimizer step once the effective batch has ended."""
        ended = []
        while self._flight and self._flight[0][0].finished:
            run, examples = self._flight.pop(0)
            loss = run.loss_sum
            check(math.isfinite(loss), "loss", f"is {loss} at step {job.step + 1}")
            job.loss_sum += loss
            run.add_grads()
            tokens = sum(e.num_tokens for e in examples)
            job.tokens_done += tokens
            job.samples_done += len(examples)
            job.rates.micro_step(len(examples), tokens)
            ended.append(MicroStep(len(examples), tokens, run.padded))
        if not ended:
            return None
        optimizer = time.perf_counter()
        if not job.pending and not self._flight:
            self._optimizer_step(job)
        optimizer = time.perf_counter() - optimizer
        examples, tokens, padded = (sum(column) for column in list(zip(*ended, strict=True))[:3])
        return MicroStep(examples, tokens, padded, optimizer)

    def _drop_flight(self) -> None:
        """Every micro-step in flight dropped (their gradients with them)."""
        self.run = self.side = None
        self._flight = []

    def _retry_smaller(self, job: Job, error: Exception, failed: TrainingPass | None) -> bool:
        """Out of memory in a micro-step: its effective batch starts again, half as many
        examples at a time (the same gradient in the end). One example alone fails the job."""
        examples = next((group for r, group in self._flight if r is failed), [])
        self._drop_flight()
        free_memory()
        if len(examples) <= 1:
            n = examples[0].num_tokens if examples else 0
            raise MemoryError(
                f"out of memory: one example of {n} tokens does not fit; lower params.max_length"
            ) from error
        job.micro_cap = len(examples) // 2
        job.pending = []  # the batch starts again: the gradients it had so far are dropped
        job.rates.discard()
        log.warning(
            "job %s: out of memory in a micro-step of %d examples; now %d at a time",
            job.id,
            len(examples),
            job.micro_cap,
        )
        return True

    def _start(self, job: Job) -> None:
        p = job.params
        self.check_owner(job)
        job.folder.mkdir(parents=True, exist_ok=True)
        if job.adapter not in self.adapters:
            config = LoraConfig(
                r=p.r,
                lora_alpha=p.lora_alpha,
                target_modules=p.target_modules,
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(p.seed)  # LoRA A's initialisation
                self.adapters.create(job.adapter, config, job=job.id)
        params = self.adapters.begin_training(job.adapter)
        job.owns_adapter = True
        job.optimizer = torch.optim.AdamW(params, lr=p.learning_rate, weight_decay=p.weight_decay)
        job.lr_scheduler = get_cosine_schedule_with_warmup(
            job.optimizer, p.warmup_steps, job.total_steps
        )
        if job.resume_from is not None:
            self._load_checkpoint(job, job.resume_from)
        self.adapters.trained(job.adapter, job.step)
        job.pending, job.state = [], JobState.RUNNING
        job.rates.started()
        self._write_job(job)

    def _begin_batch(self, job: Job) -> None:
        job.pending = _longest_first(job, job.step)
        job.batch_tokens = sum(_label_tokens(job.dataset.train[i]) for i in job.pending)
        job.loss_sum = 0.0
        job.optimizer.zero_grad(set_to_none=True)

    def _optimizer_step(self, job: Job) -> None:
        p = job.params
        if p.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(_params(job.optimizer), p.max_grad_norm)
        job.optimizer.step()
        job.lr_scheduler.step()
        job.optimizer.zero_grad(set_to_none=True)
        job.step += 1
        job.rates.optimizer_step()
        job.loss_history.append((job.step, job.loss_sum / job.batch_tokens))
        self.adapters.trained(job.adapter, job.step)
        last = job.step >= job.total_steps
        if job.dataset.val and (last or job.step % job.eval_every == 0):
            # the pass runs whole, here: with eval_every 0, the passes before the last score a
            # sample, so that requests wait less (docs/design.md, "Training length")
            sample = not last and not p.eval_every
            job.eval_loss = self._eval(job, EVAL_SAMPLE if sample else None)
            job.eval_history.append((job.step, job.eval_loss))
        if last:
            self._finish(job, JobState.DONE)
        elif job.step % p.checkpoint_every == 0:
            self._save_checkpoint(job)
            self._write_job(job)

    def _eval(self, job: Job, limit: int | None = None) -> float:
        total = n = 0
        val = job.dataset.val[:limit]
        for i in range(0, len(val), job.params.micro_batch_size):
            s, k = self.runner.eval_loss(
                collate(val[i : i + job.params.micro_batch_size], self.pad_id)
            )
            total, n = total + s, n + k
        return total / max(n, 1)

    # -- control (engine thread) --------------------------------------------------------------

    def stop(self, job_id: str) -> Job:
        """Checkpoint at the last optimizer step, save the adapter, stop. Resumable."""
        job = self.get(job_id)
        if job.state == JobState.QUEUED:
            self.queue.remove(job)
            job.state = JobState.STOPPED
            self._write_job(job)
        elif job.state == JobState.RUNNING:
            self._finish(job, JobState.STOPPED)
        else:
            check(False, "job", f"{job_id} is {job.state.value}, not running or queued")
        return job

    def resume(self, job_id: str, dataset: Dataset | None = None) -> Job:
        """Queue a stopped, failed or interrupted job again, from its last checkpoint. A job
        read back at start needs its data set built again (`dataset`, Engine.resume_job)."""
        job = self.get(job_id)
        check(
            job.state in RESUMABLE,
            "job",
            f"{job_id} is {job.state.value}; only stopped, failed or interrupted jobs resume",
        )
        check(
            job.checkpoint is not None or job.step == 0,
            "job",
            f"{job_id} has no checkpoint to resume from",
        )
        self.check_owner(job)
        job.dataset = dataset or job.dataset
        check(job.dataset is not None, "job", f"{job_id}: its data set is not loaded")
        job.resume_from = Path(job.checkpoint) if job.checkpoint else None
        job.state, job.error = JobState.QUEUED, None
        self.queue.append(job)
        self._write_job(job)
        return job

    def check_owner(self, job: Job) -> None:
        """Only the job that trained an adapter trains it again: resuming never takes over a
        name that another job or a load has given to another adapter since (NameTaken)."""
        name = job.adapter
        other = next(
            (j for j in self.jobs.values() if j is not job and j.adapter == name and j.active),
            None,
        )
        if other is not None:
            raise NameTaken(f"adapter: {other.id} is training {name!r}; {job.id} cannot resume")
        owner = self.adapters.owner(name)
        if owner is not None and owner != job.id:
            raise NameTaken(
                f"adapter: {name!r} is now {owner}; resuming {job.id} would overwrite it "
                "(delete that adapter first)"
            )

    def interrupt(self) -> None:
        """At shutdown: the running job checkpoints its last optimizer step and saves its
        adapter; it and the queued jobs are interrupted (resumable at the next start)."""
        job = self.current
        if job is not None and job.state is JobState.RUNNING and job.optimizer is not None:
            self._finish(job, JobState.INTERRUPTED)
        for job in self.queue:
            job.state = JobState.INTERRUPTED
            self._write_job(job)
        self.queue.clear()

    def cancel(self, job_id: str) -> Job:
        """Stop without saving: the adapter goes back to its last saved state (or away)."""
        job = self.get(job_id)
        check(job.active, "job", f"{job_id} is {job.state.value}, not running or queued")
        if job.state == JobState.QUEUED:
            self.queue.remove(job)
        else:
            self._release(job)
        job.state = JobState.CANCELLED
        self._write_job(job)
        return job

    # -- endings ----------------------------------------------------------------------------------

    def _finish(self, job: Job, state: JobState) -> None:
        job.pending = []  # a partial effective batch is dropped; its gradients too
        self._drop_flight()
        job.optimizer.zero_grad(set_to_none=True)
        self._save_checkpoint(job)
        folder = self.adapters.root / job.adapter
        loss = job.loss_history[-1][1] if job.loss_history else None
        self.adapters.save(job.adapter, folder, {"step": job.step, "job": job.id, "loss": loss})
        self.adapters.end_training(job.adapter, job.step, folder)
        job.state, job.optimizer, job.lr_scheduler = state, None, None
        job.owns_adapter = False
        self.current = None
        self._write_job(job)

    def _fail(self, job: Job, error: Exception) -> None:
        log.error("job %s (%s) failed", job.id, job.adapter, exc_info=error)
        job.error = f"{type(error).__name__}: {error}"
        job.state = JobState.FAILED
        try:
            self._release(job)
        except Exception:
            log.exception("job %s: could not put adapter %s back", job.id, job.adapter)
        try:
            self._write_job(job)
        except Exception:
            log.exception("job %s: could not write its record", job.id)

    def _release(self, job: Job) -> None:
        """Put the adapter back to its last checkpoint's weights (or drop it) and free the
        slot."""
        job.pending, job.optimizer, job.lr_scheduler = [], None, None
        if self.current is job:
            self.current = None
            self._drop_flight()
        owned, job.owns_adapter = job.owns_adapter, False
        name = job.adapter
        if not owned or name not in self.adapters:
            return
        if job.checkpoint:
            folder = Path(job.checkpoint)
            step = checkpoint_step(folder)
            self.adapters.restore(name, folder, step=step)
            self.adapters.end_training(name, step, None)
        else:
            self.adapters.end_training(name, 0, None)
            self.adapters.delete(name)

    # -- files ------------------------------------------------------------------------------------

    def _save_checkpoint(self, job: Job) -> None:
        folder = job.folder / f"checkpoint-{job.step:06d}"
        state = {
            "step": job.step,
            "optimizer": job.optimizer.state_dict() if job.optimizer else None,
            "lr_scheduler": job.lr_scheduler.state_dict() if job.lr_scheduler else None,
            "loss_history": job.loss_history,
            "eval_loss": job.eval_loss,
            "eval_history": job.eval_history,
            "tokens_done": job.tokens_done,
            "samples_done": job.samples_done,
            "rng": torch.get_rng_state(),
        }
        with atomic_dir(folder) as tmp:
            self.adapters.write(job.adapter, tmp, {"step": job.step, "job": job.id})
            torch.save(state, tmp / "trainer_state.pt")
        job.checkpoint = str(folder)
        for old in sorted(job.folder.glob("checkpoint-*"))[:-KEEP_CHECKPOINTS]:
            if old.name[len("checkpoint-") :].isdigit():
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, job: Job, folder: Path) -> None:
        recover(folder)
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        self.adapters.restore(job.adapter, folder, step=state["step"])
        job.step = state["step"]
        if state["optimizer"] is not None:
            job.optimizer.load_state_dict(state["optimizer"])
            job.lr_scheduler.load_state_dict(state["lr_scheduler"])
        job.loss_history = [tuple(p) for p in state["loss_history"]]
        job.eval_loss = state["eval_loss"]
        job.eval_history = [tuple(p) for p in state.get("eval_history") or []]
        job.tokens_done, job.samples_done = state["tokens_done"], state["samples_done"]
        torch.set_rng_state(state["rng"])

    def _write_job(self, job: Job) -> None:
        write_record(job)


def _micro(job: Job) -> int:
    return min(job.params.micro_batch_size, job.micro_cap or job.params.micro_batch_size)


def _longest_first(job: Job, step: int) -> list[int]:
    """Optimizer step `step`'s examples (Job.batch_indices), the longest first (ties in the
    batch's order): each micro-step pads its examples to its longest, so examples of about the
    same length share one, and the effective batch's gradient (a sum scaled by its label
    tokens) is the same whichever micro-step an example is in (docs/design.md, "The life of a
    training job")."""
    train = job.dataset.train
    return sorted(job.batch_indices(step), key=lambda i: -train[i].num_tokens)


def _label_tokens(example: Example) -> int:
    return sum(1 for t in example.labels[1:] if t != -100)


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
