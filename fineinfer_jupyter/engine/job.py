"""A training job's state and its files: what it trains, how far it is, its record
(jobs/<id>/job.json, read back at start) and its checkpoints (docs/design.md, "The life of a
training job" and "The data directory")."""

from __future__ import annotations

import json
import math
import random
import time
from enum import Enum
from pathlib import Path

import torch

from .config import TrainParams
from .data import Dataset
from .storage import atomic_write, recover_all

RECORDS = "records.jsonl"  # a job's inline training records, kept with it
# the training length when neither epochs nor max_steps is given (docs/design.md, "Training
# length"): at least one epoch; a small data set is seen again until MIN_STEPS optimizer steps
# or MAX_EPOCHS epochs, whichever comes first
MIN_STEPS, MAX_EPOCHS = 150, 15
FALLING = 0.03  # the last quarter of the losses this much below the quarter before: still falling
EVALS = 10  # eval passes over a job, when eval_every is 0


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    STOPPED = "stopped"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # queued or running when the process ended; resumable


RESUMABLE = (JobState.STOPPED, JobState.FAILED, JobState.INTERRUPTED)


class Job:
    def __init__(
        self,
        job_id: str,
        adapter: str,
        params: TrainParams,
        dataset: Dataset | None,
        folder: Path,
        *,
        source: dict | None = None,
        examples: int | None = None,
        val_examples: int = 0,
    ):
        self.id, self.adapter, self.params = job_id, adapter, params
        self.dataset, self.folder = dataset, folder  # dataset: None until a reloaded job resumes
        self.source = source  # how to build the data set again (Engine.tune, data.fingerprint)
        self.examples = len(dataset.train) if dataset is not None else examples
        self.val_examples = len(dataset.val) if dataset is not None else val_examples
        self.state = JobState.QUEUED
        self.error: str | None = None
        n = self.examples
        self.steps_per_epoch = math.ceil(n / params.batch_size)
        self.total_steps = planned_steps(params, self.steps_per_epoch)
        self.step = 0  # optimizer steps done
        self.loss_history: list[tuple[int, float]] = []
        self.eval_loss: float | None = None
        self.eval_history: list[tuple[int, float]] = []
        self.checkpoint: str | None = None
        self.pending: list[int] = []  # examples of the current effective batch still to run
        self.batch_tokens = 0  # label tokens of the whole current effective batch
        self.loss_sum = 0.0
        self.tokens_done = self.samples_done = 0
        self.rates = Rates()
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler = None
        self.resume_from: Path | None = None
        self.owns_adapter = False  # it is training its adapter now (only then may it touch it)
        self.micro_cap: int | None = None  # examples per micro-step after running out of memory
        self.created = time.time()

    @classmethod
    def from_record(cls, record: dict, folder: Path) -> Job:
        """A job read back from its job.json (without its data set)."""
        job = cls(
            record["id"],
            record["adapter"],
            TrainParams.from_dict(record["params"]),
            None,
            folder,
            source=record.get("source"),
            examples=int(record["examples"]),
            val_examples=int(record.get("val_examples") or 0),
        )
        job.state = JobState(record["state"])
        job.error = record.get("error")
        job.step = int(record.get("step") or 0)
        job.total_steps = int(record.get("total_steps") or job.total_steps)
        job.loss_history = [(int(s), float(v)) for s, v in record.get("loss_history") or []]
        job.eval_loss = record.get("eval_loss")
        job.eval_history = [(int(s), float(v)) for s, v in record.get("eval_history") or []]
        job.created = float(record.get("created") or job.created)
        return job

    @property
    def epoch(self) -> float:
        return self.step * self.params.batch_size / max(1, self.examples)

    @property
    def auto_length(self) -> bool:
        """Its length came from planned_steps' rule (no epochs or max_steps given)."""
        return self.params.epochs is None and self.params.max_steps is None

    @property
    def eval_every(self) -> int:
        return self.params.eval_every or max(1, self.total_steps // EVALS)

    @property
    def active(self) -> bool:
        return self.state in (JobState.QUEUED, JobState.RUNNING)

    def batch_indices(self, step: int) -> list[int]:
        """Examples of optimizer step `step`: consecutive slices of seeded per-epoch shuffles."""
        n, bs = self.examples, self.params.batch_size
        out = []
        for p in range(step * bs, step * bs + bs):
            epoch, i = divmod(p, n)
            out.append(self._permutation(epoch)[i])
        return out

    def _permutation(self, epoch: int) -> list[int]:
        cache = self.__dict__.setdefault("_perms", {})
        if epoch not in cache:
            order = list(range(self.examples))
            random.Random(self.params.seed * 100_003 + epoch).shuffle(order)
            cache.clear()
            cache[epoch] = order
        return cache[epoch]

    def to_dict(self) -> dict:
        samples_per_s, tokens_per_s = self.rates.per_second()
        remaining = (self.total_steps - self.step) * self.params.batch_size
        running = self.state is JobState.RUNNING
        return {
            "id": self.id,
            "adapter": self.adapter,
            "state": self.state.value,
            "error": self.error,
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": round(self.epoch, 4),
            "loss": self.loss_history[-1][1] if self.loss_history else None,
            "loss_history": [list(p) for p in self.loss_history[-500:]],
            "eval_loss": self.eval_loss,
            "eval_history": [list(p) for p in self.eval_history[-500:]],
            "epochs": round(self.total_steps * self.params.batch_size / max(1, self.examples), 2),
            "auto_length": self.auto_length,
            "loss_falling": (
                still_falling([v for _, v in self.loss_history])
                if self.state is JobState.DONE
                else None
            ),
            "tokens_per_s": tokens_per_s,
            "samples_per_s": samples_per_s,
            "eta_s": remaining / samples_per_s if samples_per_s and running else None,
            "estimating": running and samples_per_s is None,
            "checkpoint": self.checkpoint,
            "examples": self.examples,
            "val_examples": self.val_examples,
            "params": self.params.to_dict(),
            "created": self.created,
        }


def planned_steps(params: TrainParams, steps_per_epoch: int) -> int:
    """max_steps; else epochs x steps_per_epoch; else (neither given) at least one epoch, and
    for a small data set more: up to MIN_STEPS steps or MAX_EPOCHS epochs, whichever is less."""
    if params.max_steps:
        return params.max_steps
    if params.epochs is not None:
        return max(1, math.ceil(params.epochs * steps_per_epoch))
    return max(steps_per_epoch, min(MIN_STEPS, MAX_EPOCHS * steps_per_epoch))


def still_falling(losses: list[float]) -> bool | None:
    """Whether the loss was still falling at the end: the mean of the last quarter of the
    losses is more than FALLING below the mean of the quarter before. None with fewer than 8."""
    if len(losses) < 8:
        return None
    q = len(losses) // 4
    last, before = sum(losses[-q:]) / q, sum(losses[-2 * q : -q]) / q
    return last < before * (1 - FALLING)


class Rates:
    """A running job's samples/s and tokens/s, in wall-clock time (training shares the model
    with inference, so this is what the ETA needs), from optimizer steps measured since the
    job (re)started; None until the first one has ended."""

    def __init__(self):
        self.start: float | None = None
        self.samples = self.tokens = 0  # in optimizer steps ended since start
        self.seconds = 0.0
        self._samples = self._tokens = 0  # in the current effective batch so far

    def started(self) -> None:
        self.__init__()
        self.start = time.monotonic()

    def micro_step(self, samples: int, tokens: int) -> None:
        self._samples += samples
        self._tokens += tokens

    def optimizer_step(self) -> None:
        self.samples += self._samples
        self.tokens += self._tokens
        self._samples = self._tokens = 0
        self.seconds = time.monotonic() - self.start if self.start is not None else 0.0

    def discard(self) -> None:
        """The current effective batch starts again (after running out of memory)."""
        self._samples = self._tokens = 0

    def per_second(self) -> tuple[float | None, float | None]:
        if not self.samples or self.seconds <= 0:
            return None, None
        return self.samples / self.seconds, self.tokens / self.seconds


def write_record(job: Job) -> None:
    """jobs/<id>/job.json: what Job.from_record reads back, and where the data set came from."""
    atomic_write(
        job.folder / "job.json", json.dumps({**job.to_dict(), "source": job.source}, indent=1)
    )


def latest_checkpoint(folder: Path) -> Path | None:
    """A job's newest complete checkpoint: a checkpoint-<step> folder with its trainer state
    and weights (folders appear whole, storage.atomic_dir; scratch names start with ".")."""
    recover_all(folder)
    found = [
        p
        for p in folder.glob("checkpoint-*")
        if p.name.removeprefix("checkpoint-").isdigit()
        and (p / "trainer_state.pt").is_file()
        and (p / "adapter_model.safetensors").is_file()
    ]
    return max(found, key=checkpoint_step, default=None)


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix("checkpoint-"))
