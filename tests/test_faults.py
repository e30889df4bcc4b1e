"""Engine faults: out of memory in an iteration, a failing trainer, a stuck or dead engine
thread (docs/design.md, "Faults")."""

import threading
import time

import pytest
from conftest import PROMPTS, run_until_done
from test_engine_inference import reference
from test_training import FAST, RECORDS, train_to_end

from fineinfer_jupyter.engine.config import EngineConfig, EngineNotReady
from fineinfer_jupyter.engine.costmodel import LinearCost
from fineinfer_jupyter.engine.engine import Engine

OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes"


SIMILAR = ["Hello there", "Hi there!!", "Good day:)", "Greetings!"]  # one prefill pass


def test_a_prefill_pass_out_of_memory_is_split_until_its_rows_fit(stepped, monkeypatch):
    expected = reference(SIMILAR, 10)
    real, sizes = stepped.core.runner.prefill, []

    def tight(seqs, also=None, **kw):
        sizes.append(len(seqs))
        if len(seqs) > 1:
            raise RuntimeError(OOM)
        return real(seqs, also, **kw)

    monkeypatch.setattr(stepped.core.runner, "prefill", tight)
    # all four in one prefill: with a fixed cost per pass, one pass is cheaper than two (the
    # line calibrated at start may have measured next to none on a busy machine)
    stepped.core.scheduler.costs.prefill = LinearCost(0.02, 0.0045)
    slo = {"ttft": 60.0, "tpot": 60.0}
    streams = [stepped.generate(p, max_new_tokens=10, slo=slo) for p in SIMILAR]
    stepped.iterate()
    assert sizes == [4, 2, 1, 1, 2, 1, 1] and len(stepped.core.scheduler.running) == 4
    run_until_done(stepped, streams)
    assert [s.final["token_ids"] for s in streams] == expected


def test_a_prompt_that_does_not_fit_fails_alone_with_a_clear_message(stepped, monkeypatch):
    expected = reference(PROMPTS, 6)
    real = stepped.core.runner.prefill
    longest = max(PROMPTS, key=len)

    def tight(seqs, also=None, **kw):
        if any(s.num_prompt_tokens >= len(longest.encode()) for s in seqs):
            raise RuntimeError(OOM)
        return real(seqs, also, **kw)

    monkeypatch.setattr(stepped.core.runner, "prefill", tight)
    slo = {"ttft": 60.0, "tpot": 60.0}
    streams = [stepped.generate(p, max_new_tokens=6, slo=slo) for p in PROMPTS]
    run_until_done(stepped, streams)
    for prompt, stream, tokens in zip(PROMPTS, streams, expected):
        if prompt == longest:
            assert stream.final["type"] == "error"
            assert stream.final["message"].startswith(
                f"OutOfMemory: out of memory: its prompt of {len(longest.encode())} tokens does "
                "not fit next to the requests in flight (DefaultCPUAllocator"
            )
        else:
            assert stream.final["token_ids"] == tokens


def test_a_decode_out_of_memory_drops_the_longest_row_and_the_others_keep_their_tokens(
    stepped, monkeypatch
):
    expected = reference(PROMPTS, 12)
    real = stepped.core.runner.decode

    def tight(batch, also=None):
        logits = real(batch, also)  # as if it ran out half-way: the cache already grew
        if len(batch.seqs) > 3:
            raise RuntimeError(OOM)
        return logits

    slo = {"ttft": 60.0, "tpot": 60.0}
    streams = [stepped.generate(p, max_new_tokens=12, slo=slo, ignore_eos=True) for p in PROMPTS]
    stepped.iterate()  # prefill all four
    assert len(stepped.core.scheduler.running) == 4
    monkeypatch.setattr(stepped.core.runner, "decode", tight)
    run_until_done(stepped, streams)
    longest = max(range(4), key=lambda i: len(PROMPTS[i].encode()))
    for i, stream in enumerate(streams):
        if i == longest:
            assert stream.final["type"] == "error"
            assert "OutOfMemory: out of memory: its context of" in stream.final["message"]
        else:
            assert stream.final["token_ids"] == expected[i], i


