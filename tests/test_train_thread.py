"""Training on a thread of its own beside the engine thread (train_thread, worker.py): requests
served while a micro-step is provably under way on the worker get exactly the tokens of the
engine with training off; training gives the same losses and weights as the time-sliced engine;
job and adapter changes wait for the run in flight; a failure there fails the job alone."""

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from families import save
from safetensors.torch import load_file
from test_training import RECORDS

from fineinfer_jupyter.engine import walk
from fineinfer_jupyter.engine.config import EngineConfig, SamplingParams, Slo
from fineinfer_jupyter.engine.costmodel import CostModel, LinearCost
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.executor import Executor
from fineinfer_jupyter.engine.outputs import IterationResult
from fineinfer_jupyter.engine.scheduler import PACE, Scheduler
from fineinfer_jupyter.engine.sequence import Sequence
from fineinfer_jupyter.engine.worker import Apart, last_cpu, train_thread_choice

JOB = dict(
    r=8,
    lora_alpha=16,
    learning_rate=1e-2,
    batch_size=4,
    micro_batch_size=2,
    max_length=64,
    max_steps=4,
    checkpoint_every=2,
)
PROMPT = "Where grows glimmerroot?"
WAIT = 60  # seconds: a gate not passed by then is a failure, not a hang


def config(model, data_dir, thread="on", **kw):
    return EngineConfig(
        model=model,
        data_dir=data_dir,
        train_thread=thread,
        threads=2,
        prefix_cache_bytes=0,
        **kw,
    )


class Gate:
    """Makes the worker wait at the start of a unit's forward (inside its training forward's
    precision block), and lets an engine-thread pass hand over to it from inside a layer."""

    def __init__(self, unit=0, fail=False, thread="fineinfer-train"):
        self.unit, self.fail, self.thread = unit, fail, thread
        self.armed = False
        self.inside = threading.Event()  # the worker waits at the gate
        self.release = threading.Event()
        self.done = threading.Event()  # the worker ran the gated unit's forward

    def install(self, monkeypatch):
        original = walk.TrainingPass._forward

        def forward(run, u):
            worker = threading.current_thread().name == self.thread
            if not (worker and self.armed and u == self.unit):
                return original(run, u)
            self.armed = False
            self.inside.set()
            assert self.release.wait(WAIT)
            if self.fail:
                raise RuntimeError("a unit failed on the worker")
            out = original(run, u)
            self.done.set()
            return out

        monkeypatch.setattr(walk.TrainingPass, "_forward", forward)


def text(stream):
    return "".join(e["text"] for e in stream if e["type"] == "delta")


def advance(engine):
    """One iteration; one that served nothing waits for the worker's run instead of spinning
    (a spinning caller holds the GIL the worker needs between its ops)."""
    out = engine.iterate()
    worker = engine.core.executor.worker
    if worker is not None and not (out.prefill or out.decode):
        worker.wait()


def drive(engine, streams, limit=10_000):
    for _ in range(limit):
        if all(s.final is not None for s in streams):
            return [text(s) for s in streams]
        advance(engine)
    raise AssertionError("requests did not end")


def train_to_end(engine, job_id, limit=10_000):
    for _ in range(limit):
        if engine.core.trainer.current is None and not engine.core.trainer.queue:
            engine.core.executor.collect(wait=True)
            return engine.job(job_id)
        advance(engine)
    raise AssertionError("job did not end")


def at_batch_start(engine):
    """Run until the worker is idle and the next micro-step starts an effective batch (its end
    makes no optimizer step). (A change of the adapters while the worker runs holds its run
    after the unit in progress, Executor.quiesce: the rest of that run is no new micro-step.)"""
    trainer = engine.core.trainer
    for _ in range(10_000):
        engine.core.executor.collect(wait=True)
        if trainer.current is not None and not trainer.current.pending and trainer.run is None:
            return
        advance(engine)
    raise AssertionError("no effective batch started")


CASES = [
    ("llama", "float32"),
    ("qwen2", "float32"),
    ("gemma2", "float32"),
    ("phi3", "float32"),
    ("llama", "bfloat16"),
    ("qwen3", "bfloat16"),
]


