"""The Engine facade: the public API, the inbox and the engine thread.

One thread owns the model (an EngineCore, built in core.py); every public method is safe to
call from any thread: requests and commands go through the inbox, answers come back through
each request's stream or a future (docs/design.md, "Threads").
"""

from __future__ import annotations

import gc
import logging
import queue
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from pathlib import Path

import torch

from . import core, evaluate, export, job_export, storage, threads
from .config import (
    EngineConfig,
    EngineNotReady,
    NameTaken,
    QueueFull,
    SamplingParams,
    Slo,
    TrainParams,
    check,
    check_prompt,
    check_stop,
    check_train,
    is_int,
)
from .data import build_dataset, fingerprint, unchanged
from .features import features
from .int8rows import int4_bytes, int8_bytes
from .metrics import Metrics
from .models import build_tiny, default_gguf, load_model
from .outputs import IterationKind, SchedulerOutput
from .precision import prepacked_bytes
from .quant import weight_bytes
from .request import Completion, RequestStream, check_messages, check_token_ids, is_token_ids
from .sequence import Sequence

log = logging.getLogger("fineinfer")
MAX_FAILURES = 3  # iterations in a row that may fail before the engine reports "error"


class Engine:
    """Owns one base model; serves generate() requests with continuous batching while
    training jobs run.

    `Engine(config)` waits for the model unless `wait=False` (then `state` is "loading" until
    it is "ready" or "error"). With `thread=False` the model loads in the caller's thread and
    nothing runs until the caller calls `iterate()` (tests, benchmarks).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        wait: bool = True,
        thread: bool = True,
        **overrides,
    ):
        self.config = config or EngineConfig(**overrides)
        self.state = "loading"
        self.progress = "starting"
        self.error: str | None = None
        self.was_ready = False  # the model loaded (a later "error" is the engine's, not the load's)
        self.metrics = Metrics()
        self.core: core.EngineCore | None = None  # once the model has loaded
        self.model_info: dict | None = None  # name, path, device, dtype, parameters, max_context
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._queued = 0  # requests in the inbox, not yet in the scheduler's queue
        self._stopping = False
        self._closed = False  # the engine thread has ended: nothing in the inbox runs any more
        self._given_up = False  # shutdown stopped waiting for a thread stuck in an operation
        self._ready = threading.Event()
        self._thread = None
        if not thread:
            self._start()
            self.wait_ready()
            return
        self._thread = threading.Thread(target=self._main, name="fineinfer-engine", daemon=True)
        self._thread.start()
        if wait:
            self.wait_ready()

    # -- public API (any thread) -------------------------------------------------------------

    @property
    def native_id(self) -> int | None:
        """The engine thread's OS thread id (None without one: thread=False)."""
        return self._thread.native_id if self._thread is not None else None

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError("model still loading")
        if self.state != "ready":
            raise EngineNotReady(f"model failed to load: {self.error}")

    @property
    def slo(self) -> Slo | None:
        """The default latency targets (by device, unless configured)."""
        return self.core.slo if self.core else None

    def generate(
        self,
        prompt: str | list[dict] | list[int],
        *,
        adapter: str | None = None,
        sampling: SamplingParams | None = None,
        slo: Slo | dict | None = None,
        callback: Callable[[dict], None] | None = None,
        **sampling_kwargs,
    ) -> RequestStream:
        """Queue a request; returns its stream of {"type": "delta"} events and a final event.

        `prompt` is raw text, a list of chat messages (rendered with the chat template) or a
        list of token ids.
        `slo` may give only some targets; the rest are the engine's defaults. Bad input raises
        ValueError naming the field, before anything is queued.
        """
        c = self._ready_core()
        cap = self.config.max_new_tokens_cap
        if sampling is None:
            sampling_kwargs.setdefault("max_new_tokens", min(SamplingParams.max_new_tokens, cap))
            sampling = SamplingParams(**sampling_kwargs)
        check(sampling.max_new_tokens <= cap, "max_new_tokens", f"must be <= {cap}")
        if isinstance(slo, dict):
            slo = Slo(**{**asdict(c.slo), **{k: v for k, v in slo.items() if v is not None}})
        check_stop(self.config, sampling.stop)
        name = c.adapters.resolve(adapter)
        limit = c.loaded.max_context
        if is_token_ids(prompt):
            check_token_ids(prompt, c.runner.config.vocab_size)
        else:
            if not isinstance(prompt, str):
                check_messages(prompt)
            check_prompt(self.config, prompt, limit)  # before tokenizing: that takes time
        ids = c.tokenizer.encode(prompt)
        check(len(ids) < limit, "prompt", f"is {len(ids)} tokens; the model's context is {limit}")
        seq = Sequence(
            ids,
            sampling=sampling,
            slo=slo or c.slo,
            adapter=name,
            tokenizer=c.tokenizer,
            max_context=limit,
        )
        seq.stream = RequestStream(seq.request_id, callback)
        seq.stream.cancel = lambda: self.cancel(seq.request_id)
        with self._lock:
            if self._queued + len(c.scheduler.waiting) >= self.config.max_queue:
                raise QueueFull(f"queue full: {self.config.max_queue} requests are waiting")
            self._queued += 1
            self._streams[seq.request_id] = seq.stream
        self._post(self._admit, seq)
        return seq.stream

    def complete(self, prompt: str | list[dict], **kwargs) -> Completion:
        """Blocking generate(): the whole answer."""
        stream = self.generate(prompt, **kwargs)
        while self._thread is None and stream.final is None:
            self.iterate()  # no engine thread: drive the engine from here
        return stream.result()

    def cancel(self, request_id: str) -> bool:
        """Stop a request; False if it is unknown or has ended."""
        stream = self._streams.get(request_id)
        if stream is None or stream.final is not None:
            return False
        self._post(self.core.abort, request_id)
        return True

    def load_adapter(self, name: str, path: str | Path, *, replace: bool = False) -> dict:
        c = self._ready_core()

        def load():
            c.room_for(name, max_adapters=self.config.max_adapters, field="name")
            job = next((j for j in c.trainer.jobs.values() if j.active and j.adapter == name), None)
            if job is not None:
                raise NameTaken(f"name: {job.id} is to train an adapter named {name!r}")
            return c.adapters.load(name, path, replace=replace).to_dict()

        return self._call(load)

    def delete_adapter(self, name: str, *, files: bool = True) -> None:
        """Unload an adapter; with `files`, also remove its saved copy under the data directory."""
        c = self._ready_core()
        return self._call(c.adapters.delete, name, files=files)

    def save_adapter(self, name: str, path: str | Path) -> dict:
        """Write an adapter in PEFT's format to `path` (a folder; loads with
        PeftModel.from_pretrained)."""
        c = self._ready_core()
        target = Path(path)
        check(
            not target.exists()
            or (
                target.is_dir()
                and (not any(target.iterdir()) or (target / "adapter_config.json").exists())
            ),
            "path",
            f"{target.name!r} exists and is not an adapter folder; refusing to replace it",
        )

        def save():
            info = c.adapters.get(name)
            folder = c.adapters.save(name, target, {"step": info.step})
            return {**info.to_dict(), "saved_to": str(folder)}

        return self._call(save)

    def list_adapters(self) -> list[dict]:
        return self._ready_core().adapters.list()

    def tune(
        self,
        adapter: str,
        data,
        params: TrainParams | dict | None = None,
        *,
        columns: dict | None = None,
        **kwargs,
    ) -> dict:
        """Start (or queue) a LoRA fine-tuning job; returns the job's status dict at once.

        `data` is a path (.jsonl, .txt, .json, .csv, .parquet, or a datasets save_to_disk
        folder: engine/sources.py) or a list of records; `columns` maps the record's parts to
        the columns that hold them ({"prompt": "question", "completion": "answer"}). Bad data or
        parameters raise ValueError naming the problem before anything starts.
        """
        c = self._ready_core()
        if not isinstance(params, TrainParams):
            params = TrainParams.from_dict({**(params or {}), **kwargs})
        check_train(self.config, params, c.loaded.max_context)
        config = self.config
        self._call(c.room_for, adapter, max_adapters=config.max_adapters, max_jobs=config.max_jobs)
        dataset = self._dataset(data, params, columns)
        # what a restart needs to build the data set again: the file (noticed if it changes),
        # or the records themselves, kept with the job; and the column mapping
        file = isinstance(data, (str, Path))
        source = fingerprint(data) if file else None
        if source is not None and columns:
            source["columns"] = columns
        records = None if file else list(data)
        if records is not None and columns:
            source = {"columns": columns}

        def submit():  # checked again: another job may have come in meanwhile
            c.room_for(adapter, max_adapters=config.max_adapters, max_jobs=config.max_jobs)
            job = c.trainer.submit(adapter, dataset, params, source=source, records=records)
            return job.to_dict()

        return self._call(submit)

    def _dataset(self, data, params: TrainParams, columns: dict | None = None):
        return build_dataset(
            data,
            self.core.tokenizer.copy(),  # a data set can take a while: not under the shared lock
            max_length=params.max_length,
            val_fraction=params.val_fraction,
            seed=params.seed,
            max_bytes=self.config.max_data_bytes,
            columns=columns,
        )

    def evaluate(
        self,
        adapter: str,
        data=None,
        *,
        columns: dict | None = None,
        compare: list[str] | tuple[str, ...] = ("base",),
        limit: int = 32,
        max_new_tokens: int | None = None,
    ) -> dict:
        """Loss and perplexity of `adapter` and of each model in `compare` ("base" or adapters)
        on held-out examples: `data` (a path or records, as for tune) or, without it, the
        validation split of the job that trained the adapter (--val-fraction). For
        prompt/completion and chat data also the exact-match and contains rates of greedy
        answers, and the first rows side by side (engine/evaluate.py)."""
        c = self._ready_core()
        check(isinstance(limit, int) and 1 <= limit <= 1024, "limit", "must be in [1, 1024]")
        names = [adapter] + [n for n in dict.fromkeys(compare or ()) if n != adapter]
        for name in names:
            c.adapters.resolve(name)
        if data is None:
            jobs = self._call(lambda: [j for j in c.trainer.jobs.values() if j.adapter == adapter])
            job = max(jobs, key=lambda j: j.created, default=None)
            check(
                job is not None and job.val_examples > 0,
                "data",
                f"{adapter!r} has no held-out examples (train with val_fraction, e.g. "
                "--val-fraction 0.1), so give data to evaluate on",
            )
            held_out = job.dataset or self._job_dataset(job)
            examples, where = held_out.val, f"held out by {job.id}"
        else:
            dataset = build_dataset(
                data,
                c.tokenizer.copy(),
                max_length=c.loaded.max_context,
                max_bytes=self.config.max_data_bytes,
                columns=columns,
            )
            examples, where = dataset.train, data if isinstance(data, (str, Path)) else "records"
        examples = examples[:limit]
        cap = min(max_new_tokens or self.config.max_new_tokens_cap, self.config.max_new_tokens_cap)
        asked = [e for e in examples if e.prompt is not None]
        losses = {}
        for name in names:
            losses[name] = [0.0, 0]
            for i in range(0, len(examples), evaluate.EVAL_BATCH):
                chunk = examples[i : i + evaluate.EVAL_BATCH]
                s, k = self._call(evaluate.score_pass, c, c.adapters.resolve(name), chunk)
                losses[name] = [losses[name][0] + s, losses[name][1] + k]
        streams = {  # every model's answers at once: they share the running batch
            name: [
                self.generate(
                    e.prompt,
                    adapter=name,
                    temperature=0.0,
                    max_new_tokens=evaluate.answer_budget(e, cap),
                )
                for e in asked
            ]
            for name in names
        }
        outputs = {name: [self._result(s).text for s in streams[name]] for name in names}
        refs = [e.answer for e in asked]
        models = [evaluate.summary(n, losses[n], outputs[n], refs) for n in names]
        rows = [
            {
                "prompt": evaluate.prompt_text(e.prompt),
                "reference": e.answer,
                "answers": {name: outputs[name][i] for name in names},
            }
            for i, e in enumerate(asked[: evaluate.SHOWN_ROWS])
        ]
        return {
            "adapter": adapter,
            "data": str(where),
            "examples": len(examples),
            "models": models,
            "rows": rows,
        }

    def _result(self, stream: RequestStream) -> Completion:
        while self._thread is None and stream.final is None:
            self.iterate()  # no engine thread: drive the engine from here
        return stream.result()

    def jobs(self) -> list[dict]:
        c = self._ready_core()
        return self._call(lambda: [j.to_dict() for j in c.trainer.jobs.values()])

    def job(self, job_id: str) -> dict:
        c = self._ready_core()
        return self._call(lambda: c.trainer.get(job_id).to_dict())

    def stop_job(self, job_id: str) -> dict:
        c = self._ready_core()
        return self._call(self._settled, lambda: c.trainer.stop(job_id).to_dict())

    def resume_job(self, job_id: str) -> dict:
        """Resume a stopped, failed or interrupted job from its last checkpoint. A job from
        before a restart reads its data again: the same file, unchanged, or its kept records."""
        c = self._ready_core()
        job = self._call(c.trainer.get, job_id)
        dataset = None if job.dataset is not None else self._job_dataset(job)
        return self._call(lambda: c.trainer.resume(job_id, dataset).to_dict())

    def _job_data(self, job) -> Path:
        """The file a job's data set is read from: its kept records, or its data file (refused
        if it changed since the job started)."""
        source = job.source or {}
        if "records" in source:
            return job.folder / source["records"]
        check("path" in source, "job", f"{job.id} does not say where its data is")
        check(
            unchanged(source),
            "data",
            f"{source['path']} changed since {job.id} started (or is gone); "
            "it would not train the same examples: start a new job on it",
        )
        return Path(source["path"])

    def _job_dataset(self, job):
        """A job's data set built again (a job read back at start has none)."""
        columns = (job.source or {}).get("columns")
        dataset = self._dataset(self._job_data(job), job.params, columns)
        check(
            len(dataset.train) == job.examples,
            "data",
            f"gives {len(dataset.train)} examples now, {job.examples} when {job.id} started",
        )
        return dataset

    def export_job(
        self, job_id: str, path: str | Path | None = None, *, processes: int | None = None
    ) -> dict:
        """Write a training job as a folder that trains the same adapter with transformers'
        Trainer under accelerate or torchrun (engine/job_export.py): its tokenized examples,
        train.py, an accelerate config for `processes` processes (default: the most, up to 8,
        that split its effective batch) and a README with the commands. By default under
        <data_dir>/<model>-<hash>/jobs/<id>/export/. Returns {"job", "path", "files",
        "processes", "base_model", "commands"}."""
        c = self._ready_core()
        check(
            self.config.quantize == "none",
            "job",
            f"the engine's base is quantized ({self.config.quantize}); an exported job trains a "
            "full-precision base and would not give this job's losses (not supported yet)",
        )

        def get():
            job = c.trainer.get(job_id)
            return job, {**job.to_dict(), "loss_history": [list(p) for p in job.loss_history]}

        job, record = self._call(get)
        check(processes is None or is_int(processes), "processes", "must be an integer")
        if processes is None:
            processes = job_export.default_processes(job.params.batch_size)
        job_export.check_processes(processes, job.params.batch_size)
        out = Path(path) if path is not None else job.folder / "export"
        job_export.check_target(out)
        dataset = job.dataset if job.dataset is not None else self._job_dataset(job)
        original = self._job_data(job) if job.source else None
        spec = str(self.config.model)
        base = job_export.BaseModel(
            c.loaded.name,
            c.loaded.path,
            c.adapters.base_hash,
            str(c.loaded.dtype).removeprefix("torch."),
        )

        def save_base(folder: Path) -> None:  # a model built in code: built again, saved
            check(spec == "tiny", "model", f"{spec!r} has no folder to name in the job")
            model, tokenizer = build_tiny()
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        return job_export.write(
            out,
            record,
            dataset,
            base,
            processes=processes,
            pad_id=c.tokenizer.pad_id,
            original=original,
            save_base=save_base,
            versions=job_export.versions(),
        )

    def cancel_job(self, job_id: str) -> dict:
        c = self._ready_core()
        return self._call(self._settled, lambda: c.trainer.cancel(job_id).to_dict())

    def wait_job(self, job_id: str, timeout: float | None = None, poll: float = 0.05) -> dict:
        """Block until the job is no longer queued or running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] not in ("queued", "running"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']}")
            time.sleep(poll)

    @property
    def home(self) -> Path | None:
        """<data_dir>/<model slug>: this base model's adapters, jobs and exports."""
        return self.core.home if self.core else None

    def status(self) -> dict:
        c = self.core
        if self.state == "ready" and self._thread is not None and not self._thread.is_alive():
            self.state, self.error = "error", self.error or "the engine thread has ended"
        return {
            "state": self.state,
            "progress": self.progress,
            "error": self.error,
            "model": self.model_info,
            "policy": self.config.policy,
            "slo": asdict(c.slo) if c else None,
            "threads": threads.current() if c else None,
            "adapters": c.adapters.names() if c else [],
            "offload": (c.runner.walk.offload.describe() if c and c.runner.walk.offload else None),
            "train_thread": (
                {
                    **c.train_thread,
                    "second_stream_units": c.executor.side_units,
                    "passes_apart": c.executor.apart.passes,
                }
                if c
                else None
            ),
            "row_threads": dict(c.runner.row_threads) if c and c.runner.row_threads else None,
            "layer_walk": (
                {
                    "enabled": c.runner.walk.supported,
                    "reason": c.runner.walk.why_not,
                    # decode steps without the module calls (lean.py), or why not
                    "lean_decode": c.runner.walk.lean_why_not is None,
                    "lean_reason": c.runner.walk.lean_why_not,
                }
                if c
                else None
            ),
            "prefix_cache": dict(self.metrics.prefix) if c else None,
            "features": (
                features(c.runner.walk, type(c.runner.walk.causal_lm).__name__) if c else None
            ),
            "requests": {
                "waiting": (len(c.scheduler.waiting) if c else 0) + self._queued,
                "running": c.scheduler.num_running if c else 0,
            },
        }

    def metrics_snapshot(self) -> dict:
        return self.metrics.snapshot(state=self.state)

    def iterate(self) -> SchedulerOutput:
        """One engine iteration: take in what arrived, then schedule, execute, update."""
        self._drain(block=False)
        return self.core.iterate()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop the engine thread: the running job checkpoints (interrupted: it resumes at the
        next start), requests in flight get an error. Returns within `timeout` seconds even if
        the thread is stuck in a long operation (then False; the thread is a daemon, and callers
        waiting on it get EngineNotReady)."""
        if not self._stopping:
            self._stopping = True
            if self._thread is None:
                self._close()
                return True
            self._inbox.put((lambda: None, (), None))
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the engine thread did not stop within %g s; left behind", timeout)
            self._given_up = True
            self.state, self.error = "error", f"the engine thread did not stop within {timeout:g} s"
            reason = EngineNotReady(f"engine is shutting down: {self.error}")
            self._fail_inbox(reason)
            for stream in list(self._streams.values()):  # the stuck thread will not answer them
                if stream.final is None:
                    stream.put({"type": "error", "id": stream.id, "message": str(reason)})
            return False
        return True

    @property
    def alive(self) -> bool:
        """The engine thread runs (or, without a thread, the engine is not shut down)."""
        if self._thread is None:
            return not self._closed
        return self._thread.is_alive()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def export_adapter(self, name: str, to: str, path: str | Path | None = None) -> dict:
        """Export an adapter's current weights for another runtime (engine/export.py).

        `to="gguf"`: a llama.cpp LoRA .gguf (`path`: a .gguf file or a folder), plus an Ollama
        Modelfile when the base model has a .gguf. `to="vllm"`: the PEFT folder `path`, checked
        against vLLM's LoRA loader. By default under <data_dir>/<model>-<hash>/exports/<name>/. Returns
        {"format", "path", "files", "commands", ...}; what cannot be exported is a ValueError.
        """
        check(to in export.FORMATS, "to", f"must be one of {', '.join(export.FORMATS)}")
        c = self._ready_core()
        exports = c.home / "exports"
        out = Path(path) if path is not None else exports / name
        if to == "gguf" and out.suffix != ".gguf":
            check(not out.is_file(), "path", f"{out} is a file; give a folder or a .gguf name")
            out = out / f"{name}.gguf"
        check(not (to == "gguf" and out.is_dir()), "path", f"{out} is a folder, not a .gguf file")
        if to == "vllm" and path is None:
            out = out / "vllm"
        storage.sweep(exports / name)  # scratch that an export which died left behind
        scratch = storage.temporary(exports / name)

        def save():
            c.adapters.get(name)
            return c.adapters.save(name, scratch)

        folder = self._call(save)
        spec = str(self.config.model)
        gguf = (
            default_gguf() if spec == "default" else Path(spec) if spec.endswith(".gguf") else None
        )
        model = c.runner.walk.causal_lm
        base = export.Base(
            model.config.to_dict(),
            type(model).__name__,
            c.loaded.name,
            c.loaded.path,
            str(gguf.expanduser().resolve()) if gguf else None,
        )
        try:
            return {"adapter": name, **export.export(folder, to, base, out, name=name)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- helpers for callers ---------------------------------------------------------------

    def _ready_core(self) -> core.EngineCore:
        if self._stopping:
            raise EngineNotReady("engine is shutting down")
        if self.state == "loading":
            raise EngineNotReady(f"model is loading: {self.progress}")
        if self.state != "ready" or self.core is None:
            raise EngineNotReady(
                f"engine is {self.state}" + (f": {self.error}" if self.error else "")
            )
        return self.core

    def _post(self, fn, *args) -> None:
        self._inbox.put((fn, args, None))
        if self._closed or self._given_up:  # nothing will take it out
            self._fail_inbox(EngineNotReady(f"engine {self.state}"))

    def _settled(self, fn):  # engine thread
        """fn() once the training worker's run in flight has ended here (split mode): a job's
        state changes only between two of its micro-steps."""
        self.core.executor.settle()
        return fn()

    def _admit(self, seq: Sequence) -> None:  # engine thread
        with self._lock:
            self._queued -= 1
        self.core.add(seq)

    def _call(self, fn, *args, **kwargs):
        """Run fn in the engine thread and wait for its result (its exception is raised here)."""
        if self._stopping:
            raise EngineNotReady("engine is shutting down")
        if self._thread is None:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._inbox.put((lambda: fn(*args, **kwargs), (), future))
        if self._closed:
            self._fail_inbox(EngineNotReady(f"engine {self.state}"))
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                if not self._thread.is_alive() or self._given_up:
                    raise EngineNotReady(f"engine {self.state}") from None

    # -- the engine thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            if self._start():
                self._loop()
        except BaseException as e:  # a bug in the loop itself: reported, never silent
            log.exception("the engine thread failed")
            self.state, self.error = "error", f"engine thread failed: {type(e).__name__}: {e}"
        finally:
            self._close()

    def _start(self) -> bool:
        try:
            self._load()
            self.state, self.was_ready = "ready", True
        except Exception as e:  # reported through status(); the server keeps running
            log.exception("model failed to load")
            self.state, self.error = "error", f"{type(e).__name__}: {e}"
        finally:
            self._ready.set()
        return self.state == "ready"

    def _load(self) -> None:
        def progress(message: str) -> None:
            self.progress = message
            log.info(message)

        loaded = load_model(
            self.config.model,
            device=self.config.device,
            dtype=self.config.dtype,
            cache_dir=self.config.cache_dir,
            progress=progress,
            offload=self.config.offload,
            memory_budget=self.config.memory_budget,
            offload_cold=self.config.offload_cold,
            quantize=self.config.quantize,
            decode_weights=self.config.decode_weights,
        )
        self.model_info = {
            "name": loaded.name,
            "path": loaded.path,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "dtype_reason": loaded.dtype_reason,
            "parameters": loaded.parameters,
            "max_context": loaded.max_context,
            "quantize": self.config.quantize,
            "weight_bytes": weight_bytes(loaded.model)["total"],  # the base's, as loaded
            "prepacked_bytes": prepacked_bytes(loaded.model),  # copies for speed (precision.py)
            "decode_weights": loaded.decode_reason.split(":")[0],  # int8 | int4 | base (int8rows)
            "decode_weights_reason": loaded.decode_reason,
            "int8_bytes": int8_bytes(loaded.model),  # decodes' copies (int8rows.py)
            "int4_bytes": int4_bytes(loaded.model),  # (decode_weights="int4")
        }
        progress("calibrating")
        self.core = core.build(self.config, loaded, self.metrics)
        if self.core.executor.worker is not None:  # a finished run wakes an idle engine thread
            self.core.executor.worker.wake = lambda: self._inbox.put((_nothing, (), None))
            self.core.executor.interrupted = lambda: not self._inbox.empty()
        self.model_info["data_dir"] = str(self.core.home)
        progress("ready")

    def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                out = self.iterate()
                failures = 0
            except Exception as e:  # a bug, not a bad request: fail what is in flight, go on
                log.exception("engine iteration failed")
                failures += 1
                self.core.fail_all(e)
                if failures >= MAX_FAILURES:
                    self.state, self.error = "error", f"engine loop failed: {type(e).__name__}: {e}"
                    return
                continue
            if out.kind is IterationKind.IDLE and not out.worker_units:
                # until something arrives (or the worker's run ends, or held decodes fall due)
                wait = None if out.wake_at is None else max(out.wake_at - time.monotonic(), 0.0)
                self._drain(block=True, timeout=wait)

    def _drain(self, *, block: bool, timeout: float | None = None) -> None:
        try:
            item = self._inbox.get(block=block, timeout=timeout)
        except queue.Empty:
            return
        while True:
            fn, args, future = item
            try:
                result = fn(*args)
                if future is not None:
                    future.set_result(result)
            except Exception as e:
                if future is None:
                    log.exception("engine command failed")
                else:
                    future.set_exception(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _close(self) -> None:
        self.state = "stopped" if self.state == "ready" else self.state
        reason = EngineNotReady(f"engine {self.state}" + (f": {self.error}" if self.error else ""))
        if self.core is not None:
            try:  # the running job keeps what it learned up to its last optimizer step
                self.core.executor.settle()  # (after the worker's run in flight)
                self.core.trainer.interrupt()
            except Exception:
                log.exception("could not checkpoint the running job at shutdown")
            if self.core.executor.worker is not None:
                self.core.executor.worker.close()
            self.core.executor.apart.restore()
            self.core.fail_all(reason)
        self._closed = True
        self._fail_inbox(reason)  # callers waiting on engine-thread calls get an answer too
        # nothing may keep the model alive once the engine has stopped
        if self.core is not None:
            self.core.loaded.model = None
            self.core = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _fail_inbox(self, reason: Exception) -> None:
        """Answer everything still in the inbox with `reason` (any thread)."""
        while True:
            try:
                fn, args, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if future is not None:
                future.set_exception(reason)
            elif fn == self._admit:
                with self._lock:
                    self._queued -= 1
                seq = args[0]
                seq.finish_reason, seq.error = "error", f"{type(reason).__name__}: {reason}"
                try:
                    seq.stream.put(seq.final_event())
                except Exception:
                    log.exception("stream consumer failed for %s", seq.request_id)


def _nothing() -> None:
    """An inbox item that only wakes the engine thread."""
