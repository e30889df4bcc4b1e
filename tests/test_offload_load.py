"""Layer offload of a model brought as a Hugging Face folder: the layers over the budget go from
the checkpoint to their home (host memory or per-layer files) without being loaded whole, in
fp32 and bf16, with the same tokens and losses as without offload; the byte counters say what
is on the device; peak RSS stays under the budget plus a stated overhead."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS
from safetensors import safe_open
from test_training import FAST, RECORDS

from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.engine import Engine

ROOT = Path(__file__).parent.parent
JOB = dict(FAST, batch_size=4, micro_batch_size=2, max_steps=2, checkpoint_every=100)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
PLAIN: dict[str, tuple] = {}  # dtype -> what the engine did without offload


def save_llama(folder: Path, *, hidden: int, layers: int, tied: bool = False) -> Path:
    """A random Llama saved as a Hugging Face folder (safetensors, ByT5 tokenizer)."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama") / "llama", hidden=64, layers=3, tied=True)


def engine(folder, tmp_path, name, dtype, **config) -> Engine:
    return Engine(
        EngineConfig(
            model=str(folder),
            dtype=dtype,
            data_dir=tmp_path / name,
            cache_dir=tmp_path / "cache",
            policy="immediate",
            **config,
        ),
        thread=False,
    )


def serve_and_train(e: Engine) -> tuple[list, list]:
    tokens = [e.complete(p, max_new_tokens=8, ignore_eos=True).token_ids for p in PROMPTS[:2]]
    job = e.tune("herb", RECORDS * 2, **JOB)["id"]
    while e.core.trainer.active:
        e.iterate()
    tokens.append(e.complete(PROMPTS[0], adapter="herb", max_new_tokens=8).token_ids)
    return tokens, [loss for _, loss in e.job(job)["loss_history"]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_a_folder_loaded_with_offload_gives_the_same_tokens_and_losses(
    llama, tmp_path, mode, dtype
):
    if dtype not in PLAIN:  # (once per dtype)
        with engine(llama, tmp_path, "plain", dtype) as e:
            shares = list(e.core.scheduler.costs.shares)  # (before units are measured)
            named = e.core.runner.walk.stack.layers[0].named_parameters()
            layer = sum(p.numel() * p.element_size() for n, p in named if "lora_" not in n)
            PLAIN[dtype] = (*serve_and_train(e), shares, e.status()["model"]["parameters"], layer)
    tokens0, losses0, shares, parameters, layer = PLAIN[dtype]
    with engine(llama, tmp_path, mode, dtype, offload=mode, memory_budget=layer) as e:
        off = e.core.runner.walk.offload
        assert off.offloaded == [1, 2] and off.layer_bytes == layer  # layer 0 fits
        stack = e.core.runner.walk.stack
        assert all(p.numel() == 0 for p in stack.layers[2].parameters())
        # (from the shapes, not the empty parameters of the offloaded layers)
        assert e.core.scheduler.costs.shares == shares
        tokens, losses = serve_and_train(e)
        assert e.status()["model"]["parameters"] == parameters
        assert off.held == 0 and off.peak_held == layer  # one layer at a time, none left
        if mode == "disk":
            files = sorted((tmp_path / "cache" / "offload").rglob("layer-*.safetensors"))
            assert [f.name[:9] for f in files] == ["layer-001", "layer-002"]
            with safe_open(str(files[0]), framework="pt") as f:
                assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    assert tokens == tokens0
    assert losses == pytest.approx(losses0, rel=TOLERANCE[dtype])


def test_unit_weights_count_the_offloaded_layers(tmp_path):
    plain = Engine(EngineConfig(model="tiny", data_dir=tmp_path / "a"), thread=False)
    with plain:
        expected = plain.core.scheduler.costs.shares
    config = dict(offload="cpu", memory_budget=0, cache_dir=tmp_path / "cache")
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path / "b", **config), thread=False) as e:
        assert e.core.runner.walk.offload.offloaded == [0, 1]
        assert e.core.scheduler.costs.shares == expected
        assert expected[2] < 20 * expected[0]  # the head's forward in layers (1e5 with 0 counted)