@pytest.mark.parametrize("family,dtype", CASES)
def test_requests_served_mid_micro_step_get_the_tokens_of_the_engine_with_training_off(
    tmp_path, monkeypatch, family, dtype
):
    model = save(family, tmp_path / "model")
    gate = Gate(unit=0)
    gate.install(monkeypatch)
    with Engine(config(model, tmp_path / "split", dtype=dtype), thread=False) as e:
        assert e.status()["train_thread"]["enabled"]
        job = e.tune("herb", RECORDS, **JOB)
        e.iterate()
        e.core.executor.collect(wait=True)  # a step or more before the requests
        at_batch_start(e)
        e.core.adapters.unpin(e.core.adapters.pin("herb"))  # its snapshot at this step, now
        snap = tmp_path / "snap"
        snap.mkdir()
        e.core.adapters.write("herb", snap)  # its weights at this step, for the reference
        gate.armed = True
        e.iterate()  # the worker starts the micro-step and waits at the gate
        assert gate.inside.wait(WAIT)
        # an inference pass hands over to the worker from inside layer 0 (its row hooks on
        # the LoRA layers, and the worker's precision block open), and waits until the
        # worker has run layer 0's training forward
        layer0 = e.core.runner.walk.stack.layers[0].mlp
        handed = []

        def hand_over(module, args):
            if threading.current_thread().name != "fineinfer-train" and not handed:
                handed.append(True)
                gate.release.set()
                assert gate.done.wait(WAIT)

        hook = layer0.register_forward_pre_hook(hand_over)
        streams = [e.generate(PROMPT, adapter=a, max_new_tokens=12) for a in ("herb", "base")]
        served = drive(e, streams)
        hook.remove()
        assert handed and gate.done.is_set()
        done = train_to_end(e, job["id"])
    assert done["state"] == "done", done["error"]
    with Engine(config(model, tmp_path / "off", "off", dtype=dtype), thread=False) as ref:
        ref.load_adapter("ref", snap)
        expected = [
            ref.complete(PROMPT, adapter=a, max_new_tokens=12).text for a in ("ref", "base")
        ]
        sliced = train_to_end(ref, ref.tune("herb", RECORDS, **JOB)["id"])
    assert served == expected
    tol = 1e-4 if dtype == "float32" else 3e-2
    got = [loss for _, loss in done["loss_history"]]
    want = [loss for _, loss in sliced["loss_history"]]
    assert got == pytest.approx(want, rel=tol)


def test_split_training_reaches_the_time_sliced_engines_weights(tmp_path):
    model = save("mistral", tmp_path / "model")
    adapters = {}
    for mode in ("on", "off"):
        with Engine(config(model, tmp_path / mode, mode), thread=False) as e:
            assert e.status()["train_thread"]["enabled"] is (mode == "on")
            job = train_to_end(e, e.tune("herb", RECORDS, **{**JOB, "max_steps": 5})["id"])
            assert job["state"] == "done" and job["step"] == 5
            adapters[mode] = (
                job,
                load_file(e.home / "adapters" / "herb" / "adapter_model.safetensors"),
            )
    (split, a), (sliced, b) = adapters["on"], adapters["off"]
    assert [s for s, _ in split["loss_history"]] == [1, 2, 3, 4, 5]
    got, want = ([loss for _, loss in j["loss_history"]] for j in (split, sliced))
    assert got == pytest.approx(want, rel=1e-5)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def in_thread(fn):
    """Run fn in a thread; (thread, results list)."""
    out = []

    def target():
        try:
            out.append(fn())
        except Exception as e:  # (the assertion below shows it)
            out.append(e)

    t = threading.Thread(target=target)
    t.start()
    return t, out


@contextmanager
def in_another_thread(block, check=lambda: None):
    """While the body runs, another thread is inside `block()`, where it ran `check()`; an
    error there fails the test."""
    inside, leave, errors = threading.Event(), threading.Event(), []

    def target():
        try:
            with block():
                check()
                inside.set()
                assert leave.wait(WAIT)
        except BaseException as e:
            errors.append(e)
            inside.set()

    t = threading.Thread(target=target)
    t.start()
    assert inside.wait(WAIT)
    try:
        assert not errors, errors
        yield
    finally:
        leave.set()
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("action", ["stop", "cancel", "load"])
def test_a_job_or_adapter_change_waits_for_the_unit_in_flight_not_the_micro_step(
    tmp_path, monkeypatch, adapter_dirs, action
):
    # the engine thread waits, and the requests in flight with it: the rest of a micro-step
    # was ~1 s, and a benchmark window's end (stop_job) made a row miss its TPOT target
    gate = Gate(unit=1)
    gate.install(monkeypatch)
    with Engine(config("tiny", tmp_path), thread=False) as e:
        job = e.tune("herb", RECORDS, **{**JOB, "max_steps": 6})
        while e.job(job["id"])["step"] < 2:
            advance(e)
        at_batch_start(e)  # (the gated run is an effective batch's first: no step at its end)
        step = e.job(job["id"])["step"]
        gate.armed = True
        e.iterate()
        assert gate.inside.wait(WAIT)
        run = e.core.trainer.run
        change = {
            "stop": lambda: e.stop_job(job["id"]),
            "cancel": lambda: e.cancel_job(job["id"]),
            "load": lambda: e.load_adapter("other", adapter_dirs["alpha"]),
        }[action]
        t, out = in_thread(change)
        t.join(0.5)
        assert t.is_alive() and not out  # it waits for the run at the gate
        assert e.core.trainer.run is run and not run.finished
        gate.release.set()
        t.join(WAIT)
        assert out and not isinstance(out[0], Exception), out
        assert run.done == 2 and not run.finished  # its unit in progress, no more
        assert not e.core.executor.worker.hold  # (only while it waited: the next run is whole)
        if action == "load":
            assert out[0]["name"] == "other"
            done = train_to_end(e, job["id"])
            assert done["state"] == "done" and done["step"] == 6
        else:
            state = e.job(job["id"])
            assert state["state"] == ("stopped" if action == "stop" else "cancelled")
            assert e.core.trainer.run is None and not e.core.executor.worker.pending
            assert state["step"] == step if action == "stop" else state["step"] <= step
            assert Path(state["checkpoint"], "adapter_model.safetensors").is_file()
            if action == "stop":
                assert state["checkpoint"].endswith(f"checkpoint-{step:06d}")
        assert e.complete("hello", max_new_tokens=4).text is not None  # still serving


