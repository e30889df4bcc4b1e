"""Adapters exported for llama.cpp / Ollama (a LoRA .gguf) and vLLM (a checked PEFT folder):
the file read back, the refusals, the engine method, the HTTP route and the magic."""

from __future__ import annotations

import json
import shlex
import time

import gguf
import numpy as np
import pytest
import torch
from conftest import make_adapter
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from fineinfer_jupyter.engine import UnknownName, export
from fineinfer_jupyter.engine.models import build_tiny

pytest_plugins = ["pytest_jupyter.jupyter_server", "server_fixtures", "kernel_fixtures"]
pytestmark = pytest.mark.timeout(120)

LINEAR = {  # PEFT module -> llama.cpp tensor, in a Llama block
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_base(**extra) -> export.Base:
    model, _ = build_tiny()
    return export.Base(model.config.to_dict(), "LlamaForCausalLM", "tiny", **extra)


def peft_folder(path, **config):
    """A PEFT folder over the tiny model with random (non-zero) A and B."""
    model, _ = build_tiny()
    torch.manual_seed(3)
    options = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, LoraConfig(**{**options, **config})).save_pretrained(path)
    return path


def read_gguf(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def peft_pairs(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    state = load_file(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers."
    return {
        k.removeprefix(prefix).removesuffix(".lora_A.weight"): (
            state[k],
            state[k.replace("lora_A", "lora_B")],
        )
        for k in state
        if k.endswith("lora_A.weight")
    }


# -- llama.cpp's .gguf ------------------------------------------------------------------------


def test_gguf_read_back_has_the_metadata_and_the_peft_weights_laid_out_for_llama_cpp(tmp_path):
    folder = peft_folder(tmp_path / "peft")
    base = tiny_base()
    info = export.write_gguf(folder, base, tmp_path / "out" / "herb.gguf", name="herb")
    assert info == {"modules": 14, "r": 4, "alpha": 8.0, "arch": "llama"}
    fields, tensors = read_gguf(tmp_path / "out" / "herb.gguf")
    assert fields == {
        "general.architecture": "llama",
        "general.type": "adapter",
        "adapter.type": "lora",
        "adapter.lora.alpha": 8.0,
        "general.name": "herb",
        "general.base_model.count": 1,
        "general.base_model.0.name": "tiny",
        "general.quantization_version": 2,
    }
    expected = {
        f"blk.{layer}.{name}.weight.lora_{part}"
        for layer in (0, 1)
        for name in LINEAR.values()
        for part in "ab"
    }
    assert set(tensors) == expected
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    undo = LlamaTensorProcessor(config=heads)  # how transformers reads llama.cpp's q/k rows
    for module, (a, b) in peft_pairs(folder).items():
        layer, hf = module.split(".", 1)
        name = f"blk.{layer}.{LINEAR[hf]}.weight"
        ta, tb = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert (ta.tensor_type, tb.tensor_type) == (gguf.GGMLQuantizationType.F32,) * 2
        # ggml lists dimensions innermost first: A is {in, r}, B is {r, out}
        assert list(ta.shape) == [a.shape[1], 4] and list(tb.shape) == [4, b.shape[0]]
        assert np.array_equal(ta.data, a.numpy())
        rows = undo.process(np.array(tb.data), name).weights
        assert np.array_equal(rows, b.numpy()), module
        if hf in ("self_attn.q_proj", "self_attn.k_proj"):
            assert not np.array_equal(tb.data, b.numpy())  # rows are reordered for llama.cpp


def test_rslora_and_alpha_pattern_keep_each_modules_scale_under_one_alpha(tmp_path):
    folder = peft_folder(
        tmp_path / "peft", r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 2}
    )
    info = export.write_gguf(folder, tiny_base(), tmp_path / "x.gguf", name="x")
    assert info["alpha"] == pytest.approx(8 * 4**0.5)  # llama.cpp applies alpha / r = 8 / sqrt(4)
    _, tensors = read_gguf(tmp_path / "x.gguf")
    pairs = peft_pairs(folder)
    _, v = pairs["0.self_attn.v_proj"]
    assert np.array_equal(tensors["blk.0.attn_v.weight.lora_b"].data, v.numpy())
    _, down = pairs["1.mlp.down_proj"]  # PEFT scales it by 2 / sqrt(4), a quarter of the rest
    assert np.allclose(tensors["blk.1.ffn_down.weight.lora_b"].data, down.numpy() / 4, rtol=1e-6)


def test_qwen2_names_its_tensors_without_reordering_rows(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    get_peft_model(
        Qwen2ForCausalLM(config),
        LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False),
    ).save_pretrained(tmp_path / "peft")
    base = export.Base(config.to_dict(), "Qwen2ForCausalLM", "qwen")
    assert (
        export.write_gguf(tmp_path / "peft", base, tmp_path / "q.gguf", name="q")["arch"] == "qwen2"
    )
    fields, tensors = read_gguf(tmp_path / "q.gguf")
    assert fields["general.architecture"] == "qwen2"
    _, b = peft_pairs(tmp_path / "peft")["0.self_attn.k_proj"]
    assert sorted(tensors) == [f"blk.0.attn_{x}.weight.lora_{p}" for x in "kq" for p in "ab"]
    assert np.array_equal(tensors["blk.0.attn_k.weight.lora_b"].data, b.numpy())


def renamed(folder, old: str, new: str):
    """The same adapter with one module renamed in its weights and config."""
    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    save_file({k.replace(old, new): v for k, v in state.items()}, str(path))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = [new if m == old else m for m in config["target_modules"]]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "config, message",
    [
        (
            dict(use_dora=True),
            "use_dora: a DoRA adapter has magnitude vectors that a LoRA file (A/B pairs) cannot "
            "hold; train without DoRA to export",
        ),
        (
            dict(modules_to_save=["lm_head"]),
            "modules_to_save: the adapter carries full copies of lm_head, which a LoRA file "
            "cannot hold",
        ),
        (dict(bias="lora_only"), "bias: the adapter trains biases, which a LoRA file cannot hold"),
        (
            dict(target_modules=["q_proj", "embed_tokens"]),
            "target_modules: model.embed_tokens is an embedding; only linear layers are exported",
        ),
    ],
)
def test_what_a_lora_gguf_cannot_hold_is_refused_in_one_line(tmp_path, config, message):
    folder = peft_folder(tmp_path / "peft", **config)
    with pytest.raises(ValueError) as refused:
        export.write_gguf(folder, tiny_base(), tmp_path / "x.gguf", name="x")
    assert str(refused.value) == message
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_modules_llama_cpp_does_not_name_are_refused(tmp_path):
    folder = peft_folder(tmp_path / "peft", target_modules=["q_proj", "up_proj"])
    renamed(folder, "up_proj", "adapter_proj")
    with pytest.raises(ValueError) as refused:
        export.write_gguf(folder, tiny_base(), tmp_path / "x.gguf", name="x")
    assert str(refused.value) == (
        "target_modules: llama.cpp has no tensor for 'model.layers.0.mlp.adapter_proj' "
        "in a LlamaForCausalLM"
    )
    half = peft_folder(tmp_path / "half", target_modules=["q_proj"])
    state = load_file(str(half / "adapter_model.safetensors"))
    del state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(state, str(half / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as refused:
        export.write_gguf(half, tiny_base(), tmp_path / "x.gguf", name="x")
    assert str(refused.value) == "adapter: model.layers.1.self_attn.q_proj has no lora_B weight"
    tied = tiny_base()
    tied.config["tie_word_embeddings"] = True
    folder = peft_folder(tmp_path / "head", target_modules=["lm_head"])
    with pytest.raises(ValueError, match="^target_modules: lm_head is tied to the embeddings"):
        export.write_gguf(folder, tied, tmp_path / "x.gguf", name="x")
    other = export.Base({}, "GPT2LMHeadModel", "gpt2")
    with pytest.raises(ValueError) as refused:
        export.write_gguf(folder, other, tmp_path / "x.gguf", name="x")
    assert str(refused.value) == (
        "base: llama.cpp export knows LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
        "Qwen3ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, "
        "Phi3ForCausalLM; this model is a GPT2LMHeadModel"
    )
    assert not (tmp_path / "x.gguf").exists()


def test_with_a_base_gguf_an_ollama_modelfile_and_the_commands_come_along(tmp_path):
    folder = peft_folder(tmp_path / "peft")
    base = tiny_base(gguf="/models/base model.gguf")
    out = tmp_path / "my exports" / "Herb_2.gguf"
    result = export.export(folder, "gguf", base, out, name="Herb_2")
    modelfile = out.with_suffix(".Modelfile")
    assert result["files"] == [str(out), str(modelfile)] and result["path"] == str(out)
    assert modelfile.read_text() == (
        "# Ollama: the base model plus the LoRA adapter (written by fineinfer)\n"
        f"FROM /models/base model.gguf\nADAPTER {out}\n"
    )
    assert result["commands"] == [
        f"llama-cli -m '/models/base model.gguf' --lora '{out}'",
        f"ollama create herb-2 -f '{modelfile}'",
        "ollama run herb-2",
    ]
    assert shlex.split(result["commands"][0])[-1] == str(out)
    no_gguf = export.export(
        folder, "gguf", tiny_base(folder="/hf/tiny"), tmp_path / "t.gguf", name="t"
    )
    assert no_gguf["files"] == [str(tmp_path / "t.gguf")]
    assert no_gguf["commands"][1:] == [
        "python convert_hf_to_gguf.py /hf/tiny --outfile base.gguf",
        f"llama-cli -m base.gguf --lora {tmp_path / 't.gguf'}",
    ]


# -- vLLM -------------------------------------------------------------------------------------------


def test_vllm_check_passes_plain_lora_and_names_the_rank_the_server_needs(tmp_path):
    assert export.check_vllm(peft_folder(tmp_path / "a"), tiny_base()) == {
        "r": 4,
        "max_lora_rank": 16,
    }
    assert export.check_vllm(peft_folder(tmp_path / "b", r=17), tiny_base()) == {
        "r": 17,
        "max_lora_rank": 32,
    }
    scratch = peft_folder(tmp_path / "c", r=40)
    result = export.export(scratch, "vllm", tiny_base(folder="/hf/tiny"), tmp_path / "v", name="c")
    assert not scratch.exists() and result["path"] == str(tmp_path / "v")
    assert result["files"] == [
        str(tmp_path / "v" / "README.md"),
        str(tmp_path / "v" / "adapter_config.json"),
        str(tmp_path / "v" / "adapter_model.safetensors"),
    ]
    body = json.dumps({"lora_name": "c", "lora_path": str(tmp_path / "v")})
    assert result["commands"] == [
        f"vllm serve /hf/tiny --enable-lora --lora-modules c={tmp_path / 'v'} --max-lora-rank 64",
        "# or into a running server (started with --enable-lora and "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True):",
        "curl -X POST http://localhost:8000/v1/load_lora_adapter "
        f"-H 'Content-Type: application/json' -d '{body}'",
    ]


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(use_dora=True), "use_dora: a DoRA adapter has magnitude vectors"),
        (
            dict(target_modules=["q_proj", "lm_head"]),
            "target_modules: vLLM applies LoRA to q_proj, k_proj, v_proj, o_proj, gate_proj, "
            "up_proj, down_proj of a LlamaForCausalLM, not lm_head",
        ),
        (
            dict(rank_pattern={"down_proj": 8}),
            "rank_pattern: vLLM scales every module by one lora_alpha / r; this adapter sets "
            "them per module",
        ),
        (dict(r=600), "r: vLLM takes ranks up to 512; this adapter has r=600"),
    ],
)
def test_what_vllm_refuses_is_refused_in_one_line(tmp_path, config, message):
    with pytest.raises(ValueError) as refused:
        export.check_vllm(peft_folder(tmp_path / "peft", **config), tiny_base())
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


