import gc
import threading
import weakref

import pytest
import torch
from conftest import PROMPTS, hf_greedy, run_until_done
from peft import PeftModel

from fineinfer_jupyter.engine.config import EngineConfig, EngineNotReady, QueueFull, UnknownName
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.models import load_model
from fineinfer_jupyter.engine.outputs import IterationKind
from fineinfer_jupyter.engine.request import RequestError


def reference(prompts, n, adapter_dir=None):
    loaded = load_model("tiny")
    model = loaded.model
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return [hf_greedy(model, loaded.tokenizer, p, n) for p in prompts]


def test_requests_joining_at_different_iterations_match_hf_generate_token_for_token(stepped):
    expected = reference(PROMPTS, 24)
    streams = []
    for prompt in PROMPTS:  # each arrives while the earlier ones are decoding
        streams.append(stepped.generate(prompt, max_new_tokens=24))
        for _ in range(3):
            stepped.iterate()
    assert len(stepped.core.scheduler.running) > 1
    run_until_done(stepped, streams)
    assert [s.final["token_ids"] for s in streams] == expected
    assert len(stepped.core.scheduler.running) == 0


def test_finished_rows_leave_at_once_and_the_rest_keep_their_tokens(stepped):
    lengths = [3, 30, 7, 18]
    expected = [reference([p], n)[0] for p, n in zip(PROMPTS, lengths)]
    slo = {"ttft": 60.0, "tpot": 60.0}  # room to prefill all four in one iteration
    streams = [stepped.generate(p, max_new_tokens=n, slo=slo) for p, n in zip(PROMPTS, lengths)]
    stepped.iterate()  # prefill all four
    sizes = []
    while any(s.final is None for s in streams):
        stepped.iterate()
        sizes.append(len(stepped.core.scheduler.running))
    assert [s.final["token_ids"] for s in streams] == expected
    assert sizes[0] == 4 and 3 in sizes and 1 in sizes and sizes[-1] == 0


def test_mixed_adapter_batch_matches_each_adapter_alone(stepped, adapter_dirs):
    for name, path in adapter_dirs.items():
        stepped.load_adapter(name, path)
    plan = [
        ("base", PROMPTS[0]),
        ("alpha", PROMPTS[0]),
        ("beta", PROMPTS[0]),
        ("alpha", PROMPTS[2]),
        ("base", PROMPTS[2]),
    ]
    streams = [stepped.generate(p, adapter=a, max_new_tokens=16) for a, p in plan]
    run_until_done(stepped, streams)
    mixed = [s.final["token_ids"] for s in streams]
    for (adapter, prompt), tokens in zip(plan, mixed):
        path = None if adapter == "base" else adapter_dirs[adapter]
        assert tokens == reference([prompt], 16, path)[0], adapter
    assert mixed[0] != mixed[1] != mixed[2]  # the adapters really change the answer


def test_an_adapter_on_other_layers_loaded_after_requests_ran_is_served_on_them(stepped, tmp_path):
    """The walk remembers each decoder layer's LoRA layers (walk.rows); an adapter loaded later
    that wraps other linear layers is found there too."""
    from conftest import make_adapter

    q = make_adapter(tmp_path / "q", seed=3, targets=["q_proj"])
    mlp = make_adapter(tmp_path / "mlp", seed=4, targets=["up_proj", "down_proj"])
    stepped.load_adapter("q", q)
    first = stepped.generate(PROMPTS[1], adapter="q", max_new_tokens=12)
    run_until_done(stepped, [first])
    stepped.load_adapter("ffn", mlp)
    streams = [stepped.generate(PROMPTS[1], adapter=a, max_new_tokens=12) for a in ("ffn", "q")]
    run_until_done(stepped, streams)
    assert streams[0].final["token_ids"] == reference([PROMPTS[1]], 12, mlp)[0]
    assert streams[1].final["token_ids"] == first.final["token_ids"]
    assert first.final["token_ids"] == reference([PROMPTS[1]], 12, q)[0]
    assert streams[0].final["token_ids"] != reference([PROMPTS[1]], 12)[0]  # (it changes it)