@pytest.mark.realtime  # (the engine's own thread and the worker's)
def test_a_failure_on_the_worker_fails_the_job_alone(tmp_path, monkeypatch):
    gate = Gate(unit=1, fail=True)
    gate.install(monkeypatch)
    with Engine(config("tiny", tmp_path), thread=True) as e:
        gate.armed = True
        job = e.tune("herb", RECORDS, **JOB)
        assert gate.inside.wait(WAIT)
        stream = e.generate("hello", max_new_tokens=6)
        gate.release.set()
        failed = e.wait_job(job["id"], timeout=WAIT)
        assert failed["state"] == "failed"
        assert "a unit failed on the worker" in failed["error"]
        assert stream.result().finish_reason in ("length", "stop")
        assert e.complete("hello again", max_new_tokens=4).finish_reason in ("length", "stop")
        assert e.status()["state"] == "ready"
        names = [a["name"] for a in e.list_adapters()]
        assert "herb" not in names  # (no checkpoint yet: the adapter went)
        again = e.tune("herb2", RECORDS, **{**JOB, "max_steps": 2})
        assert e.wait_job(again["id"], timeout=WAIT)["state"] == "done"


@pytest.mark.realtime  # (the engine's own thread and the worker's)
def test_the_worker_wakes_an_idle_engine_thread_and_shutdown_joins_it(tmp_path):
    with Engine(config("tiny", tmp_path), thread=True) as e:
        job = e.tune("herb", RECORDS, **JOB)  # nothing else arrives: only the worker wakes it
        assert e.wait_job(job["id"], timeout=WAIT)["state"] == "done"
        worker = e.core.executor.worker._thread
        assert worker.name == "fineinfer-train" and worker.is_alive()
    assert not worker.is_alive()


def choice(setting="auto", device="cpu", offload=False, threads=2, hidden=576, **kw):
    kw = {"policy": "deferred", "dtype": torch.bfloat16, **kw}
    return train_thread_choice(
        setting, device=device, offload=offload, threads=threads, hidden=hidden, **kw
    )


def test_auto_is_on_for_a_wide_cpu_model_with_two_threads_and_says_why_not_elsewhere(tmp_path):
    on, why = choice()
    assert on and why.startswith("auto: on")
    for kw, reason in [
        (dict(hidden=64), "hidden size 64"),
        (dict(threads=1), "1 intra-op thread"),
        (dict(device="cuda"), "on cuda"),
        (dict(offload=True), "offloaded"),
        (dict(policy="immediate"), "policy 'immediate'"),
        (dict(dtype=torch.float32), "a float32 base"),
    ]:
        on, why = choice(**kw)
        assert not on and reason in why, why
    assert choice("on", hidden=32, threads=1)[0]
    assert choice("on", dtype=torch.float32)[0]
    assert not choice("on", device="cuda")[0]
    assert not choice("off")[0]
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path), thread=False) as e:
        status = e.status()["train_thread"]
        assert status["enabled"] is False and "hidden size" in status["reason"]
        assert e.core.executor.worker is None
    with pytest.raises(ValueError, match="train_thread"):
        EngineConfig(model="tiny", train_thread="yes")


def test_a_bf16_training_forwards_cast_flag_is_off_in_its_own_thread_only():
    from peft import LoraConfig, get_peft_model

    from fineinfer_jupyter.engine.precision import mixed

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)  # a plain (active adapter) inference forward: input cast to fp32

    def inside():
        assert not layer.cast_input_dtype_enabled  # (in the block's own thread)

    with in_another_thread(lambda: mixed(torch.bfloat16, torch.device("cpu"), [layer]), inside):
        assert layer.cast_input_dtype_enabled  # another thread still casts
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


class Job:
    """A fake job for the scheduler alone (Scheduler's Training protocol)."""

    active, busy = True, False

    def next_tokens(self):
        return [40] * 4

    def max_examples(self):
        return 4

    def in_progress(self):
        return None

    side = None  # (padded, done, last) of the second stream's micro-step under way
    side_left = True  # a later micro-step of the batch is pending

    def side_ready(self):
        return self.busy and (self.side is not None or self.side_left)

    def side_progress(self):
        return self.side