def test_a_paused_micro_step_leaves_no_prefetched_layer_on_the_device(llama, tmp_path):
    with engine(llama, tmp_path, "cpu", "float32", offload="cpu", memory_budget=0) as e:
        off = e.core.runner.walk.offload
        off.prefetching = True  # as on CUDA (on a CPU the copy happens at once)
        layer = off.layer_bytes
        e.tune("herb", RECORDS * 2, **dict(JOB, max_steps=1))
        trainer = e.core.trainer
        trainer.work(1, 2)  # the first unit: layer 0's forward; the micro-step pauses
        assert trainer.run.done == 1
        assert off.held == 0  # (it held layer 1, prefetched for a unit that had not come)
        off.peak_held, hits = 0, off.prefetch_hits
        e.complete(PROMPTS[0], max_new_tokens=3, ignore_eos=True)  # 3 passes over 3 layers
        assert off.prefetch_hits - hits == 3 * 2  # layers 1 and 2 came from their prefetch
        assert off.held == 0 and off.peak_held == 2 * layer  # the running layer and the next
        trainer.work(99)
        assert off.held == 0


def test_a_failed_layer_drops_the_prefetched_one(tmp_path):
    config = dict(offload="cpu", memory_budget=0, cache_dir=tmp_path / "cache")
    with Engine(EngineConfig(model="tiny", data_dir=tmp_path, **config), thread=False) as e:
        off = e.core.runner.walk.offload
        off.prefetching = True
        off.prefetch(1)
        with pytest.raises(RuntimeError, match="boom"), off.resident(0, "decode"):
            raise RuntimeError("boom")
        assert off.held == 0 and not off._prefetched


# -- peak RSS (a subprocess per run: ru_maxrss is a process's peak) ----------------------------

CHILD = textwrap.dedent(
    """
    import json, re, sys, tempfile
    from fineinfer_jupyter.engine import Engine, EngineConfig
    import accelerate.hooks  # (imported by the offloaded load: in the baseline)

    def peak():  # this process's peak RSS (ru_maxrss would start at the parent's, from fork)
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+)", f.read())[1]) * 1024

    folder, offload, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tmp = tempfile.mkdtemp()
    with Engine(EngineConfig(model="tiny", data_dir=tmp, cache_dir=tmp), thread=False) as e:
        e.complete("warm up", max_new_tokens=2)  # every import and first-use allocation
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from what is resident now
    base = peak()
    config = EngineConfig(model=folder, data_dir=tmp, cache_dir=tmp, offload=offload,
                          memory_budget=budget, policy="immediate", dtype="float32")
    with Engine(config, thread=False) as e:
        load = peak()
        for p in ("Hello there", "The quick brown fox"):
            e.complete(p, max_new_tokens=8, ignore_eos=True)
        serve = peak()
        layer = e.core.runner.walk.offload.layer_bytes if offload != "none" else 0
    print(json.dumps({"base": base, "load": load - base, "serve": serve - base, "layer": layer}))
    """
)


def peak_rss(folder: Path, offload: str, budget: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), offload, str(budget)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_peak_rss_with_disk_offload_stays_under_the_budget_plus_the_overhead(tmp_path):
    folder = save_llama(tmp_path / "m", hidden=512, layers=5)  # 5 layers of 15 MiB, fp32
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    plain = peak_rss(folder, "none", 0)
    layer = 15 << 20
    disk = peak_rss(folder, "disk", layer)  # budget: one layer resident
    assert disk["layer"] == pytest.approx(layer, rel=0.01)
    # what the engine needs beside the weights (calibration's activations, the allocator): what
    # no offload adds to them. Stated overhead: the weights outside the layers, plus the larger
    # of three layers (loading: a layer read from the checkpoint, the two copies safetensors
    # makes to write its file) and that need plus a fetched layer; plus 8 MiB
    engine_own = max(plain["serve"] - weights, 0)
    outside = weights - 5 * disk["layer"]  # embeddings, head, final norm: always on the device
    overhead = outside + max(3 * disk["layer"], engine_own + disk["layer"]) + (8 << 20)
    assert plain["serve"] >= weights, plain  # the measure sees the whole model without offload
    assert disk["load"] <= layer + overhead, (disk, plain, weights)
    assert disk["serve"] <= layer + overhead, (disk, plain, weights)
    assert disk["serve"] < plain["serve"] - 2 * disk["layer"]