# -- the engine --------------------------------------------------------------------------------------


def test_engine_exports_current_weights_under_the_data_directory(engine, data_dir, adapter_dirs):
    engine.load_adapter("alpha", adapter_dirs["alpha"])
    result = engine.export_adapter("alpha", "gguf")
    out = engine.home / "exports" / "alpha" / "alpha.gguf"
    assert engine.home.parent == data_dir and engine.home.name.startswith("tiny-")
    assert result == {
        "adapter": "alpha",
        "format": "gguf",
        "path": str(out),
        "files": [str(out)],
        "commands": [f"llama-cli -m BASE.gguf --lora {out}  # BASE.gguf: the base model"],
        "modules": 14,
        "r": 4,
        "alpha": 8.0,
        "arch": "llama",
    }
    _, tensors = read_gguf(out)
    a, _ = peft_pairs(adapter_dirs["alpha"])["1.mlp.up_proj"]
    assert np.array_equal(tensors["blk.1.ffn_up.weight.lora_a"].data, a.numpy())
    assert sorted(p.name for p in (engine.home / "exports").iterdir()) == [
        "alpha"
    ]  # no scratch left

    vllm = engine.export_adapter("alpha", "vllm")
    assert vllm["path"] == str(engine.home / "exports" / "alpha" / "vllm")
    assert load_file(f"{vllm['path']}/adapter_model.safetensors").keys() == peft_pairs_keys(
        adapter_dirs["alpha"]
    )
    mine = engine.export_adapter("alpha", "gguf", data_dir / "elsewhere")
    assert mine["path"] == str(data_dir / "elsewhere" / "alpha.gguf")

    with pytest.raises(UnknownName, match="^adapter: no adapter named 'nope'"):
        engine.export_adapter("nope", "gguf")
    with pytest.raises(ValueError, match="^to: must be one of gguf, vllm$"):
        engine.export_adapter("alpha", "onnx")


