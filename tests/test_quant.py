"""A frozen base in 4-bit NF4 or int8 (bitsandbytes, on the CPU): QLoRA in the engine (quant.py)."""

import pytest
import torch
from conftest import PROMPTS, run_until_done
from peft import PeftModel
from test_training import FAST, RECORDS, chat, train_to_end

from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.models import load_model
from fineinfer_jupyter.engine.quant import weight_bytes

bnb = pytest.importorskip("bitsandbytes")

FIRST_STEPS_REL = 0.10  # NF4's first losses within 10% of fp32's on the tiny model


def engine(tmp_path, quantize, **kw):
    config = EngineConfig(
        model="tiny", data_dir=tmp_path / quantize, policy="immediate", quantize=quantize, **kw
    )
    return Engine(config, thread=False)


def test_nf4_cuts_the_linear_weights_to_under_a_quarter_and_keeps_the_head_in_the_dtype():
    full, nf4 = load_model("tiny"), load_model("tiny", quantize="nf4")
    a, b = weight_bytes(full.model), weight_bytes(nf4.model)
    assert b["linear"] <= a["linear"] / 4
    assert a["total"] - a["linear"] == b["total"] - b["linear"]  # embeddings, norms, head
    assert nf4.model.lm_head.weight.dtype == torch.float32
    assert nf4.parameters == full.parameters  # counted unpacked
    assert isinstance(nf4.model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)


def test_a_job_on_an_nf4_base_follows_fp32_then_serves_while_training_and_loads_with_peft(
    tmp_path,
):
    params = dict(FAST, max_steps=12)
    with engine(tmp_path, "none") as e:
        fp32 = [
            loss
            for _, loss in train_to_end(e, e.tune("herb", RECORDS, **params)["id"])["loss_history"]
        ]
    with engine(tmp_path, "nf4") as e:
        assert e.status()["model"]["quantize"] == "nf4"
        job = e.tune("herb", RECORDS, **params)
        while e.job(job["id"])["step"] < 2:
            e.iterate()
        at_two = e.save_adapter("herb", tmp_path / "herb-at-2")["saved_to"]
        stream = e.generate(
            chat(RECORDS[0]["prompt"]), adapter="herb", max_new_tokens=10, ignore_eos=True
        )
        e.iterate()  # prefill: pinned to the snapshot herb@2
        assert e.core.adapters.snapshots == ["herb@2"]
        while stream.final is None:
            e.core.trainer.micro_step()  # training goes on while the request decodes
            e.iterate()
        assert e.job(job["id"])["step"] > 2
        nf4 = [loss for _, loss in train_to_end(e, job["id"])["loss_history"]]
        ids = torch.tensor([e.core.loaded.tokenizer("Color of moonveil?")["input_ids"]])
        with torch.no_grad():
            mine = e.core.runner.forward(
                ids, mask=torch.ones_like(ids), position_ids=None, adapters=["herb"]
            )
        out = e.export_adapter("herb", "gguf", tmp_path / "herb.gguf")
        assert (tmp_path / "herb.gguf").stat().st_size > 0 and out["format"] == "gguf"
    assert nf4[:3] == pytest.approx(fp32[:3], rel=FIRST_STEPS_REL)
    assert nf4[-1] < 0.3 * nf4[0]
    # the saved folders are plain PEFT folders: onto an NF4 base they give the engine's outputs
    base = load_model("tiny", quantize="nf4")
    model = PeftModel.from_pretrained(base.model, at_two).eval()
    prompt = base.tokenizer.apply_chat_template(
        chat(RECORDS[0]["prompt"]), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    prompt = torch.tensor([list(prompt)])
    ref = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
        eos_token_id=None, min_new_tokens=10,
    )  # fmt: skip
    assert stream.final["token_ids"] == ref[0, prompt.shape[1] :].tolist()
    final = next((tmp_path / "nf4").glob("*/adapters/herb"))
    model = PeftModel.from_pretrained(load_model("tiny", quantize="nf4").model, final).eval()
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantize,dtype", [("nf4", "float32"), ("int8", "float32")])
def test_mixed_adapter_batch_on_a_quantized_base_matches_each_request_alone(
    tmp_path, adapter_dirs, quantize, dtype
):
    plan = [
        ("base", PROMPTS[0]),
        ("alpha", PROMPTS[0]),
        ("beta", PROMPTS[2]),
        ("alpha", PROMPTS[2]),
    ]
    with engine(tmp_path, quantize, dtype=dtype) as e:
        for name, path in adapter_dirs.items():
            e.load_adapter(name, path)
        slo = {"ttft": 60.0, "tpot": 60.0}  # room to prefill all in one iteration
        streams = [e.generate(p, adapter=a, max_new_tokens=12, slo=slo) for a, p in plan]
        e.iterate()
        assert len(e.core.scheduler.running) == len(plan)
        run_until_done(e, streams)
        mixed = [s.final["token_ids"] for s in streams]
        alone = []
        for adapter, prompt in plan:
            s = e.generate(prompt, adapter=adapter, max_new_tokens=12)
            run_until_done(e, [s])
            alone.append(s.final["token_ids"])
    assert mixed == alone
    assert mixed[0] != mixed[1]  # the adapters really change the answer


