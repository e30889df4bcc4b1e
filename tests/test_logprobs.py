"""Logprobs the engine hands out: the prompt's own (echo, scoring) and each sampled token's, equal
to the log-softmax of the model's own forward, for base and adapter rows in one batch."""

from __future__ import annotations

import pytest
import torch
from conftest import run_until_done
from peft import PeftModel

from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.costmodel import LinearCost
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.models import load_model

PROMPT_A, PROMPT_B = "The quick brown fox", "Hello there, friend"  # one length: one pass
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1}


@pytest.fixture(params=["float32", "bfloat16"])
def dtype(request):
    return request.param


@pytest.fixture
def stepped(data_dir, dtype):
    engine = Engine(
        EngineConfig(model="tiny", data_dir=data_dir, policy="immediate", dtype=dtype),
        thread=False,
    )
    yield engine
    engine.shutdown()


def reference_logprobs(ids: list[int], dtype: str, adapter_dir=None) -> torch.Tensor:
    """log-softmax of the model's own forward over `ids`: [len(ids), V] (row t predicts t+1)."""
    model = load_model("tiny", dtype=dtype).model
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def test_echoed_prompt_logprobs_are_the_models_own_for_base_and_adapter_rows_in_one_batch(
    stepped, adapter_dirs, dtype
):
    stepped.load_adapter("alpha", adapter_dirs["alpha"])
    costs = stepped.core.scheduler.costs  # planned as one pass, whatever this machine measured
    costs.prefill, costs.decode = LinearCost(0.5, 1e-6), LinearCost(1e-3, 0.0)
    streams = [
        stepped.generate(PROMPT_A, max_new_tokens=0, prompt_logprobs=3),
        stepped.generate(PROMPT_B, adapter="alpha", max_new_tokens=0, prompt_logprobs=3),
    ]
    out = stepped.iterate()
    assert [len(group) for group in out.prefill] == [2]  # one pass, both rows
    run_until_done(stepped, streams)
    tolerance = TOLERANCE[dtype]
    cases = [(PROMPT_A, None), (PROMPT_B, adapter_dirs["alpha"])]
    for stream, (prompt, adapter) in zip(streams, cases, strict=True):
        final = stream.final
        assert final["finish_reason"] == "length" and final["token_ids"] == []
        assert final["usage"]["completion_tokens"] == 0
        (echo,) = [e for e in stream if "prompt_logprobs" in e]  # before any token
        echoed = echo["prompt_logprobs"]
        ids = stepped.core.tokenizer.encode(prompt)
        assert [e["id"] for e in echoed] == ids
        assert (echoed[0]["logprob"], echoed[0]["top"]) == (None, [])  # nothing predicts it
        assert "".join(e["token"] for e in echoed) == prompt == echo["prompt_text"]
        ref = reference_logprobs(ids, dtype, adapter)
        for t, entry in enumerate(echoed[1:]):
            row = ref[t]
            assert entry["logprob"] == pytest.approx(row[entry["id"]].item(), abs=tolerance)
            top = torch.topk(row, 3)
            assert [a["logprob"] for a in entry["top"]] == pytest.approx(
                top.values.tolist(), abs=tolerance
            )
            if dtype == "float32":
                assert [a["id"] for a in entry["top"]] == top.indices.tolist()
    assert stepped.core.scheduler.num_running == 0  # score-only requests never decode


def test_sampled_tokens_logprobs_are_ordered_and_agree_with_greedy_sampling(stepped, dtype):
    stream = stepped.generate(PROMPT_A, max_new_tokens=6, logprobs=5, prompt_logprobs=0)
    run_until_done(stepped, [stream])
    final = stream.final
    out, given = final["token_ids"], final["logprobs"]
    assert [e["id"] for e in given] == out and len(out) == 6
    ids = stepped.core.tokenizer.encode(PROMPT_A)
    events = list(stream)
    assert "prompt_logprobs" in events[0] and events[0]["text"] == ""  # the echo comes first
    assert [e["id"] for e in events[0]["prompt_logprobs"]] == ids
    assert all(e["top"] == [] for e in events[0]["prompt_logprobs"])  # 0 alternatives asked for
    streamed = [e for event in events[1:-1] for e in event.get("logprobs", [])]
    assert streamed == given[: len(streamed)] and len(streamed) >= 5  # deltas carry theirs
    ref = reference_logprobs(ids + out, dtype)
    for t, entry in enumerate(given):
        values = [a["logprob"] for a in entry["top"]]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert entry["top"][0]["id"] == entry["id"]  # temperature 0 takes the most likely
        assert entry["logprob"] == pytest.approx(entry["top"][0]["logprob"])
        row = ref[len(ids) - 1 + t]
        assert entry["logprob"] == pytest.approx(row[entry["id"]].item(), abs=TOLERANCE[dtype])


def test_a_score_only_request_is_one_prefill_between_training_steps(data_dir):
    """max_new_tokens 0: scheduled (deferred) like any request, one prefill, no decode, and the
    job trains before and after it."""
    engine = Engine(EngineConfig(model="tiny", data_dir=data_dir, policy="deferred"), thread=False)
    try:
        records = [{"text": "Moonveil is silver."}] * 8
        job = engine.tune("herb", records, r=4, max_steps=10_000, batch_size=1, max_length=32)
        kinds = [engine.iterate().kind.value for _ in range(4)]
        stream = engine.generate(PROMPT_A, max_new_tokens=0, prompt_logprobs=1)
        while stream.final is None:
            kinds.append(engine.iterate().kind.value)
        kinds += [engine.iterate().kind.value for _ in range(4)]
        assert kinds.count("prefill") == 1 and "decode" not in kinds, kinds
        first = kinds.index("prefill")
        assert "train" in kinds[:first] and "train" in kinds[first + 1 :], kinds
        assert stream.final["finish_reason"] == "length"
        assert engine.job(job["id"])["state"] == "running"
    finally:
        engine.shutdown()