def split_scheduler():
    """A deferred scheduler in split mode on a fixed cost model (a decode 0.05 s, short enough
    that PACE x one_request's tpot target holds a row's second token; four units)."""
    costs = CostModel()
    costs.prefill, costs.decode = LinearCost(0.0, 0.004), LinearCost(0.05, 0.0)
    costs.train, costs.margin = LinearCost(0.0, 0.005), 1.0
    costs.set_units([1.0, 1.0, 2.0, 2.0])
    sched = Scheduler(policy="deferred", costs=costs)
    sched.split_training = True
    return sched, costs


def one_request(sched):
    """A 50-token prompt for 8 tokens (TTFT 1 s, TPOT 0.3 s) arriving at 0, queued in `sched`."""
    seq = Sequence([1] * 50, sampling=SamplingParams(max_new_tokens=8), slo=Slo(ttft=1, tpot=0.3))
    seq.arrival = 0.0
    sched.add(seq)
    return seq


def test_the_worker_gets_a_whole_micro_step_unless_the_requests_fall_behind():
    sched, costs = split_scheduler()
    job = Job()
    out = sched.schedule(0.0, job)  # nothing to serve: a whole micro-step, on the worker
    assert (out.worker_units, out.worker_examples, out.train_units) == (4, 4, 0)
    seq = one_request(sched)
    out = sched.schedule(0.0, job)  # served as `immediate` serves it, the worker beside
    assert out.prefill == [[seq]] and out.worker_units == 4
    sched.update(out, IterationResult())
    seq.output_ids.append(5)
    seq.token_times.append(0.2)
    job.busy = True
    paced = 0.2 + PACE * 0.3  # split mode decodes on PACE x the tpot target after the first
    out = sched.schedule(0.25, job)  # ahead of that pace: the decode is held until then
    assert (out.decode, out.prefill, out.wake_at) == ([], [], pytest.approx(paced))
    assert out.worker_units == 0 and not out.worker_hold  # (the worker is busy: it goes on)
    out = sched.schedule(paced, job)
    assert out.decode == [seq] and out.worker_units == 0  # (the worker is busy)
    assert not out.worker_hold  # on its pace: the run in flight goes on
    costs.decode = LinearCost(0.2, 0.0)  # a decode so slow that waiting would miss the target
    assert sched.schedule(0.25, job).decode == [seq]  # ... is not held
    costs.decode = LinearCost(0.05, 0.0)
    job.busy = False
    held = sched.schedule(0.25, job)  # held, the worker idle: it gets a micro-step
    assert held.decode == [] and held.worker_units == 4
    assert sched.schedule(0.36, job).worker_units == 4  # on its pace
    late = sched.schedule(0.2 + 4 * 0.3, job)  # its next token is overdue
    assert late.decode == [seq] and late.worker_units == 0 and not late.worker_hold
    job.busy = True
    held = sched.schedule(0.2 + 4 * 0.3, job)  # overdue, a run in flight: it stops after its unit
    assert held.decode == [seq] and held.worker_units == 0 and held.worker_hold


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_held_run_stops_after_its_unit_and_the_job_resumes_to_the_same_weights(
    tmp_path, monkeypatch, dtype
):
    gate = Gate(unit=0)
    gate.install(monkeypatch)
    model = save("qwen2", tmp_path / "model")
    adapters = {}
    for mode in ("on", "off"):
        with Engine(config(model, tmp_path / mode, mode, dtype=dtype), thread=False) as e:
            job = e.tune("herb", RECORDS, **JOB)
            if mode == "on":
                gate.armed = True
                e.iterate()  # nothing to serve: a whole micro-step handed to the worker
                assert gate.inside.wait(WAIT)
                run, worker = e.core.trainer.run, e.core.executor.worker
                units = len(e.core.scheduler.costs.shares)
                assert units > 2 and run.done == 0
                worker.hold = True  # (what an iteration whose requests fell behind sets)
                gate.release.set()
                worker.wait()
                assert run.done == 1 and not run.finished  # it stopped after the gated unit
                e.core.executor.collect()
                assert e.core.trainer.run is run and not e.core.trainer.busy
                out = e.iterate()  # requests on time again: the rest of the same micro-step
                assert out.worker_units == units - 1
            done = train_to_end(e, job["id"])
            assert done["state"] == "done" and done["step"] == JOB["max_steps"]
            adapters[mode] = load_file(e.home / "adapters" / "herb" / "adapter_model.safetensors")
    a, b = adapters["on"], adapters["off"]
    assert a.keys() == b.keys()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=1e-3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_worker_trains_on_every_thread_while_nothing_is_served(tmp_path, monkeypatch, dtype):
    counts = []
    original = walk.TrainingPass._unit

    def unit(run, u):
        if threading.current_thread().name == "fineinfer-train":
            counts.append(torch.get_num_threads())
        return original(run, u)

    monkeypatch.setattr(walk.TrainingPass, "_unit", unit)
    model = save("llama", tmp_path / "model")
    with Engine(config(model, tmp_path / "data", dtype=dtype), thread=False) as e:
        e.tune("herb", RECORDS, **JOB)
        e.iterate()  # nothing to serve: the whole micro-step
        e.core.executor.collect(wait=True)
        assert counts and set(counts) == {2}  # (the engine's threads: config's 2)
        counts.clear()
        stream = e.generate(PROMPT, max_new_tokens=4)
        e.iterate()  # a prefill, the next micro-step beside it on one thread
        e.core.executor.collect(wait=True)
        assert counts and set(counts) == {1}
        drive(e, [stream])