def peft_pairs_keys(folder):
    return load_file(str(folder / "adapter_model.safetensors")).keys()


def test_an_adapter_under_training_exports_its_weights_of_now(engine, data_dir):
    records = [{"prompt": "Color of moonveil?", "completion": "Silver blue."}] * 4
    job = engine.tune("herb", records, max_steps=100_000, batch_size=1, r=4, lora_alpha=8)
    try:
        while engine.job(job["id"])["step"] < 1:  # B starts at zero; one step moves it
            time.sleep(0.05)
        result = engine.export_adapter("herb", "gguf")
        fields, tensors = read_gguf(result["path"])
        assert fields["adapter.lora.alpha"] == 8.0 and len(tensors) == 28
        assert np.abs(tensors["blk.0.attn_v.weight.lora_b"].data).max() > 0
        assert engine.job(job["id"])["state"] == "running"
    finally:
        engine.cancel_job(job["id"])


# -- the HTTP route and the magic ------------------------------------------------------------------


async def test_export_route_writes_under_the_root_or_the_data_directory(ready_api, jp_root_dir):
    api = ready_api
    make_adapter(jp_root_dir / "alpha", seed=1)
    assert (await api.post("adapters", {"name": "alpha", "path": "alpha"}))[0] == 201
    code, result = await api.post("adapters/alpha/export", {"to": "gguf", "path": "out/a.gguf"})
    out = jp_root_dir / "out" / "a.gguf"
    assert (code, result["path"], result["files"]) == (200, str(out), [str(out)])
    assert read_gguf(out)[0]["adapter.lora.alpha"] == 8.0
    code, result = await api.post("adapters/alpha/export", {"to": "vllm"})
    home = api.app.host.engine.home
    assert (code, result["path"]) == (200, f"{home}/exports/alpha/vllm")
    assert result["max_lora_rank"] == 16 and result["commands"][0].startswith("vllm serve tiny ")

    def refused(field, message, status=400):
        kind = "not_found" if status == 404 else "invalid_request_error"
        return status, {"error": {"message": f"{field}: {message}", "type": kind, "field": field}}

    (jp_root_dir / "notes.txt").write_text("mine")
    for body, expected in [
        ({"to": "onnx"}, refused("to", "must be 'gguf' (llama.cpp, Ollama, LM Studio) or 'vllm'")),
        ({}, refused("to", "is required")),
        (
            {"to": "gguf", "path": "/etc/x.gguf"},
            refused("path", "'/etc/x.gguf' is outside the server's root directory"),
        ),
        (
            {"to": "gguf", "path": "notes.txt"},
            refused("path", "'notes.txt' exists and is not a .gguf file; it would be replaced"),
        ),
        (
            {"to": "vllm", "path": "."},
            refused("path", "give a folder below the root directory, not the root itself"),
        ),
        ({"to": "gguf", "extra": 1}, refused("extra", "unknown field; known: path, to")),
    ]:
        assert await api.post("adapters/alpha/export", body) == expected, body
    assert await api.post("adapters/beta/export", {"to": "gguf"}) == refused(
        "adapter", "no adapter named 'beta' (known: alpha)", 404
    )
    assert (jp_root_dir / "notes.txt").read_text() == "mine"