def test_rows_all_on_the_base_skip_the_lora_layers_in_their_own_thread_only(
    stepped, adapter_dirs, monkeypatch
):
    """A pass whose every row is on the base calls each LoRA layer's base layer only (PEFT's
    disabled path, walk.rows); a forward in another thread meanwhile keeps its adapter."""
    from peft.tuners.lora import LoraLayer

    from fineinfer_jupyter.engine.precision import BASE_ONLY

    stepped.load_adapter("alpha", adapter_dirs["alpha"])
    calls, mixed = [], LoraLayer._mixed_batch_forward  # (PEFT's per-row path)

    def spy(self, *args, **kwargs):
        calls.append(kwargs["adapter_names"])
        return mixed(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "_mixed_batch_forward", spy)
    base = stepped.generate(PROMPTS[0], max_new_tokens=10)
    run_until_done(stepped, [base])
    assert base.final["token_ids"] == reference([PROMPTS[0]], 10)[0] and calls == []
    both = [stepped.generate(PROMPTS[0], adapter=a, max_new_tokens=10) for a in (None, "alpha")]
    run_until_done(stepped, both)
    assert calls  # (a mixed batch takes PEFT's per-row path)
    assert [s.final["token_ids"] for s in both] == [
        base.final["token_ids"],
        reference([PROMPTS[0]], 10, adapter_dirs["alpha"])[0],
    ]
    layer = next(m for m in stepped.core.runner.model.modules() if isinstance(m, LoraLayer))
    assert layer._disable_adapters is BASE_ONLY and not layer.disable_adapters
    x = torch.randn(2, layer.in_features)
    layer.set_adapter("alpha")
    with_adapter = layer(x)
    assert not torch.equal(with_adapter, layer.get_base_layer()(x))
    inside, leave, seen = threading.Event(), threading.Event(), []

    def other():
        with BASE_ONLY.flipped():  # another thread in a base-only pass
            seen.append(bool(layer.disable_adapters))
            inside.set()
            assert leave.wait(30)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(30)
    try:
        assert seen == [True] and not layer.disable_adapters
        assert torch.equal(layer(x), with_adapter)  # this thread: its adapter still applies
    finally:
        leave.set()
        t.join()


def test_cancelling_one_stream_leaves_the_others_unchanged_and_frees_its_row(stepped):
    expected = reference(PROMPTS[:3], 20)
    streams = [stepped.generate(p, max_new_tokens=20) for p in PROMPTS[:3]]
    for _ in range(5):
        stepped.iterate()
    assert len(stepped.core.scheduler.running) == 3
    streams[1].cancel()
    stepped.iterate()
    assert len(stepped.core.scheduler.running) == 2
    assert streams[1].final["finish_reason"] == "cancelled"
    run_until_done(stepped, streams)
    assert streams[0].final["token_ids"] == expected[0]
    assert streams[2].final["token_ids"] == expected[2]
    assert expected[1][: len(streams[1].final["token_ids"])] == streams[1].final["token_ids"]


def test_a_request_that_fails_while_running_fails_alone(stepped):
    expected = reference(PROMPTS[:2], 12)

    def broken(event):
        raise RuntimeError("consumer went away")

    good = stepped.generate(PROMPTS[0], max_new_tokens=12)
    bad = stepped.generate(PROMPTS[2], max_new_tokens=12, callback=broken)
    late = stepped.generate(PROMPTS[1], max_new_tokens=12)
    run_until_done(stepped, [good, late])
    assert good.final["token_ids"] == expected[0]
    assert late.final["token_ids"] == expected[1]
    assert bad.final["type"] == "error"
    assert stepped.metrics.snapshot()["requests"]["failed"] == 1


def test_stop_string_ends_the_answer_before_it(stepped):
    full = stepped.generate("stop test", max_new_tokens=40, ignore_eos=True)
    run_until_done(stepped, [full])
    text = "".join(e["text"] for e in full if e["type"] == "delta")
    stop = text[4:6]
    assert len(stop) == 2
    cut = stepped.generate("stop test", max_new_tokens=40, ignore_eos=True, stop=[stop])
    run_until_done(stepped, [cut])
    streamed = "".join(e["text"] for e in cut if e["type"] == "delta")
    assert streamed == text[: text.find(stop)]
    assert cut.final["finish_reason"] == "stop"