@pytest.mark.realtime  # (the engine's own thread and the worker's)
def test_shutdown_waits_for_the_run_in_flight_and_the_job_resumes_from_its_checkpoint(
    tmp_path, monkeypatch
):
    gate = Gate(unit=1)
    gate.install(monkeypatch)
    # (one stream: a second one on the engine thread could end the batch's other micro-step
    # while the worker waits at the gate, and the job would reach step 1 or not)
    e = Engine(config("tiny", tmp_path, train_streams=1), thread=True)
    gate.armed = True
    job = e.tune("herb", RECORDS, **JOB)
    assert gate.inside.wait(WAIT)
    t, out = in_thread(e.shutdown)
    t.join(0.5)
    assert t.is_alive() and not out  # it waits for the run at the gate
    gate.release.set()
    t.join(WAIT)
    assert out == [True]
    with Engine(config("tiny", tmp_path), thread=False) as again:
        record = again.job(job["id"])
        assert record["state"] == "interrupted" and record["step"] == 0
        assert record["checkpoint"].endswith("checkpoint-000000")
        again.resume_job(job["id"])
        assert train_to_end(again, job["id"])["state"] == "done"


def test_a_training_forwards_fp32_attention_holds_in_its_own_thread_only():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fineinfer_jupyter.engine.precision import attention_in_fp32

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.bfloat16) for _ in range(3))
    plain = sdpa_attention_forward(module, q, k, v, None)[0]
    upcast = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None)[0]
    assert not torch.equal(plain, upcast.to(torch.bfloat16))  # (the test can tell them apart)
    with in_another_thread(attention_in_fp32):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

        with torch.enable_grad():  # another thread, gradients on: unchanged
            assert torch.equal(fns["sdpa"](module, q, k, v, None)[0], plain)
            with attention_in_fp32():  # in this thread's own block: float32
                assert torch.equal(fns["sdpa"](module, q, k, v, None)[0], upcast.to(q.dtype))


def by_hand(trainer, order):
    """Two micro-steps of one example: the first as the worker runs it, the second as the
    second stream does (Trainer.work_side), in `order`."""
    run = trainer.prepare(1)
    layers = run.units // 2  # (forward units before the head's backward)
    if order == "side first":  # the later micro-step ends first; it waits to be added
        trainer.work_side(1 << 30, 1)
        assert trainer.side is None and len(trainer._flight) == 2
        trainer.collect(0, run.run(run.units))
        return
    forwards, their_forwards = threading.Event(), threading.Event()

    def worker():  # both forwards first, then both backwards at once, one on each thread
        torch.set_num_threads(1)
        seconds = run.run(layers)
        forwards.set()
        assert their_forwards.wait(WAIT)
        return seconds + run.run(run.units)

    def stop():
        if trainer.side is not None and trainer.side.done == layers:
            their_forwards.set()
            assert forwards.wait(WAIT)
        return False

    t, out = in_thread(worker)
    trainer.work_side(1 << 30, 1, stop=stop)
    t.join(WAIT)
    assert out and not isinstance(out[0], Exception), out
    trainer.collect(0, out[0])


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen2", "bfloat16")])
@pytest.mark.realtime  # (threads held at gates: make stress repeats it)
def test_two_micro_steps_at_once_give_the_one_streams_weights_exactly(tmp_path, family, dtype):
    """Four micro-steps an effective batch, two at a time: their gradients add up in the batch's
    order whichever ends first (a sum of three or more in another order differs)."""
    model = save(family, tmp_path / "model")
    got = {}
    for order in ("one stream", "side first", "at once"):
        with Engine(config(model, tmp_path / order, "off", dtype=dtype), thread=False) as e:
            job = e.tune("herb", RECORDS, **{**JOB, "max_steps": 2})
            trainer = e.core.trainer
            torch.set_num_threads(1)  # every stream on one (sums split across threads differ)
            try:
                while trainer.active:
                    if order == "one stream":
                        trainer.micro_step(1)
                        continue
                    by_hand(trainer, order)
            finally:
                torch.set_num_threads(2)
            record = e.job(job["id"])
            assert record["state"] == "done" and record["step"] == 2
            data = trainer.jobs[job["id"]]
            assert data.tokens_done == 2 * sum(ex.num_tokens for ex in data.dataset.train)
            weights = load_file(e.home / "adapters" / "herb" / "adapter_model.safetensors")
            got[order] = (record["loss_history"], weights)
    (losses, want) = got["one stream"]
    assert len(losses) == 2 and len(want) > 0
    for order in ("side first", "at once"):
        assert got[order][0] == losses, order
        assert got[order][1].keys() == want.keys()
        assert all(torch.equal(got[order][1][k], want[k]) for k in want), order


