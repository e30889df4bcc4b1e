"""The layer walk: the runner's own pass over the layers equals the model's forward, and a
micro-step cut into units equals the whole one (tiny model, fp32)."""

import pytest
import torch
from conftest import PROMPTS, hf_greedy, run_until_done
from peft import LoraConfig, get_peft_model
from test_training import FAST, RECORDS
from transformers import DynamicCache

from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.data import Example, collate
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.models import build_tiny
from fineinfer_jupyter.engine.walk import LayerWalk, TrainingPass


def two_adapters():
    model, _ = build_tiny()
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(model, config, adapter_name="one")
    peft.add_adapter("two", config)
    return peft.eval()


def walk_logits(walk, ids, mask, positions, cache, rows, kind="train"):
    hidden = walk.embed(ids)
    p = walk.begin(hidden, mask=mask, position_ids=positions, cache=cache, adapters=rows)
    return walk.head(p, walk.layers(p, hidden, 0, walk.num_layers, kind=kind))


@torch.no_grad()
def test_the_walk_gives_the_models_own_logits_for_prefill_and_decode_with_mixed_adapters():
    model = two_adapters()
    walk = LayerWalk(model)
    assert walk.supported
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = ["one", "two", None]  # per row: two adapters and the base model
    theirs, mine = DynamicCache(config=model.config), DynamicCache(config=model.config)
    names = ["one", "two", "__base__"]
    ref = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=theirs, use_cache=True,
        adapter_names=names,
    ).logits  # fmt: skip
    assert torch.equal(walk_logits(walk, ids, mask, positions, mine, rows), ref)  # prefill
    for step in range(3):  # decode, the caches growing side by side
        ids = torch.tensor([[3 + step], [4], [5]])
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        positions = positions[:, -1:] + 1
        ref = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=theirs,
            use_cache=True, adapter_names=names,
        ).logits  # fmt: skip
        assert torch.equal(walk_logits(walk, ids, mask, positions, mine, rows), ref)
    assert not torch.equal(ref[0], ref[2])  # the adapters do change the answer


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("units_per_call", [1, 3, 100])
def test_a_micro_step_cut_into_units_gives_the_whole_steps_loss_and_gradients(units_per_call):
    model = two_adapters()
    model.set_adapter("one")
    examples = [
        Example(list(range(3, 23)), [-100] * 5 + list(range(8, 23))),
        Example(list(range(30, 42)), [-100] * 3 + list(range(33, 42))),
    ]
    batch = collate(examples, 0)
    whole = TrainingPass(None, model, batch, scale=0.1)  # the model's own forward, then backward
    whole.run(whole.units)
    expected, loss = grads(model), whole.loss_sum
    model.zero_grad(set_to_none=True)
    cut = TrainingPass(LayerWalk(model), model, batch, scale=0.1)
    assert cut.units == 2 * (model.config.num_hidden_layers + 1)
    while not cut.finished:
        left = cut.units - cut.done
        assert len(cut.run(units_per_call)) == min(units_per_call, left)
    got = grads(model)
    assert cut.loss_sum == pytest.approx(loss, rel=1e-6) and cut.labels == whole.labels == 24
    assert got.keys() == expected.keys() and len(got) == 28  # a's A and B: 2 layers x 7
    for name, g in expected.items():
        assert torch.allclose(got[name], g, rtol=1e-6, atol=1e-9), name


def test_decodes_between_the_units_of_a_micro_step_keep_their_tokens_and_its_loss(tmp_path):
    records = RECORDS * 2
    params = dict(FAST, batch_size=4, micro_batch_size=4, max_steps=1, checkpoint_every=100)
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "alone"), thread=False) as e:
        job = e.tune("herb", records, **params)["id"]
        e.core.trainer.micro_step()
        expected_loss = e.job(job)["loss"]
        expected_tokens = [e.complete(p, max_new_tokens=10).token_ids for p in PROMPTS[:2]]
    with Engine(
        EngineConfig(model="tiny", data_dir=tmp_path / "both", policy="immediate"), thread=False
    ) as e:
        job = e.tune("herb", records, **params)["id"]
        trainer = e.core.trainer
        assert trainer.work(3, 4).first == 0 and trainer.in_progress()[1] == 3  # of 6: paused
        streams = [e.generate(p, max_new_tokens=10) for p in PROMPTS[:2]]
        for i in range(4):
            e.iterate()  # prefill and decodes, the micro-step paused in between
            if i < 2:
                trainer.work(1)  # and one more unit of it between two iterations
            assert trainer.in_progress()[1] == 3 + min(i + 1, 2)
        run_until_done(e, streams)
        while trainer.active:
            trainer.work(5)
        assert [s.final["token_ids"] for s in streams] == expected_tokens
        assert e.job(job)["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_the_engine_walks_the_tiny_model_and_says_so(stepped):
    assert stepped.status()["layer_walk"] == {
        "enabled": True,
        "reason": None,
        "lean_decode": True,
        "lean_reason": None,
    }
    model, tokenizer = build_tiny()
    expected = hf_greedy(model.eval(), tokenizer, PROMPTS[2], 12)
    assert stepped.complete(PROMPTS[2], max_new_tokens=12).token_ids == expected
    walk = stepped.core.runner.walk
    walk.lean = False  # (the module calls: the same tokens)
    try:
        assert stepped.status()["layer_walk"]["lean_reason"] == "lean_decode is off"
        assert stepped.complete(PROMPTS[2], max_new_tokens=12).token_ids == expected
    finally:
        walk.lean = True


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_lean_decode_other_than_true_or_false_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="^lean_decode: must be true or false$"):
        EngineConfig(model="tiny", lean_decode=bad)


def test_a_hooked_or_training_layer_keeps_its_module_call():
    """lean.py bypasses the decoder layer's module call: a hook on it (or on its attention or
    MLP), or train mode, keeps the call, so that what hooks it sees its calls."""
    model, _ = build_tiny()
    walk = LayerWalk(model.eval())
    assert walk.lean_layer(0) is not None and walk.lean_why_not is None
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda *_: None)
    assert walk.lean_layer(0) is None and walk.lean_layer(1) is not None
    assert walk.lean_why_not == "1 of 2 decoder layers (LlamaDecoderLayer) keep the module call"
    handle.remove()
    assert walk.lean_layer(0) is not None
    model.train()
    assert walk.lean_layer(0) is None
