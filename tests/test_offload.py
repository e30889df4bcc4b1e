"""Layer offload (tiny model): the same tokens and losses as without it, one fetch per layer for
an inference pass and a training forward together, LoRA weights never moved."""

import pytest
import torch
from conftest import PROMPTS, run_until_done
from test_training import FAST, RECORDS

from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.outputs import SchedulerOutput

JOB = dict(FAST, batch_size=4, micro_batch_size=2, max_steps=3, checkpoint_every=100)


def engine(tmp_path, name: str, **config) -> Engine:
    return Engine(
        EngineConfig(
            model="tiny",
            data_dir=tmp_path / name,
            cache_dir=tmp_path / "cache",
            policy="immediate",
            **config,
        ),
        thread=False,
    )


def serve_and_train(e: Engine) -> tuple[list, list, list]:
    tokens = [e.complete(p, max_new_tokens=12).token_ids for p in PROMPTS]
    job = e.tune("herb", RECORDS * 2, **JOB)["id"]
    streams = [e.generate(p, max_new_tokens=12) for p in PROMPTS[:2]]
    run_until_done(e, streams)  # (immediate: training in between, once they are done)
    while e.core.trainer.active:
        e.iterate()
    adapted = e.complete(PROMPTS[0], adapter="herb", max_new_tokens=12).token_ids
    losses = [loss for _, loss in e.job(job)["loss_history"]]
    return tokens + [s.final["token_ids"] for s in streams], losses, adapted


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_offloaded_layers_give_the_same_tokens_and_losses(tmp_path, mode):
    with engine(tmp_path, "plain") as e:
        expected = serve_and_train(e)
    with engine(tmp_path, mode, offload=mode, memory_budget=0) as e:
        got = serve_and_train(e)
        offload = e.metrics_snapshot()["offload"]
        lora = [p for n, p in e.core.runner.model.named_parameters() if "lora_" in n]
        assert lora and all(p.numel() > 0 for p in lora)  # never offloaded
        assert all(p.device.type == "cpu" for p in lora)
        assert e.status()["offload"]["layers"] == 2
    (tokens, losses, adapted), (tokens0, losses0, adapted0) = got, expected
    assert tokens == tokens0 and adapted == adapted0
    # (fetched weights sit at other addresses, where a matmul may take another SIMD path: the
    # losses agree to float rounding, not always to the last bit)
    assert losses == pytest.approx(losses0, rel=1e-6)
    assert offload["enabled"] and offload["mode"] == mode and offload["layers"] == 2
    assert offload["by_source"] == {mode: offload["bytes_total"]} and offload["bytes_total"] > 0
    assert set(offload["by_kind"]) == {"prefill", "decode", "train"}
    if mode == "disk":
        files = sorted((tmp_path / "cache" / "offload").rglob("layer-*.safetensors"))
        assert len(files) == 2 and all(f.stat().st_size > 100_000 for f in files)


def test_half_the_layers_over_budget_stay_resident(tmp_path):
    with engine(tmp_path, "half", offload="cpu", memory_budget=150_000) as e:
        off = e.core.runner.walk.offload
        assert off.offloaded == [1]  # layer 0 (147,968 bytes) fits, layer 1 does not
        assert all(p.numel() == 0 for p in e.core.runner.walk.stack.layers[1].parameters())
        assert all(p.numel() > 0 for p in e.core.runner.walk.stack.layers[0].parameters())
        before = e.metrics_snapshot()["offload"]["fetches"]  # (calibration fetched too)
        e.complete(PROMPTS[0], max_new_tokens=4, ignore_eos=True)
        assert e.metrics_snapshot()["offload"]["fetches"] - before == 4  # layer 1, once a pass


def test_a_combined_iteration_fetches_each_layer_once_for_decode_and_training(tmp_path):
    with engine(tmp_path, "plain") as e:
        expected = e.complete(PROMPTS[1], max_new_tokens=8, ignore_eos=True).token_ids
        job = e.tune("herb", RECORDS * 2, **dict(JOB, max_steps=1))["id"]
        while e.core.trainer.active:
            e.core.trainer.micro_step()
        expected_loss = e.job(job)["loss"]
    with engine(tmp_path, "both", offload="cpu", memory_budget=0) as e:
        core = e.core
        layers, layer_bytes = 2, core.runner.walk.offload.layer_bytes
        job = e.tune("herb", RECORDS * 2, **dict(JOB, max_steps=1))["id"]
        stream = e.generate(PROMPTS[1], max_new_tokens=8, ignore_eos=True)
        e.iterate()  # the prefill

        def run(**work) -> dict:
            before = dict(e.metrics_snapshot()["offload"]["by_kind"])
            out = SchedulerOutput(**work)
            core.scheduler.update(out, core.executor.execute(out))
            after = e.metrics_snapshot()["offload"]["by_kind"]
            return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k)}

        rows = core.scheduler.running
        # combined: one decode pass whose layers also run the micro-step's forward
        assert run(decode=list(rows), train_units=layers, train_examples=2) == {
            "decode": layers * layer_bytes
        }
        assert core.trainer.in_progress()[1] == layers  # both forwards ran, nothing fetched twice
        assert run(train_units=99) == {"train": layers * layer_bytes}  # the backward fetches again
        # separate: a decode, then the next micro-step's forward on its own
        assert run(decode=list(rows)) == {"decode": layers * layer_bytes}
        assert run(train_units=layers, train_examples=2) == {"train": layers * layer_bytes}
        assert e.metrics_snapshot()["offload"]["shared_bytes"] == layers * layer_bytes
        while core.trainer.active:
            run(train_units=99)
        run_until_done(e, [stream])
        assert stream.final["token_ids"] == expected  # decodes among training: same tokens
        assert e.job(job)["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_offload_needs_the_layer_walk(tmp_path, monkeypatch):
    from fineinfer_jupyter.engine import walk

    monkeypatch.setattr(walk, "FAMILIES", {"qwen2": walk.Family()})  # as if tiny did not walk
    e = Engine(
        EngineConfig(model="tiny", data_dir=tmp_path, offload="disk", memory_budget=0),
        wait=False,
    )
    e._ready.wait(60)
    assert e.status()["state"] == "error" and "offload: needs the layer walk" in e.status()["error"]


def test_gradients_through_offloaded_layers_equal_resident_ones(tmp_path):
    grads = {}
    for mode in ("none", "disk"):
        with engine(tmp_path, mode, offload=mode, memory_budget=0) as e:
            e.tune("herb", RECORDS * 2, **dict(JOB, max_steps=1, batch_size=2))
            trainer = e.core.trainer
            trainer.work(0, 2)  # start the micro-step, then every unit but the optimizer's
            run = trainer.run
            run.run(run.units)
            run.add_grads()  # (the trainer adds them at the micro-step's end)
            grads[mode] = {
                n: p.grad.clone()
                for n, p in e.core.runner.model.named_parameters()
                if p.grad is not None
            }
    assert grads["none"].keys() == grads["disk"].keys() and len(grads["none"]) == 28
    for name, g in grads["none"].items():
        assert torch.equal(grads["disk"][name], g), name