@pytest.mark.realtime  # (threads held at gates: make stress repeats it)
def test_with_nothing_to_serve_a_second_micro_step_runs_on_the_engine_thread(tmp_path, monkeypatch):
    gate = Gate(unit=1)
    gate.install(monkeypatch)
    seen = []  # (thread, intra-op threads, the pass) of each unit
    original = walk.TrainingPass._unit

    def unit(run, u):
        seen.append((threading.current_thread().name, torch.get_num_threads(), run))
        return original(run, u)

    monkeypatch.setattr(walk.TrainingPass, "_unit", unit)
    model = save("llama", tmp_path / "model")
    with Engine(config(model, tmp_path / "data"), thread=False) as e:
        seen.clear()  # (calibration's)
        gate.armed = True
        job = e.tune("herb", RECORDS, **JOB)  # 2 micro-steps of 2 examples a batch
        first = e.iterate()  # nothing to serve: the worker starts the batch's first
        assert first.worker_units and not first.side
        assert gate.inside.wait(WAIT)  # (the worker is held inside its second unit)
        trainer, executor = e.core.trainer, e.core.executor
        worker_run = trainer.run
        second = e.iterate()  # the batch's second, here, on one thread
        assert second.side and second.train_units == worker_run.units
        side = [(n, k) for n, k, r in seen if r is not worker_run]
        assert side == [("MainThread", 1)] * worker_run.units
        assert executor.side_units == worker_run.units and trainer.side is None
        assert e.status()["train_thread"]["second_stream_units"] == worker_run.units
        assert len(trainer._flight) == 2 and e.job(job["id"])["step"] == 0  # it waits for the first
        gate.release.set()
        executor.collect(wait=True)
        assert e.job(job["id"])["step"] == 1 and not trainer._flight  # both ended, in order
        worker = [k for n, k, r in seen if r is worker_run]
        assert worker[0] == 2 and set(worker[2:]) == {1}  # one thread each once both ran
        # anything in the inbox stops the second stream after the unit it is in (the engine's
        # test; the worker's end is there now: it wakes an idle engine thread)
        assert executor.interrupted()
        e._drain(block=False)
        assert not executor.interrupted()
        e._inbox.put((lambda: None, (), None))
        assert executor.interrupted()
        e.iterate()
        executor.interrupted = lambda: True
        at_batch_start(e)
        gate.armed = True
        e.iterate()
        assert gate.inside.wait(WAIT)
        before = executor.side_units
        assert e.iterate().side and executor.side_units == before + 1
        assert e.iterate().side and executor.side_units == before + 2
        gate.release.set()
        done = train_to_end(e, job["id"])
        assert done["state"] == "done" and done["step"] == JOB["max_steps"]


@pytest.mark.parametrize("threads,streams", [(1, 2), (2, 1)])
def test_no_second_stream_on_one_thread_or_when_set_to_one(tmp_path, threads, streams):
    model = save("llama", tmp_path / "model")
    cfg = EngineConfig(
        model=model,
        data_dir=tmp_path / "data",
        train_thread="on",
        train_streams=streams,
        threads=threads,
        prefix_cache_bytes=0,
    )
    with Engine(cfg, thread=False) as e:
        job = e.tune("herb", RECORDS, **JOB)
        assert train_to_end(e, job["id"])["state"] == "done"
        assert e.core.executor.side_units == 0
        assert e.status()["train_thread"]["second_stream_units"] == 0


@pytest.mark.parametrize("bad", [0, 3, "2"])
def test_train_streams_other_than_one_or_two_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="^train_streams: must be 1 or 2$"):
        EngineConfig(model="tiny", train_streams=bad)


def test_a_held_decode_leaves_the_engine_thread_to_the_second_stream_until_it_falls_due():
    sched, _ = split_scheduler()
    sched.side_stream = True
    job = Job()
    first = sched.schedule(0.0, job)  # the worker idle: it starts; no second stream before it
    assert first.worker_units == 4 and not first.side
    job.busy = True
    out = sched.schedule(0.0, job)  # nothing to serve: a new micro-step here, all its units
    assert out.side and (out.train_units, out.train_examples) == (4, 4) and out.wake_at is None
    job.side = (160, 3, False)
    out = sched.schedule(0.0, job)  # the one under way: its last unit
    assert out.side and (out.train_units, out.train_examples) == (1, 0)
    seq = one_request(sched)
    out = sched.schedule(0.0, job)  # a prompt to serve: no second stream
    assert out.prefill == [[seq]] and not out.side and out.train_units == 0
    sched.update(out, IterationResult())
    seq.output_ids.append(5)
    seq.token_times.append(0.2)
    out = sched.schedule(0.25, job)  # its decode held for its pace: the second stream till then
    assert out.decode == [] and out.side and out.wake_at == pytest.approx(0.2 + PACE * 0.3)
    assert sched.schedule(0.2 + PACE * 0.3, job).decode == [seq]  # due: decoded, no stream
    sched.side_stream = False  # (one thread: the engine thread waits instead)
    out = sched.schedule(0.25, job)
    assert out.decode == [] and not out.side and out.train_units == 0 and out.wake_at


