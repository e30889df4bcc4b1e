"""The Engine facade: one thread owns the model; callers talk to it through an inbox and streams."""

from __future__ import annotations

import copy
import gc
import logging
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from pathlib import Path

import torch

from . import export
from .adapters import AdapterStore
from .config import (
    BASE,
    EngineConfig,
    EngineNotReady,
    QueueFull,
    SamplingParams,
    Slo,
    TrainParams,
    UnknownName,
    check,
    default_slo,
)
from .costmodel import CostModel
from .data import build_dataset
from .executor import Executor
from .metrics import Metrics
from .models import LoadedModel, default_gguf, load_model
from .runner import Runner
from .scheduler import Scheduler, Step, StepKind
from .sequence import Completion, RequestStream, Sequence
from .training import Trainer

log = logging.getLogger("fineinfer")


class Engine:
    """Owns one base model; serves generate() requests with continuous batching.

    All model work happens in the engine thread; every public method is safe to call from any
    thread. `Engine(config)` waits for the model unless `wait=False` (then `state` is
    "loading" until it is "ready" or "error"). With `thread=False` the model loads in the
    caller's thread and nothing runs until the caller calls `step()` (tests, benchmarks).
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
        self.metrics = Metrics()
        self.costs = CostModel()
        self.scheduler = Scheduler(
            policy=self.config.policy,
            max_batch_size=self.config.max_batch_size,
            costs=self.costs,
            fineinfer_bound=self.config.fineinfer_bound,
        )
        self.loaded: LoadedModel | None = None
        self.slo: Slo | None = None  # default latency targets, set by device at load
        self.model_info: dict | None = None  # name, path, device, dtype, parameters, max_context
        self.runner: Runner | None = None
        self.adapters: AdapterStore | None = None
        self.trainer: Trainer | None = None
        self.executor: Executor | None = None  # runs the steps, once the model has loaded
        self._requests: dict[str, Sequence] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tokenizer_lock = threading.Lock()
        self._stopping = False
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

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError("model still loading")
        if self.state != "ready":
            raise EngineNotReady(f"model failed to load: {self.error}")

    def generate(
        self,
        prompt: str | list[dict],
        *,
        adapter: str | None = None,
        sampling: SamplingParams | None = None,
        slo: Slo | dict | None = None,
        callback: Callable[[dict], None] | None = None,
        **sampling_kwargs,
    ) -> RequestStream:
        """Queue a request; returns its stream of {"type": "delta"} events and a final event.

        `prompt` is raw text, or a list of chat messages (rendered with the chat template).
        Bad input raises ValueError naming the field, before anything is queued.
        """
        self._check_ready()
        if sampling is None:
            sampling_kwargs.setdefault(
                "max_new_tokens", min(SamplingParams.max_new_tokens, self.config.max_new_tokens_cap)
            )
            sampling = SamplingParams(**sampling_kwargs)
        check(
            sampling.max_new_tokens <= self.config.max_new_tokens_cap,
            "max_new_tokens",
            f"must be <= {self.config.max_new_tokens_cap}",
        )
        name = self._resolve_adapter(adapter)
        ids = self._encode(prompt)
        limit = self.loaded.max_context
        check(len(ids) < limit, "prompt", f"is {len(ids)} tokens; the model's context is {limit}")
        if len(self.scheduler.waiting) >= self.config.max_queue:
            raise QueueFull(f"queue full: {self.config.max_queue} requests are waiting")
        if isinstance(slo, dict):  # targets left out (or None) are the engine's defaults
            slo = Slo(**{**asdict(self.slo), **{k: v for k, v in slo.items() if v is not None}})
        seq = Sequence(ids, sampling=sampling, slo=slo or self.slo, adapter=name, max_context=limit)
        seq.stream = RequestStream(seq.request_id, callback)
        seq.stream.cancel = lambda: self.cancel(seq.request_id)
        self._requests[seq.request_id] = seq
        self._inbox.put((self.scheduler.add, (seq,), None))
        return seq.stream

    def complete(self, prompt: str | list[dict], **kwargs) -> Completion:
        """Blocking generate(): the whole answer."""
        stream = self.generate(prompt, **kwargs)
        while self._thread is None and stream.final is None:
            self.step()  # no engine thread: drive the engine from here
        return stream.result()

    def cancel(self, request_id: str) -> bool:
        seq = self._requests.get(request_id)
        if seq is None or seq.is_finished:
            return False
        seq.cancelled = True
        self._inbox.put((lambda: None, (), None))  # wake the loop
        return True

    def load_adapter(self, name: str, path: str | Path, *, replace: bool = False) -> dict:
        return self._call(self.adapters.load, name, path, replace=replace)

    def delete_adapter(self, name: str, *, files: bool = True) -> None:
        """Unload an adapter; with `files`, also remove its saved copy under the data directory."""
        return self._call(self.adapters.delete, name, files=files)

    def save_adapter(self, name: str, path: str | Path) -> dict:
        """Write an adapter in PEFT's format to `path` (a folder; loads with PeftModel.from_pretrained)."""

        target = Path(path)
        check(
            not target.exists()
            or (
                target.is_dir()
                and (not any(target.iterdir()) or (target / "adapter_config.json").exists())
            ),
            "path",
            f"{target} exists and is not an adapter folder; refusing to replace it",
        )

        def save():
            info = self.adapters.get(name)
            folder = self.adapters.save(name, target, {"step": info["step"]})
            return {**info, "saved_to": str(folder)}

        return self._call(save)

    def list_adapters(self) -> list[dict]:
        self._check_ready()
        return [dict(info) for _, info in sorted(list(self.adapters.info.items()))]

    def tune(self, adapter: str, data, params: TrainParams | dict | None = None, **kwargs) -> dict:
        """Start (or queue) a LoRA fine-tuning job; returns the job's status dict at once.

        `data` is a .jsonl/.txt path or a list of records. Bad data or parameters raise
        ValueError naming the problem before anything starts.
        """
        self._check_ready()
        if not isinstance(params, TrainParams):
            params = TrainParams.from_dict({**(params or {}), **kwargs})
        with self._tokenizer_lock:
            tokenizer = copy.deepcopy(
                self.loaded.tokenizer
            )  # a data set can take a while: not under the lock
        dataset = build_dataset(
            data,
            tokenizer,
            max_length=params.max_length,
            val_fraction=params.val_fraction,
            seed=params.seed,
        )
        return self._call(lambda: self.trainer.submit(adapter, dataset, params).to_dict())

    def jobs(self) -> list[dict]:
        self._check_ready()
        return self._call(lambda: [j.to_dict() for j in self.trainer.jobs.values()])

    def job(self, job_id: str) -> dict:
        return self._call(lambda: self.trainer.get(job_id).to_dict())

    def stop_job(self, job_id: str) -> dict:
        return self._call(lambda: self.trainer.stop(job_id).to_dict())

    def resume_job(self, job_id: str) -> dict:
        return self._call(lambda: self.trainer.resume(job_id).to_dict())

    def cancel_job(self, job_id: str) -> dict:
        return self._call(lambda: self.trainer.cancel(job_id).to_dict())

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

    def status(self) -> dict:
        return {
            "state": self.state,
            "progress": self.progress,
            "error": self.error,
            "model": self.model_info,
            "policy": self.config.policy,
            "slo": {"ttft": self.slo.ttft, "tpot": self.slo.tpot} if self.slo else None,
            "adapters": self.adapters.names() if self.adapters else [],
            "requests": {
                "waiting": len(self.scheduler.waiting),
                "running": self.scheduler.num_running,
            },
        }

    def metrics_snapshot(self) -> dict:
        return self.metrics.snapshot(state=self.state)

    def step(self) -> Step:
        """One iteration: take in what arrived, pick a step, run it."""
        self._drain(block=False)
        self.executor.reap_cancelled()
        step = self.scheduler.schedule(time.monotonic(), self.trainer)
        if step.kind is StepKind.IDLE:
            self.executor.publish_queue()
        else:
            self.executor.run(step)
        return step

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._thread is None:
            self._close()
            return
        self._inbox.put((lambda: None, (), None))
        self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def export_adapter(self, name: str, to: str, path: str | Path | None = None) -> dict:
        """Export an adapter's current weights for another runtime (engine/export.py).

        `to="gguf"`: a llama.cpp LoRA .gguf (`path`: a .gguf file or a folder), plus an Ollama
        Modelfile when the base model has a .gguf. `to="vllm"`: the PEFT folder `path`, checked
        against vLLM's LoRA loader. By default under <data_dir>/exports/<name>/. Returns
        {"format", "path", "files", "commands", ...}; what cannot be exported is a ValueError.
        """
        check(to in export.FORMATS, "to", f"must be one of {', '.join(export.FORMATS)}")
        exports = Path(self.config.data_dir) / "exports"
        out = Path(path) if path is not None else exports / name
        if to == "gguf" and out.suffix != ".gguf":
            check(not out.is_file(), "path", f"{out} is a file; give a folder or a .gguf name")
            out = out / f"{name}.gguf"
        if to == "vllm" and path is None:
            out = out / "vllm"
        scratch = exports / f".{name}-{uuid.uuid4().hex[:8]}"

        def save():
            self.adapters.get(name)
            return self.adapters.save(name, scratch)

        folder = self._call(save)
        spec = str(self.config.model)
        gguf = (
            default_gguf() if spec == "default" else Path(spec) if spec.endswith(".gguf") else None
        )
        base = export.Base(
            self.loaded.model.config.to_dict(),
            type(self.loaded.model).__name__,
            self.loaded.name,
            self.loaded.path,
            str(gguf.expanduser().resolve()) if gguf else None,
        )
        try:
            return {"adapter": name, **export.export(folder, to, base, out, name=name)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- helpers for callers ---------------------------------------------------------------

    def _check_ready(self) -> None:
        if self.state == "loading":
            raise EngineNotReady(f"model is loading: {self.progress}")
        if self.state != "ready":
            raise EngineNotReady(
                f"engine is {self.state}" + (f": {self.error}" if self.error else "")
            )

    def _resolve_adapter(self, adapter: str | None) -> str | None:
        if adapter in (None, "", BASE):
            return None
        if adapter not in self.adapters:
            raise UnknownName(
                f"adapter: no adapter named {adapter!r} (known: {', '.join(self.adapters.names()) or 'none'}; use 'base' for the base model)"
            )
        return adapter

    def _encode(self, prompt: str | list[dict]) -> list[int]:
        tok = self.loaded.tokenizer
        with self._tokenizer_lock:
            if isinstance(prompt, str):
                check(prompt != "", "prompt", "must not be empty")
                return tok(prompt, add_special_tokens=False)["input_ids"]
            check(
                isinstance(prompt, list) and len(prompt) > 0,
                "messages",
                "must be a non-empty list of {role, content}",
            )
            for i, m in enumerate(prompt):
                check(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str),
                    f"messages[{i}]",
                    "must be {role: str, content: str}",
                )
                check(
                    m["role"] in ("system", "user", "assistant", "tool"),
                    f"messages[{i}].role",
                    f"unknown role {m['role']!r}",
                )
            check(
                tok.chat_template is not None,
                "messages",
                "this model's tokenizer has no chat template; send a prompt",
            )
            ids = tok.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return list(ids)

    def _call(self, fn, *args, **kwargs):
        """Run fn in the engine thread and wait for its result (its exception is raised here)."""
        self._check_ready()
        if self._stopping:
            raise EngineNotReady("engine is shutting down")
        if self._thread is None:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._inbox.put((lambda: fn(*args, **kwargs), (), future))
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                if not self._thread.is_alive():
                    raise EngineNotReady(f"engine {self.state}") from None

    # -- the engine thread -------------------------------------------------------------------

    def _main(self) -> None:
        if self._start():
            self._loop()
        self._close()

    def _start(self) -> bool:
        try:
            self._load()
            self.state = "ready"
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

        self.loaded = load_model(
            self.config.model,
            device=self.config.device,
            dtype=self.config.dtype,
            cache_dir=self.config.cache_dir,
            progress=progress,
        )
        m = self.loaded
        self.model_info = {
            "name": m.name,
            "path": m.path,
            "device": str(m.device),
            "dtype": str(m.dtype).removeprefix("torch."),
            "parameters": m.parameters,
            "max_context": m.max_context,
        }
        self.runner = Runner(m.model, device=m.device)
        given = self.config.slo
        self.slo = (
            given
            if isinstance(given, Slo)
            else Slo(**{**asdict(default_slo(m.device.type)), **(given or {})})
        )
        self.scheduler.max_train_step = self.slo.ttft / 2  # an arrival must not wait longer
        if m.device.type != "cpu":
            self.costs.__init__(gpu=True)
        root = Path(self.config.data_dir)
        (root / "adapters").mkdir(parents=True, exist_ok=True)
        self.adapters = AdapterStore(self.runner, root / "adapters")
        self.adapters.load_saved()
        tok = self.loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.trainer = Trainer(self.runner, self.adapters, root=root / "jobs", pad_id=pad)
        tok, gen = self.loaded.tokenizer, self.loaded.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.executor = Executor(
            runner=self.runner,
            adapters=self.adapters,
            trainer=self.trainer,
            scheduler=self.scheduler,
            costs=self.costs,
            metrics=self.metrics,
            tokenizer=tok,
            tokenizer_lock=self._tokenizer_lock,
            eos_ids=self.eos_ids,
            slo=self.slo,
            requests=self._requests,
        )
        self.executor.calibrate()
        progress("ready")

    def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                step = self.step()
                failures = 0
            except Exception as e:  # a bug, not a bad request: fail what is in flight, go on
                log.exception("engine step failed")
                failures += 1
                for seq in self.scheduler.drop(lambda s: True):
                    self.executor.fail(seq, e)
                if failures >= 3:
                    self.state, self.error = "error", f"engine loop failed: {type(e).__name__}: {e}"
                    return
                continue
            if step.kind is StepKind.IDLE:
                self._drain(block=True, timeout=step.wait)

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
        for seq in list(self._requests.values()):  # (none unless the model had loaded)
            if not seq.is_finished and self.executor is not None:
                self.executor.fail(seq, reason)
        while True:  # callers waiting on engine-thread calls get an answer too
            try:
                _, _, future = self._inbox.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.set_exception(reason)
        # nothing may keep the model alive: the trainer and the executor hold the runner too
        self.runner = self.adapters = self.trainer = self.executor = None
        if self.loaded is not None:
            self.loaded.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