def oom_micro_steps(engine, monkeypatch, *, above: int):
    """Micro-steps of more than `above` examples run out of memory half-way (in a backward)."""
    real, sizes = engine.core.runner.micro_step, []

    def tight(batch, *, scale, **kw):
        run = real(batch, scale=scale, **kw)
        rows = batch["input_ids"].shape[0]
        sizes.append(rows)
        if rows > above:
            step = run._unit

            def unit(u):
                if u == run.units - 2:  # a backward: gradients are half accumulated
                    raise RuntimeError(OOM)
                step(u)

            run._unit = unit
        return run

    monkeypatch.setattr(engine.core.runner, "micro_step", tight)
    return sizes


def test_a_micro_step_out_of_memory_reruns_its_batch_in_halves_with_the_same_losses(
    tmp_path, monkeypatch
):
    params = dict(FAST, batch_size=4, micro_batch_size=4, max_steps=4)
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "a"), thread=False) as a:
        straight = train_to_end(a, a.tune("herb", RECORDS, **params)["id"])["loss_history"]
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "b"), thread=False) as b:
        # the whole batch in one micro-step: the size the cost model would choose depends on
        # how fast this machine was at calibration (on a busy one, 1 or 2 can look best)
        monkeypatch.setattr(b.core.scheduler, "_best", lambda tokens, most: most)
        sizes = oom_micro_steps(b, monkeypatch, above=1)
        job = train_to_end(b, b.tune("herb", RECORDS, **params)["id"])
    assert job["state"] == "done" and sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}
    assert [s for s, _ in job["loss_history"]] == [1, 2, 3, 4]
    assert [v for _, v in job["loss_history"]] == pytest.approx([v for _, v in straight], rel=1e-5)


def test_a_micro_step_of_one_example_out_of_memory_fails_the_job_and_nothing_else(
    stepped, monkeypatch
):
    expected = reference(PROMPTS[:1], 8)
    oom_micro_steps(stepped, monkeypatch, above=0)
    job = stepped.tune("herb", RECORDS, max_steps=3, **FAST)
    stream = stepped.generate(PROMPTS[0], max_new_tokens=8)
    train_to_end(stepped, job["id"])
    run_until_done(stepped, [stream])
    failed = stepped.job(job["id"])
    assert failed["state"] == "failed"
    assert failed["error"].startswith("MemoryError: out of memory: one example of ")
    assert failed["error"].endswith("tokens does not fit; lower params.max_length")
    assert stream.final["token_ids"] == expected[0]
    assert stepped.list_adapters() == []  # no checkpoint: the adapter went away with it


def test_a_trainer_failure_fails_its_job_while_requests_go_on(stepped, monkeypatch):
    expected = reference(PROMPTS[:2], 16)
    job = stepped.tune("herb", RECORDS, max_steps=50, **FAST)
    streams = [stepped.generate(p, max_new_tokens=16) for p in PROMPTS[:2]]
    for _ in range(4):
        stepped.iterate()
    monkeypatch.setattr(
        stepped.core.runner, "micro_step", lambda *a, **k: (_ for _ in ()).throw(KeyError("x"))
    )
    stepped.core.trainer.micro_step()  # the next micro-step breaks
    run_until_done(stepped, streams)
    assert stepped.job(job["id"])["state"] == "failed"
    assert stepped.job(job["id"])["error"] == "KeyError: 'x'"
    assert [s.final["token_ids"] for s in streams] == expected


def stuck_engine(engine, monkeypatch):
    """The engine thread's next iteration blocks until `release` is set; `entered` is set
    once the thread is inside it."""
    release, entered = threading.Event(), threading.Event()
    real = engine.core.iterate

    def stuck():
        entered.set()
        release.wait(60)
        return real()

    monkeypatch.setattr(engine.core, "iterate", stuck)
    return release, entered


@pytest.mark.realtime
def test_shutdown_returns_within_its_timeout_when_the_engine_thread_is_stuck(engine, monkeypatch):
    release, entered = stuck_engine(engine, monkeypatch)
    stream = engine.generate("hi", max_new_tokens=3)  # wakes the thread: it is stuck from here
    assert entered.wait(30)
    answers = []
    caller = threading.Thread(target=lambda: answers.append(_jobs(engine)))
    caller.start()  # a caller waiting on the engine thread
    while engine._inbox.qsize() == 0:  # its call is in the inbox: it waits from here
        time.sleep(0.01)
    start = time.monotonic()
    assert engine.shutdown(timeout=1.0) is False
    assert time.monotonic() - start < 1.5
    caller.join(2)
    assert not caller.is_alive() and isinstance(answers[0], EngineNotReady)
    final = list(stream)[-1]
    assert final["type"] == "error" and final["message"].startswith("engine is shutting down")
    status = engine.status()
    assert status["state"] == "error" and "did not stop within 1 s" in status["error"]
    with pytest.raises(EngineNotReady):
        engine.generate("hi")
    release.set()
    engine._thread.join(10)
    assert not engine.alive and engine.shutdown(timeout=1.0) is True