@pytest.mark.realtime  # (threads held at gates: make stress repeats it)
def test_the_second_stream_stops_before_a_unit_that_would_end_after_a_held_decode(
    tmp_path, monkeypatch
):
    gate = Gate(unit=1)
    gate.install(monkeypatch)
    model = save("llama", tmp_path / "model")
    with Engine(config(model, tmp_path / "data"), thread=False) as e:
        gate.armed = True
        e.tune("herb", RECORDS, **JOB)
        e.iterate()  # the worker starts; held at its second unit
        assert gate.inside.wait(WAIT)
        executor, trainer = e.core.executor, e.core.trainer
        rows, tokens = executor._side(1 << 30, 2, until=time.monotonic() + 3600)
        assert executor.side_units == trainer.run.units  # (far off: all of it)
        assert (rows, tokens) == (0, 0) and len(trainer._flight) == 2  # (it waits for the first)
        gate.release.set()
        at_batch_start(e)
        gate.armed = True
        e.iterate()
        assert gate.inside.wait(WAIT)
        before = executor.side_units
        executor._side(1 << 30, 2, until=time.monotonic())  # due now: one unit, no more
        assert executor.side_units == before + 1
        gate.release.set()
        executor.collect(wait=True)


@pytest.mark.realtime  # (a thread held at a gate: make stress repeats it)
def test_no_second_stream_while_memory_would_not_hold_two_micro_steps(tmp_path, monkeypatch):
    from fineinfer_jupyter.engine import training

    gate = Gate(unit=1)
    gate.install(monkeypatch)
    model = save("llama", tmp_path / "model")
    with Engine(config(model, tmp_path / "data"), thread=False) as e:
        trainer, executor = e.core.trainer, e.core.executor
        gate.armed = True
        job = e.tune("herb", RECORDS, **JOB)
        e.iterate()  # the worker starts the batch's first micro-step; held at its second unit
        assert gate.inside.wait(WAIT)
        need = trainer._side_bytes(trainer.current)
        assert need > 0
        monkeypatch.setattr(training, "available_memory", lambda: 2 * need + training.SIDE_RESERVE)
        out = e.iterate()  # (strictly more is needed)
        assert not out.side and executor.side_units == 0 and trainer.side is None
        monkeypatch.setattr(training, "available_memory", lambda: 2 * need + (2 << 30))
        out = e.iterate()  # room for it now
        assert out.side and executor.side_units > 0
        gate.release.set()
        done = train_to_end(e, job["id"])
        assert done["state"] == "done" and done["step"] == JOB["max_steps"]


@pytest.mark.realtime  # (the engine's own thread and the worker's, both held at gates)
def test_shutdown_with_both_streams_mid_micro_step_keeps_the_last_step(tmp_path, monkeypatch):
    worker = Gate(unit=1)
    worker.install(monkeypatch)
    engine = Gate(unit=1, thread="fineinfer-engine")  # the second stream's micro-step
    engine.install(monkeypatch)
    e = Engine(config("tiny", tmp_path), thread=True)
    worker.armed = engine.armed = True
    job = e.tune("herb", RECORDS, **JOB)  # 2 micro-steps of 2 examples a batch
    assert worker.inside.wait(WAIT) and engine.inside.wait(WAIT)
    assert len(e.core.trainer._flight) == 2
    t, out = in_thread(e.shutdown)
    t.join(0.5)
    assert t.is_alive() and not out  # both are held inside a unit
    worker.release.set()
    engine.release.set()
    t.join(WAIT)
    assert out == [True]
    with Engine(config("tiny", tmp_path), thread=False) as again:
        record = again.job(job["id"])  # neither micro-step's gradient reached a step
        assert record["state"] == "interrupted" and record["step"] == 0
        assert record["checkpoint"].endswith("checkpoint-000000")
        again.resume_job(job["id"])
        done = train_to_end(again, job["id"])
        assert done["state"] == "done" and done["step"] == JOB["max_steps"]


@pytest.mark.realtime  # (the worker held at a gate)
def test_a_failure_in_the_second_stream_fails_the_job_alone(tmp_path, monkeypatch):
    worker = Gate(unit=1)
    worker.install(monkeypatch)
    side = Gate(unit=1, fail=True, thread="MainThread")  # (thread=False: the test drives it)
    side.install(monkeypatch)
    side.release.set()
    model = save("llama", tmp_path / "model")
    with Engine(config(model, tmp_path / "data"), thread=False) as e:
        worker.armed = True
        job = e.tune("herb", RECORDS, **JOB)
        e.iterate()  # the worker starts the batch's first micro-step; held at its second unit
        assert worker.inside.wait(WAIT)
        worker.release.set()
        side.armed = True
        out = e.iterate()  # the batch's second, here: its second unit fails
        assert out.side and side.inside.is_set()
        failed = e.job(job["id"])
        assert failed["state"] == "failed" and "a unit failed" in failed["error"]
        assert e.core.trainer._flight == [] and not e.core.executor.worker.pending
        assert e.complete("hello", max_new_tokens=4).finish_reason in ("length", "stop")
        again = e.tune("herb2", RECORDS, **{**JOB, "max_steps": 2})
        assert train_to_end(e, again["id"])["state"] == "done"


