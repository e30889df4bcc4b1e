"""On a CUDA device (`make gpu-check`; skipped elsewhere): the walk in bf16, offload from pinned
memory with the next layer prefetched on a side stream, a micro-step in units, the out-of-memory
path, and the device memory offload leaves used, under the budget."""

import pytest
import torch
from conftest import PROMPTS
from test_offload_load import save_llama
from test_training import FAST, RECORDS
from test_walk import two_adapters, walk_logits
from transformers import DynamicCache

from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.data import Example, collate
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.walk import LayerWalk, TrainingPass

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
JOB = dict(FAST, batch_size=4, micro_batch_size=2, max_steps=2, checkpoint_every=100)


def engine(tmp_path, name, **config) -> Engine:
    return Engine(
        EngineConfig(
            model=config.pop("model", "tiny"),
            device="cuda",
            dtype=config.pop("dtype", "bfloat16"),
            data_dir=tmp_path / name,
            cache_dir=tmp_path / "cache",
            policy="immediate",
            **config,
        ),
        thread=False,
    )


@torch.no_grad()
def test_the_walk_gives_the_models_own_logits_in_bf16_on_cuda():
    model = two_adapters().to(CUDA, torch.bfloat16)
    walk = LayerWalk(model)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], device=CUDA)
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    theirs, mine = DynamicCache(config=model.config), DynamicCache(config=model.config)
    ref = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=theirs, use_cache=True,
        adapter_names=["one", "__base__"],
    ).logits  # fmt: skip
    got = walk_logits(walk, ids, mask, positions, mine, ["one", None])
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_a_micro_step_in_units_on_cuda_gives_the_whole_steps_gradients():
    model = two_adapters().to(CUDA)
    model.set_adapter("one")
    batch = collate([Example(list(range(3, 23)), [-100] * 5 + list(range(8, 23)))], 0)
    batch = {k: v.to(CUDA) for k, v in batch.items()}
    whole = TrainingPass(None, model, batch, scale=0.1)
    whole.run(whole.units)
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    cut = TrainingPass(LayerWalk(model), model, batch, scale=0.1)
    while not cut.finished:
        cut.run(1)
    for n, p in model.named_parameters():
        if n in expected:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6)


def test_offload_from_pinned_memory_with_prefetch_gives_the_same_tokens(tmp_path):
    with engine(tmp_path, "plain") as e:
        expected = [e.complete(p, max_new_tokens=8, ignore_eos=True).token_ids for p in PROMPTS]
    with engine(tmp_path, "cpu", offload="cpu", memory_budget=0) as e:
        off = e.core.runner.walk.offload
        assert off.prefetching and off._stream is not None
        assert all(t.is_pinned() for entry in off.layers.values() for t in entry.host)
        got = [e.complete(p, max_new_tokens=8, ignore_eos=True).token_ids for p in PROMPTS]
        e.tune("herb", RECORDS * 2, **JOB)
        while e.core.trainer.active:
            e.iterate()
        assert off.held == 0 and off.peak_held <= 2 * off.layer_bytes
    assert got == expected


def test_out_of_memory_fails_the_request_alone_and_the_engine_serves_the_next(tmp_path):
    with engine(tmp_path, "oom", max_batch_size=4) as e:
        free, _ = torch.cuda.mem_get_info()
        hog = torch.empty(max(free - (2 << 20), 0), dtype=torch.uint8, device=CUDA)  # leave 2 MiB
        try:
            stream = e.generate("x" * 900, max_new_tokens=120, ignore_eos=True)
            while stream.final is None:
                e.iterate()
            final = stream.final
        finally:
            del hog
            torch.cuda.empty_cache()
        if final["type"] != "error":
            pytest.skip("2 MiB left were enough for this request on this GPU")
        assert "out of memory" in final["message"]
        assert len(e.complete(PROMPTS[0], max_new_tokens=4, ignore_eos=True).token_ids) == 4


def test_peak_device_memory_with_disk_offload_stays_under_the_budget(tmp_path):
    folder = save_llama(tmp_path / "m", hidden=512, layers=8)  # 8 layers of 15 MiB in fp32
    budget = 2 * (15 << 19) + (1 << 20)  # two layers resident (bf16: 7.5 MiB and two norms)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with engine(tmp_path, "disk", model=str(folder), offload="disk", memory_budget=budget) as e:
        off = e.core.runner.walk.offload
        assert len(off.offloaded) == 6
        e.complete(PROMPTS[0], max_new_tokens=8, ignore_eos=True)
        peak = torch.cuda.max_memory_allocated() - base
    # budget + embeddings and head (small here) + two layers in flight + activations (64 MiB)
    assert peak <= budget + 2 * off.layer_bytes + (64 << 20), peak / 2**20
