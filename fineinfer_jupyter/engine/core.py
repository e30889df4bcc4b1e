"""The engine thread's parts, built once, and one iteration: schedule -> execute -> update.

Only the engine thread calls into an EngineCore (docs/design.md, "Threads").
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .adapters import AdapterStore
from .config import EngineConfig, LimitReached, Slo, default_slo
from .costmodel import CostModel
from .executor import Executor, deliver
from .metrics import Metrics
from .models import LoadedModel, data_slug
from .outputs import SchedulerOutput
from .precision import widths
from .prefix import PrefixCache, default_budget
from .request import Tokenizer
from .runner import Runner
from .scheduler import Scheduler
from .sequence import Sequence
from .threads import configure_threads, follow_load
from .training import Trainer
from .worker import TrainWorker, train_thread_choice

log = logging.getLogger("fineinfer")


class EngineCore:
    def __init__(
        self,
        *,
        loaded: LoadedModel,
        slo: Slo,
        tokenizer: Tokenizer,
        runner: Runner,
        adapters: AdapterStore,
        trainer: Trainer,
        scheduler: Scheduler,
        executor: Executor,
        metrics: Metrics,
        home: Path,
    ):
        self.home = home  # <data_dir>/<model slug>: this base model's adapters, jobs, exports
        self.loaded, self.slo, self.tokenizer = loaded, slo, tokenizer
        self.runner, self.adapters, self.trainer = runner, adapters, trainer
        self.scheduler, self.executor, self.metrics = scheduler, executor, metrics
        self.requests: dict[str, Sequence] = {}  # live requests, by id
        self.train_thread = {"enabled": False, "reason": ""}  # split mode (worker.py)
        self.streams = 1  # micro-steps at once in split mode (EngineConfig.train_streams)

    def add(self, seq: Sequence) -> None:
        self.requests[seq.request_id] = seq
        self.executor.lookup(seq)  # (the prefix cache: before the scheduler plans its prefill)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and self.scheduler.abort(seq):
            self.executor.cancel(seq)

    def iterate(self) -> SchedulerOutput:
        follow_load()  # the default thread count follows the machine's load ("Sharing the machine")
        self.executor.collect()  # a run the training worker finished: its end, here (split mode)
        # (two threads or more: an iteration with nothing to serve trains a second micro-step)
        self.scheduler.side_stream = (
            self.executor.worker is not None and self.streams > 1 and torch.get_num_threads() >= 2
        )
        out = self.scheduler.schedule(time.monotonic(), self.trainer)
        result = self.executor.execute(out)
        for seq in self.scheduler.update(out, result):
            self.requests.pop(seq.request_id, None)
            deliver(seq)
        self.metrics.record_queue(**self.scheduler.queue_stats(time.monotonic()))
        self.metrics.prefix = self.executor.prefix.stats()
        return out

    def room_for(
        self, adapter: str, *, max_adapters: int, max_jobs: int | None = None, field="adapter"
    ) -> None:
        """Refuse one adapter (and, with max_jobs, one job) more than the engine takes:
        adapters count those loaded and those queued jobs will create; jobs count those queued
        or running."""
        active = [j for j in self.trainer.jobs.values() if j.active]
        if max_jobs is not None and len(active) >= max_jobs:
            raise LimitReached(
                f"{len(active)} jobs are queued or running, the most this engine takes; "
                "wait for one to end or cancel one"
            )
        names = set(self.adapters.names()) | {j.adapter for j in active}
        if adapter not in names and len(names) >= max_adapters:
            raise LimitReached(
                f"{field}: {len(names)} adapters are loaded, the most this engine takes; "
                "delete one first"
            )

    def fail_all(self, error: Exception) -> None:
        """Fail every request the core holds (after an iteration broke); the engine goes on.
        That includes those admitted in the broken iteration (in neither queue any more) and
        those that ended in it but were not delivered yet (they get their own final event)."""
        held = list(self.requests.values())
        self.scheduler.abort_all(held)
        for seq in held:
            if seq.is_finished:
                deliver(seq)  # it ended (and was freed: executor._end) before the break
            else:
                self.executor.fail(seq, error)  # unpins, drops its KV row, final event
        self.requests.clear()
        self.executor.batch.keep([])  # rows of requests no queue knows any more


def build(config: EngineConfig, loaded: LoadedModel, metrics: Metrics) -> EngineCore:
    """Every part with its final values, calibrated on this machine."""
    configure_threads(config.threads)  # before calibration: step times depend on it
    device = loaded.device
    given = config.slo
    slo = (
        given
        if isinstance(given, Slo)
        else Slo(**{**asdict(default_slo(device.type)), **(given or {})})
    )
    gen, hf = loaded.model.generation_config, loaded.tokenizer
    eos = gen.eos_token_id if gen.eos_token_id is not None else hf.eos_token_id
    tokenizer = Tokenizer(hf, set(eos if isinstance(eos, list) else [eos]) - {None})
    runner = Runner(loaded.model, device=device)
    home = model_home(Path(config.data_dir), loaded)
    runner.walk.offload = loaded.offload  # (the layers over budget went there at load)
    adapters = AdapterStore(runner, home / "adapters", base_hash=home.name.rsplit("-", 1)[-1])
    adapters.load_saved()
    trainer = Trainer(runner, adapters, root=home / "jobs", pad_id=tokenizer.pad_id)
    trainer.load()
    scheduler = Scheduler(
        policy=config.policy,
        max_batch_size=config.max_batch_size,
        costs=CostModel(gpu=device.type != "cpu"),
        max_segment=slo.ttft / 10,  # an arrival waits at most this long behind training
        fineinfer_bound=config.fineinfer_bound,
    )
    scheduler.costs.set_units(runner.unit_weights())
    if runner.walk.offload is not None:
        off = runner.walk.offload
        metrics.offload = off.describe()
        scheduler.costs.set_offload(off.offloaded, off.layer_bytes, runner.walk.num_layers)
        scheduler.heterogeneous = config.heterogeneous
    budget = config.prefix_cache_bytes
    prefix = PrefixCache(default_budget(device) if budget is None else budget, runner.config)
    adapters.on_change = prefix.invalidate  # an adapter's weights changed: its KV is stale
    executor = Executor(
        runner=runner,
        adapters=adapters,
        trainer=trainer,
        tokenizer=tokenizer,
        metrics=metrics,
        prefix=prefix,
    )
    scheduler.costs.span = executor.span  # (the FLOP count: calibration measures it)
    scheduler.costs.split = executor.split
    scheduler.chunked = config.chunked_prefill
    timings, probes = executor.calibrate(slo)
    scheduler.costs.calibrate_prefill(probes)
    executor.span = scheduler.costs.span
    for timing in timings:
        scheduler.costs.observe(*timing)
    split, why = train_thread_choice(
        config.train_thread,
        device=device.type,
        offload=runner.walk.offload is not None,
        threads=torch.get_num_threads(),
        hidden=widths(runner.config)[0],
        policy=config.policy,
        dtype=loaded.dtype,
    )
    if split:  # (after calibration: its probes ran on the engine thread's own count)
        executor.worker = TrainWorker()
        scheduler.split_training = True
        adapters.before_change = executor.quiesce
    c = EngineCore(
        loaded=loaded,
        slo=slo,
        tokenizer=tokenizer,
        runner=runner,
        adapters=adapters,
        trainer=trainer,
        scheduler=scheduler,
        executor=executor,
        metrics=metrics,
        home=home,
    )
    c.train_thread = {"enabled": split, "reason": why}
    c.streams = config.train_streams
    runner.walk.lean = config.lean_decode
    return c


def model_home(data_dir: Path, loaded: LoadedModel) -> Path:
    """<data_dir>/<model slug>/ (docs/design.md, "The data directory"). What an older version
    left directly in <data_dir> is not read: the log says where it is and how to move it."""
    home = data_dir / data_slug(loaded)
    home.mkdir(parents=True, exist_ok=True)
    old = [data_dir / n for n in ("adapters", "jobs") if (data_dir / n).is_dir()]
    if old:
        log.warning(
            "%s holds adapters or jobs of an older fineinfer (one folder for every base model); "
            "they are not read. Those trained on %s can be moved: mv %s %s/",
            data_dir,
            loaded.name,
            " ".join(str(p) for p in old),
            home,
        )
    return home