def test_export_magic_prints_the_files_and_the_commands(kernel, client, server_root):
    job = client.tune("exp", records=[{"prompt": "a?", "completion": "b."}] * 2, max_steps=1)
    client.wait(job["id"], timeout=60)
    run = kernel.run("%fineinfer export exp out/exp.gguf")
    out = server_root / "out" / "exp.gguf"
    assert run.stdout == (
        "exported 'exp' as a llama.cpp LoRA adapter:\n"
        f"  {out}\n"
        "use it:\n"
        f"  llama-cli -m BASE.gguf --lora {out}  # BASE.gguf: the base model\n"
    ), run.stderr
    assert read_gguf(out)[0]["general.name"] == "exp"
    vllm = kernel.run("%fineinfer export exp --to vllm out/exp-vllm")
    assert vllm.stdout.startswith(
        f"'exp' passes vLLM's LoRA checks; its PEFT folder:\n  {server_root / 'out' / 'exp-vllm'}\nuse it:\n  vllm serve tiny --enable-lora"
    )
    bad = kernel.run("%fineinfer export exp --to onnx")
    assert bad.stderr == (
        "fineinfer: export: argument --to: invalid choice: 'onnx' (choose from 'gguf', 'vllm')\n"
    )
    assert kernel.run("%fineinfer help").stdout.count("%fineinfer export NAME") == 1
