"""Engine.evaluate: held-out loss from the model's own forward, exact-match and contains rates
from greedy answers, the adapter and the base model side by side; training length and the
"still falling" test."""

import math

import pytest
import torch

from fineinfer_jupyter.engine.config import EngineConfig, TrainParams
from fineinfer_jupyter.engine.data import IGNORE, build_dataset
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.job import MAX_EPOCHS, MIN_STEPS, planned_steps, still_falling

QUESTIONS = ["Color of moonveil?", "Where grows glimmerroot?", "When does it bloom?", "Safe?"]


def chat(prompt):
    return [{"role": "user", "content": prompt}]


def norm(text):
    return " ".join(text.casefold().split()).rstrip(".!?").strip()


@pytest.fixture(
    params=[("float32", True), ("float32", False), ("bfloat16", True)],
    ids=["fp32-layer-walk", "fp32-own-forward", "bf16-layer-walk"],
)
def loaded(request, tmp_path, adapter_dirs):
    dtype, walk = request.param
    engine = Engine(
        EngineConfig(model="tiny", data_dir=tmp_path, policy="immediate", dtype=dtype),
        thread=False,
    )
    engine.load_adapter("alpha", adapter_dirs["alpha"])
    if not walk:  # a family the layer walk does not know runs the model's own forward
        engine.core.runner.walk.why_not = "test: the model's own forward"
    yield engine
    engine.shutdown()


def direct_loss(engine, records, adapter):
    """Sum of token losses / label tokens from the PEFT model's own forward, one example at a
    time (adapter_names picks the adapter per row)."""
    model = engine.core.runner.model
    data = build_dataset(records, engine.core.tokenizer.copy(), max_length=4096)
    total, n = 0.0, 0
    with torch.no_grad():
        for e in data.train:
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids, adapter_names=[adapter or "__base__"]).logits.float()
            labels = torch.tensor(e.labels[1:])
            losses = torch.nn.functional.cross_entropy(
                logits[0, :-1], labels, ignore_index=IGNORE, reduction="sum"
            )
            total, n = total + float(losses), n + int((labels != IGNORE).sum())
    return total / n


def test_eval_numbers_match_the_models_forward_and_greedy_answers(loaded):
    # two references are the base model's own greedy answers (cut short), two are not
    base_answers = [loaded.complete(chat(q), max_new_tokens=6).text for q in QUESTIONS[:2]]
    records = [{"prompt": q, "completion": a} for q, a in zip(QUESTIONS, base_answers)]
    records += [{"prompt": q, "completion": "Silver blue."} for q in QUESTIONS[2:]]
    result = loaded.evaluate("alpha", records, compare=["base"])
    assert result["examples"] == 4 and [m["model"] for m in result["models"]] == ["alpha", "base"]
    tolerance = 1e-4 if loaded.config.dtype == "float32" else 2e-2
    for m in result["models"]:
        adapter = None if m["model"] == "base" else "alpha"
        expected = direct_loss(loaded, records, adapter)
        assert m["loss"] == pytest.approx(expected, rel=tolerance)
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        # exact match and contains: greedy answers of the same budget, checked here
        data = build_dataset(records, loaded.core.tokenizer.copy(), max_length=4096)
        exact = contains = 0
        for e in data.train:
            labels = sum(1 for t in e.labels[1:] if t != IGNORE)
            text = loaded.complete(e.prompt, adapter=adapter, max_new_tokens=labels + 8).text
            exact += norm(text) == norm(e.answer)
            contains += norm(e.answer) in norm(text)
        assert (m["answers"], m["exact_match"], m["contains"]) == (4, exact / 4, contains / 4)
    base = result["models"][1]
    assert base["contains"] >= 0.5  # its own answers, at least
    assert len(result["rows"]) == 3 and set(result["rows"][0]["answers"]) == {"alpha", "base"}


def test_eval_uses_the_examples_the_job_held_out(tmp_path):
    records = [{"prompt": q, "completion": f"Answer {i}."} for i, q in enumerate(QUESTIONS * 2)]
    engine = Engine(EngineConfig(model="tiny", data_dir=tmp_path, policy="immediate"), thread=False)
    try:
        job = engine.tune("herb", records, max_steps=4, val_fraction=0.25, learning_rate=1e-2)
        while engine.core.trainer.current or engine.core.trainer.queue:
            engine.iterate()
        job = engine.job(job["id"])
        held_out = engine.core.trainer.get(job["id"]).dataset.val
        result = engine.evaluate("herb", compare=[])
        assert result["data"] == f"held out by {job['id']}" and result["examples"] == 2
        assert [r["reference"] for r in result["rows"]] == [e.answer for e in held_out]
        # the job's own last validation loss is the same computation
        assert result["models"][0]["loss"] == pytest.approx(job["eval_loss"], rel=1e-5)
        assert job["eval_history"][-1] == [4, job["eval_loss"]]
        with pytest.raises(ValueError, match="'alpha' has no held-out examples|no adapter named"):
            engine.evaluate("alpha")
    finally:
        engine.shutdown()


def test_without_epochs_or_max_steps_a_small_data_set_trains_several_epochs():
    auto = TrainParams()
    assert planned_steps(auto, 10) == MIN_STEPS  # 40 records, batch 4: 150 steps, 15 epochs
    assert planned_steps(auto, 2) == 2 * MAX_EPOCHS  # tiny: at most MAX_EPOCHS epochs
    assert planned_steps(auto, 1000) == 1000  # large: one epoch
    assert planned_steps(TrainParams(epochs=1), 10) == 10
    assert planned_steps(TrainParams(max_steps=7), 10) == 7


def test_loss_still_falling_compares_the_last_quarter_with_the_one_before():
    assert still_falling([1.0] * 7) is None
    assert still_falling([4, 3.5, 3, 2.5, 2, 1.8, 1.6, 1.4]) is True
    assert still_falling([4, 3, 2, 1, 1.0, 1.01, 0.99, 1.0]) is False