def test_int8_and_bf16_nf4_bases_train(tmp_path):
    for quantize, dtype in (("int8", "float32"), ("nf4", "bfloat16")):
        with engine(tmp_path / dtype, quantize, dtype=dtype) as e:
            job = train_to_end(e, e.tune("herb", RECORDS, **dict(FAST, max_steps=8))["id"])
            losses = [loss for _, loss in job["loss_history"]]
            assert job["state"] == "done" and losses[-1] < 0.6 * losses[0], quantize
            lora = e.core.runner.model.base_model.model.model.layers[0].self_attn.q_proj
            assert lora.lora_A["herb"].weight.dtype == torch.float32  # full-precision adapter


def test_the_server_setting_reaches_the_engine():
    from fineinfer_jupyter.engine import config
    from fineinfer_jupyter.server import app

    assert app.QUANTIZE == config.QUANTIZE
    assert app.FineInferApp(quantize="nf4").engine_config()["quantize"] == "nf4"
    assert app.FineInferApp.class_traits(config=True)["quantize"].help


def test_bad_quantize_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^quantize: must be one of none, nf4, int8$"):
        EngineConfig(quantize="fp4")
    with pytest.raises(ValueError, match=r"^offload: cannot move nf4 layers yet"):
        EngineConfig(quantize="nf4", offload="cpu", memory_budget=0)


# -- NF4's packed copy (quant.pack_for_cpu) across families and dtypes --------------------------

# shapes the packed kernel takes: every linear layer 32k rows by 64k columns (head_dim 16)
PACKABLE = dict(hidden_size=64, intermediate_size=128, head_dim=16)
FAST_VS_PLAIN = 0.05  # the packed kernel rounds each layer's input to bf16: logits within 5%
PACKED_CASES = [(f, d) for f in ("llama", "qwen3") for d in ("float32", "bfloat16")]


@pytest.fixture(scope="module")
def packed_folders(tmp_path_factory):
    from families import save

    root = tmp_path_factory.mktemp("packable")
    return {f: save(f, root / f, **PACKABLE) for f in ("llama", "qwen3")}


def lora_pair(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(model, config, adapter_name="one")
    peft.add_adapter("two", config)
    return peft.eval()


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes packs NF4 only on AVX512-BF16 CPUs"
)
@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_packed_nf4_serves_fast_trains_plain_saves_without_drift_and_mixes_adapters(
    case, packed_folders
):
    from test_families import assert_close

    from fineinfer_jupyter.engine.quant import dequantize_packed

    family, dtype = case
    loaded = load_model(packed_folders[family], quantize="nf4", dtype=dtype, device="cpu")
    linears = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(type(m).__name__ == "PackedLinear4bit" for m in linears)
    model = lora_pair(loaded.model)
    ids = torch.tensor([list(b"Color of moonveil?"), list(b"How tall is a ford")])
    ids = ids + 3  # byte tokens sit after <pad>, </s>, <unk>
    with torch.no_grad():
        served = model(input_ids=ids).logits  # the packed kernel
    plain = model(input_ids=ids).logits  # grad enabled: dequantized from the same packed copy
    scale = plain.abs().max().item()
    assert (served - plain.detach()).abs().max().item() <= FAST_VS_PLAIN * scale
    # gradients reach every LoRA weight of the active adapter, the first layer's included
    plain.float().logsumexp(-1).mean().backward()
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n and ".one." in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)
    # a save (PEFT reads the whole state_dict) leaves the base bit for bit as it served
    from peft.utils import get_peft_model_state_dict

    state = model.state_dict()
    get_peft_model_state_dict(model, adapter_name="one")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, served)
    # and what it wrote is bitsandbytes' plain layout of the same weights, losslessly
    layer = linears[0]
    packed_key = ".weight.quant_state.bitsandbytes__nf4"
    prefix = next(k for k in state if k.endswith(packed_key)).removesuffix(packed_key) + ".weight."
    saved = bnb.functional.QuantState.from_dict(
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)},
        device=torch.device("cpu"),
    )
    assert torch.equal(
        bnb.functional.dequantize_4bit(state[prefix.removesuffix(".")], saved),
        dequantize_packed(layer.weight.data, layer.weight.quant_state, saved.dtype),
    )
    # a mixed-adapter batch gives each row what it gets alone
    names = ["one", "two"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            model.set_adapter(name)
            alone = model(input_ids=ids[row : row + 1]).logits[0]
            assert_close(mixed[row], alone, "bf16" if dtype == "bfloat16" else "fp32", name)
    assert not torch.allclose(mixed[0], mixed[1])