def test_length_limit_and_finish_reasons(stepped):
    s = stepped.generate("abc", max_new_tokens=5, ignore_eos=True)
    run_until_done(stepped, [s])
    assert s.final["finish_reason"] == "length"
    assert s.final["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert len(s.final["token_ids"]) == 5


def test_context_length_stops_generation(stepped):
    limit = stepped.core.loaded.max_context
    s = stepped.generate("x" * (limit - 4), max_new_tokens=50, ignore_eos=True)
    run_until_done(stepped, [s])
    assert s.final["finish_reason"] == "context"
    assert s.final["usage"]["completion_tokens"] == 4


def test_same_seed_same_text_and_sampling_options(stepped):
    opts = dict(
        max_new_tokens=20,
        temperature=0.9,
        top_p=0.9,
        top_k=50,
        repetition_penalty=1.2,
        ignore_eos=True,
    )
    a = stepped.generate("seeded", seed=7, **opts)
    b = stepped.generate("seeded", seed=7, **opts)
    c = stepped.generate("seeded", seed=8, **opts)
    run_until_done(stepped, [a, b, c])
    assert a.final["token_ids"] == b.final["token_ids"]
    assert a.final["token_ids"] != c.final["token_ids"]


def test_top_k_one_is_greedy(stepped):
    greedy = stepped.generate("topk", max_new_tokens=12)
    sampled = stepped.generate("topk", max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    run_until_done(stepped, [greedy, sampled])
    assert greedy.final["token_ids"] == sampled.final["token_ids"]


def test_chat_messages_go_through_the_chat_template(stepped):
    messages = [{"role": "user", "content": "hi"}]
    tok = stepped.core.loaded.tokenizer
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    s = stepped.generate(messages, max_new_tokens=4)
    run_until_done(stepped, [s])
    assert s.final["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="x" * 5000), "prompt"),
        (dict(prompt=[]), "messages"),
        (dict(prompt=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (dict(prompt="hi", adapter="nope"), "adapter"),
        (dict(prompt="hi", temperature=-1), "temperature"),
        (dict(prompt="hi", top_p=0), "top_p"),
        (dict(prompt="hi", top_k=-2), "top_k"),
        (dict(prompt="hi", max_new_tokens=0), "max_new_tokens"),
        (dict(prompt="hi", max_new_tokens=10**6), "max_new_tokens"),
        (dict(prompt="hi", repetition_penalty=0), "repetition_penalty"),
        (dict(prompt="hi", seed="x"), "seed"),
        (dict(prompt="hi", stop=[""]), "stop"),
    ],
)
def test_bad_input_is_refused_before_admission_naming_the_field(stepped, kwargs, field):
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError) as info:
        stepped.generate(prompt, **kwargs)
    assert str(info.value).startswith(field + ":")
    assert not stepped.core.scheduler.waiting


def test_unknown_adapter_is_a_distinct_error(stepped):
    with pytest.raises(UnknownName, match="no adapter named 'nope'"):
        stepped.generate("hi", adapter="nope")


def test_queue_limit(data_dir):
    engine = Engine(EngineConfig(model="tiny", data_dir=data_dir, max_queue=2), thread=False)
    engine.generate("a")
    engine.generate("b")
    engine._drain(block=False)
    with pytest.raises(QueueFull):
        engine.generate("c")
    engine.shutdown()


def test_threaded_engine_serves_concurrent_callers_with_the_same_tokens(engine):
    expected = reference(PROMPTS, 16)
    results = [None] * len(PROMPTS)

    def call(i):
        results[i] = engine.complete(PROMPTS[i], max_new_tokens=16).token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected
    snap = engine.metrics_snapshot()
    assert snap["requests"]["finished"] == len(PROMPTS)
    assert snap["inference"]["ttft_p50"] is not None


def test_stream_text_matches_decoded_tokens_and_stats_are_reported(engine):
    stream = engine.generate("stats please", max_new_tokens=10)
    events = list(stream)
    final = events[-1]
    text = "".join(e["text"] for e in events[:-1])
    assert text == engine.core.loaded.tokenizer.decode(final["token_ids"], skip_special_tokens=True)
    stats = final["stats"]
    assert stats["ttft"] > 0 and stats["total"] >= stats["ttft"]
    assert stats["deferred"] >= 0


def test_load_list_and_delete_adapters(engine, adapter_dirs):
    info = engine.load_adapter("alpha", adapter_dirs["alpha"])
    assert info["r"] == 4
    assert [a["name"] for a in engine.list_adapters()] == ["alpha"]
    with pytest.raises(ValueError, match="exists already"):
        engine.load_adapter("alpha", adapter_dirs["alpha"])
    with pytest.raises(ValueError, match="name:"):
        engine.load_adapter("train", adapter_dirs["alpha"])
    engine.delete_adapter("alpha")
    assert engine.list_adapters() == []
    assert engine.complete("hi", max_new_tokens=3).finish_reason in ("length", "eos")


def test_status_before_ready_and_after_shutdown(data_dir):
    engine = Engine(EngineConfig(model="tiny", data_dir=data_dir), wait=False)
    engine.wait_ready(60)
    assert engine.status()["state"] == "ready"
    model = weakref.ref(engine.core.loaded.model)
    engine.tune("t", [{"prompt": "a", "completion": "b"}] * 4, max_steps=1)  # the trainer too
    engine.shutdown()
    assert engine.status()["state"] == "stopped"
    with pytest.raises(EngineNotReady):
        engine.generate("hi")
    gc.collect()
    assert model() is None  # nothing keeps the model's memory after shutdown


def test_a_model_that_fails_to_load_reports_the_error(data_dir):
    engine = Engine(EngineConfig(model="/no/such/model", data_dir=data_dir), wait=False)
    engine._ready.wait(30)
    assert engine.status()["state"] == "error"
    assert "model" in engine.status()["error"]
    with pytest.raises(EngineNotReady):
        engine.generate("hi")


def test_streamed_request_raises_on_error_result(stepped):
    stream = stepped.generate("x", max_new_tokens=3)
    stream.put({"type": "error", "message": "boom"})
    with pytest.raises(RequestError, match="boom"):
        stream.result()


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(tmp_path):
    with Engine(EngineConfig(model="default", data_dir=tmp_path)) as engine:
        answer = engine.complete(
            [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24
        )
    assert "Paris" in answer.text
    assert torch.get_default_dtype() == torch.float32


def test_a_broken_engine_iteration_fails_the_requests_in_flight_and_the_engine_goes_on(
    engine, monkeypatch
):
    real = engine.core.scheduler.schedule
    calls = {"n": 0}

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("scheduler bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.core.scheduler, "schedule", broken_once)
    stream = engine.generate("hi", max_new_tokens=3)
    events = list(stream)
    assert events[-1]["type"] == "error" and "scheduler bug" in events[-1]["message"]
    assert engine.complete("hi", max_new_tokens=3).finish_reason in ("length", "eos")


def test_an_engine_whose_iterations_keep_failing_reports_error_and_answers_503(engine, monkeypatch):
    monkeypatch.setattr(engine.core.scheduler, "schedule", lambda *a, **k: 1 / 0)
    stream = engine.generate("hi", max_new_tokens=3)
    assert list(stream)[-1]["type"] == "error"
    engine._thread.join(10)
    assert engine.status()["state"] == "error" and "ZeroDivisionError" in engine.status()["error"]
    with pytest.raises(EngineNotReady):
        engine.generate("hi")
    with pytest.raises(EngineNotReady):
        engine.jobs()


def scheduler_state(sched) -> tuple:
    seqs = [*sched.waiting, *sched.running]
    lines = (sched.costs.prefill, sched.costs.decode, sched.costs.train)
    return (
        [s.request_id for s in sched.waiting],
        [s.request_id for s in sched.running],
        {s.request_id: s.status for s in seqs},
        sched.costs.snapshot(),
        [sorted(line.samples) for line in lines],
    )


def test_the_executor_runs_what_it_is_told_and_changes_no_scheduler_state(stepped, monkeypatch):
    core, kinds = stepped.core, []
    execute = core.executor.execute

    def checked(out):
        before = scheduler_state(core.scheduler)
        result = execute(out)
        assert scheduler_state(core.scheduler) == before  # only update() changes it
        assert [s.request_id for s in stepped.core.executor.batch.seqs] == [
            s.request_id for s in [*core.scheduler.running, *out.admitted] if not s.is_finished
        ]  # the KV rows follow the scheduler's batch
        kinds.append(out.kind)
        return result

    monkeypatch.setattr(core.executor, "execute", checked)
    stepped.tune("t", [{"prompt": "a", "completion": "bcd"}] * 4, max_steps=2)
    streams = [stepped.generate(p, max_new_tokens=n) for p, n in zip(PROMPTS, (3, 9, 1, 6))]
    while any(s.final is None for s in streams) or core.trainer.active:
        stepped.iterate()
    assert {IterationKind.PREFILL, IterationKind.DECODE, IterationKind.TRAIN} <= set(kinds)
    assert [len(s.final["token_ids"]) for s in streams] == [3, 9, 1, 6]
    assert not core.scheduler.running and not core.executor.batch.seqs