def _jobs(engine):
    try:
        return engine.jobs()
    except Exception as e:
        return e


@pytest.mark.realtime
def test_a_dead_engine_thread_is_reported_and_its_requests_get_an_error(engine, monkeypatch):
    real = engine.core.iterate

    def dies():  # once the request is in the running batch (it cannot finish first)
        if engine.core.scheduler.running:
            raise SystemExit("the thread is gone")  # not an Exception: the loop does not catch it
        return real()

    monkeypatch.setattr(engine.core, "iterate", dies)
    stream = engine.generate("hi", max_new_tokens=50, ignore_eos=True, slo={"tpot": 1.0})
    engine._thread.join(10)
    final = list(stream)[-1]
    assert final["type"] == "error"
    assert final["message"] == (
        "EngineNotReady: engine error: engine thread failed: SystemExit: the thread is gone"
    )
    status = engine.status()
    assert status["state"] == "error" and status["error"] == (
        "engine thread failed: SystemExit: the thread is gone"
    )
    with pytest.raises(EngineNotReady, match="engine is error: engine thread failed"):
        engine.generate("hi")


def broken_iteration(engine, monkeypatch, where: str) -> list[float]:
    """The first iteration that admits requests raises: in the executor after its prefill ran
    (pins taken, KV rows joined, first tokens streamed), or in Scheduler.update. Returns the
    list the time of the fault is appended to."""
    fault: list[float] = []
    core = engine.core
    if where == "execute":
        real = core.executor.execute

        def execute(out):
            result = real(out)
            if out.prefill and not fault:
                fault.append(time.monotonic())
                raise RuntimeError("injected fault in execute")
            return result

        monkeypatch.setattr(core.executor, "execute", execute)
    else:
        real = core.scheduler.update

        def update(out, result):
            if out.prefill and not fault:
                fault.append(time.monotonic())
                raise RuntimeError("injected fault in update")
            return real(out, result)

        monkeypatch.setattr(core.scheduler, "update", update)
    return fault


@pytest.mark.realtime
@pytest.mark.parametrize("where", ["execute", "update"])
def test_an_iteration_that_breaks_while_admitting_answers_every_caller_and_the_engine_goes_on(
    engine, adapter_dirs, monkeypatch, where
):
    expected = reference(PROMPTS[:1], 6)
    engine.load_adapter("alpha", adapter_dirs["alpha"])
    fault = broken_iteration(engine, monkeypatch, where)
    finals: dict[int, tuple[float, dict]] = {}
    answered = threading.Event()

    def callback(i):
        def on_event(event):
            if event["type"] != "delta":
                finals[i] = (time.monotonic(), event)
                if len(finals) == len(asks):
                    answered.set()

        return on_event

    # the first one is admitted first (earliest deadline) and ends on its first token
    asks = [("Hi", None, 1)] + [(p, a, 8) for p in PROMPTS for a in (None, "alpha")]

    def ask_all():  # in the engine thread: all of them are in the engine before it iterates
        return [
            engine.generate(p, adapter=a, max_new_tokens=n, ignore_eos=True, callback=callback(i))
            for i, (p, a, n) in enumerate(asks)
        ]

    engine._call(ask_all)
    assert answered.wait(10), f"callers left waiting: {len(asks) - len(finals)} of {len(asks)}"
    for i, (at, final) in finals.items():
        assert at - fault[0] < 1.0, (i, at - fault[0])
        if asks[i][2] == 1:  # it ended in the broken iteration: its own final event
            assert final["type"] == "done" and len(final["token_ids"]) == 1
        else:
            assert (final["type"], final["message"]) == (
                "error",
                f"RuntimeError: injected fault in {where}",
            )
    assert engine._call(lambda: dict(engine.core.adapters._pins)) == {}  # no pin leaked
    assert engine._call(lambda: len(engine.core.executor.batch)) == 0
    assert engine.status()["state"] == "ready"
    got = engine.complete(PROMPTS[0], max_new_tokens=6, ignore_eos=True)
    assert got.token_ids == expected[0]
    engine.delete_adapter("alpha")  # unloaded at once: nothing uses it
    assert engine._call(lambda: not engine.core.runner.peft)