APART = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


@pytest.mark.realtime  # (the worker held at a gate, the engine's own thread)
@pytest.mark.skipif(not APART, reason="needs per-thread CPU affinity and two CPUs")
@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen2", "bfloat16")])
def test_passes_beside_the_worker_keep_off_its_cpu_every_other_time(
    tmp_path, monkeypatch, family, dtype
):
    # docs/design.md, "Sharing the machine": left alone, the OS ran the engine thread's passes
    # on the worker's core, and serving's CPU came out of training's core alone
    model = save(family, tmp_path / "model")
    gate = Gate(unit=0)
    gate.install(monkeypatch)
    masks = []  # (iteration kind, the engine thread's CPUs) as each iteration ran
    original = Executor._execute

    def execute(self, out, result, start):
        masks.append((out.kind.value, os.sched_getaffinity(0)))
        return original(self, out, result, start)

    monkeypatch.setattr(Executor, "_execute", execute)
    cpus = os.sched_getaffinity(0)
    cfg = config(model, tmp_path / "e", dtype=dtype, train_streams=1)
    with Engine(cfg, thread=False) as e:
        job = e.tune("herb", RECORDS, **JOB)
        e.iterate()
        at_batch_start(e)
        assert os.sched_getaffinity(0) == cpus  # (no run in flight)
        gate.armed = True
        e.iterate()  # the worker starts a micro-step and waits at the gate
        assert gate.inside.wait(WAIT)
        worker = e.core.executor.worker
        cpu = last_cpu(worker.native_id)  # (asleep at the gate, it stays there)
        assert cpu in cpus
        masks.clear()
        stream = e.generate(PROMPT, max_new_tokens=6)
        deadline = time.monotonic() + WAIT
        while stream.final is None and time.monotonic() < deadline:
            e.iterate()  # served while the worker's run waits at the gate
        assert stream.final is not None and stream.final["type"] == "done", stream.final
        assert worker.busy
        passes = [m for kind, m in masks if kind != "idle"]
        assert len(passes) >= 6  # a prefill and five decodes at least
        assert set(map(frozenset, passes)) == {frozenset(cpus), frozenset(cpus - {cpu})}
        assert all(a != b for a, b in zip(passes, passes[1:])), passes  # every other one
        moved = sum(m != cpus for m in passes)
        assert e.status()["train_thread"]["passes_apart"] >= moved
        gate.release.set()
        e.core.executor.collect(wait=True)
        assert os.sched_getaffinity(0) == cpus  # back once the run is collected
        done = train_to_end(e, job["id"])
        assert done["state"] == "done", done["error"]
    assert os.sched_getaffinity(0) == cpus


@pytest.mark.realtime  # (CPU affinity set from another thread)
@pytest.mark.skipif(not APART, reason="needs per-thread CPU affinity and two CPUs")
def test_apart_stays_put_with_one_cpu_and_is_restored_from_another_thread():
    cpus = os.sched_getaffinity(0)
    first = min(cpus)
    ran, leave, seen = threading.Event(), threading.Event(), []

    def worker():  # runs on the first CPU, then sleeps
        os.sched_setaffinity(0, {first})
        sum(range(100_000))
        ran.set()
        assert leave.wait(WAIT)

    def engine(apart, wtid, own):
        os.sched_setaffinity(0, own)
        apart.before_pass(wtid)
        seen.append(os.sched_getaffinity(0))
        ran.wait(WAIT)
        leave.wait(WAIT)

    w = threading.Thread(target=worker)
    w.start()
    try:
        assert ran.wait(WAIT) and last_cpu(w.native_id) == first
        apart = Apart()
        # the engine thread has the worker's CPU only: nowhere to go, nothing moves
        t = threading.Thread(target=engine, args=(apart, w.native_id, {first}))
        t.start()
        while not seen and t.is_alive():
            time.sleep(0.01)
        assert seen == [{first}] and apart.passes == 0
        # every CPU: off the worker's on its first turn; restore() from here puts it back
        seen.clear()
        apart = Apart()
        u = threading.Thread(target=engine, args=(apart, w.native_id, cpus))
        u.start()
        while not seen and u.is_alive():
            time.sleep(0.01)
        assert seen == [cpus - {first}] and apart.passes == 1
        assert os.sched_getaffinity(u.native_id) == cpus - {first}
        apart.restore()
        assert os.sched_getaffinity(u.native_id) == cpus
    finally:
        leave.set()
        w.join()
