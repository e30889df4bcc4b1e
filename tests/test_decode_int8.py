"""Int8 (int4) weight-only copies for decode passes of a bf16 model on a CPU (int8rows.py): one
row, and a few rows where the load measured them faster."""

import copy

import pytest
import torch
from conftest import PROMPTS, run_until_done
from families import FAMILIES, build, save
from peft import PeftModel
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from fineinfer_jupyter.engine import int8rows, precision
from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.models import load_model

# A product's error against its dequantized reference: the kernel rounds its output to bf16
ROUNDING = 2**-7
# int8 decode logits vs bf16's on the tiny random models, as a share of the largest logit
# (seen: 1.3-4.8% on 32- and 64-wide random weights); an adapter moves them by far more
LOGITS = 0.08

pytestmark = pytest.mark.skipif(not int8rows.kernel(), reason="torch has no int8 kernel")


def int8_calls(monkeypatch) -> list:
    calls, kernel = [], torch._weight_int8pack_mm
    spy = lambda x, w, s: calls.append(w) or kernel(x, w, s)  # noqa: E731
    monkeypatch.setattr(torch, "_weight_int8pack_mm", spy)
    return calls


def test_a_one_row_decode_product_is_the_dequantized_weights_and_nothing_else_uses_it(
    monkeypatch,
):
    loaded = load_model("tiny", dtype="bfloat16", decode_weights="int8")
    assert loaded.decode_reason.startswith("int8: ")
    layer = loaded.model.model.layers[0].mlp.down_proj
    q, scales = layer.int8
    assert (
        q.dtype == torch.int8 and q.shape == layer.weight.shape and scales.dtype == torch.bfloat16
    )
    # symmetric per output row: each row's largest weight maps to +-127
    assert torch.equal(q.abs().amax(1), torch.full((q.shape[0],), 127, dtype=torch.int8))
    err = (int8rows.dequantized(layer.int8) - layer.weight.float()).abs()
    assert (err <= scales.float()[:, None] / 2 * 1.01).all()  # rounded to the nearest step
    calls = int8_calls(monkeypatch)
    x = torch.randn(1, 1, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        bf16 = layer(x)  # outside a decode pass: mv on the bf16 weight
        assert calls == []
        with precision.decoding():
            got = layer(x)
            assert calls == [q] and got.shape == (1, 1, layer.out_features)
            many = layer(x.expand(1, 3, -1).contiguous())  # several rows: bf16 as before
            assert len(calls) == 1
    ref = x.float() @ int8rows.dequantized(layer.int8).T
    torch.testing.assert_close(got.float(), ref, rtol=ROUNDING, atol=ROUNDING * ref.abs().max())
    torch.testing.assert_close(many[:, :1], bf16, rtol=2**-6, atol=2**-6 * bf16.abs().max().item())
    x.requires_grad_()
    with precision.decoding():
        layer(x).sum().backward()  # a forward that records gradients: F.linear, bf16
    assert len(calls) == 1 and x.grad is not None


def test_the_copies_are_not_parameters_a_copy_drops_them_and_a_moved_weight_falls_back(
    monkeypatch,
):
    plain = load_model("tiny", dtype="bfloat16")
    loaded = load_model("tiny", dtype="bfloat16", decode_weights="int8")
    assert plain.decode_reason == "base: set" and int8rows.int8_bytes(plain.model) == 0
    rows = [m for m in loaded.model.modules() if isinstance(m, precision.RowLinear)]
    assert rows and all(m.int8 is not None for m in rows)  # every width of "tiny" is taken
    assert int8rows.int8_bytes(loaded.model) == sum(
        m.weight.numel() + 2 * m.out_features for m in rows
    )
    assert loaded.model.state_dict().keys() == plain.model.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.model.state_dict().values(), plain.model.state_dict().values())
    )
    layer = loaded.model.model.layers[1].self_attn.o_proj
    twin = copy.deepcopy(layer)
    assert twin.int8 is None
    calls = int8_calls(monkeypatch)
    x = torch.randn(1, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad(), precision.decoding():
        assert torch.equal(twin(x), torch.mv(layer.weight, x[0])[None])
        layer.weight = torch.nn.Parameter(layer.weight * 2, requires_grad=False)  # moved
        assert torch.equal(layer(x), torch.mv(layer.weight, x[0])[None]) and calls == []
    # no room: no copies
    assert int8rows.make(plain.model, "int8", available=1).startswith("base: ")
    assert int8rows.int8_bytes(plain.model) == 0


def test_fp32_models_and_settings_other_than_int8_or_auto_are_untouched():
    fp32 = load_model("tiny", dtype="float32", decode_weights="int8")
    assert fp32.decode_reason == "base: int8 copies are for a bf16 model on a CPU"
    assert not any(getattr(m, "int8", None) is not None for m in fp32.model.modules())
    tiny = load_model("tiny", dtype="bfloat16", decode_weights="auto")  # 64 wide
    assert tiny.decode_reason.startswith("base: layers 64 wide < 256")
    assert int8rows.int8_bytes(tiny.model) == 0
    with pytest.raises(ValueError, match="decode_weights: must be one of auto, int8, int4, base"):
        EngineConfig(model="tiny", decode_weights="int2")


def test_auto_makes_copies_only_for_shapes_the_probe_measured_faster(tmp_path):
    config = LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    precision.single_rows_by_mv(model)
    seen = []

    def probe(weight, int8):
        assert torch.equal(
            int8rows.dequantized(int8), int8rows.dequantized(int8rows.quantize(weight))
        )
        seen.append(tuple(weight.shape))
        return (1.0, 0.5, 0.0) if weight.shape[1] == 512 else (1.0, 1.0, 0.0)  # down_proj only

    why = int8rows.make(model, "auto", probe=probe)
    assert why.startswith("int8: 1 of 8 linear layers") and "256x512 2.00x" in why, why
    assert sorted(set(seen)) == sorted(seen)  # each shape measured once
    assert [n for n, m in model.named_modules() if getattr(m, "int8", None) is not None] == [
        "model.layers.0.mlp.down_proj"
    ]
    wrong = int8rows.make(model, "auto", probe=lambda w, q: (1.0, 0.5, 0.5))  # kernel wrong
    assert wrong.startswith("base: int8 not faster") and int8rows.int8_bytes(model) == 0
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    mv, int8, error = int8rows.measure(w, int8rows.quantize(w), repeats=1)  # the real probe
    assert mv > 0 and int8 > 0 and error < int8rows.TOLERANCE


def decode_logits(model, ids, steps=3, *, int8, adapters=None, decoder=None):
    """Logits of `steps` one-row decode passes after a prefill of `ids` (next tokens fed from
    a fixed list, so both settings see the same inputs); `decoder`: another model runs the
    decode passes, on `model`'s prefill."""
    kw = {"adapter_names": adapters} if adapters else {}
    out = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache, use_cache=True, **kw)
        for t in range(steps):
            nxt = torch.full((ids.shape[0], 1), 3 + 7 * t)
            with precision.decoding(int8):
                step = (decoder or model)(input_ids=nxt, cache=cache, use_cache=True, **kw)
                out.append(step.logits)
    return torch.cat(out, 1).float()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("rows", [1, 2])
def test_every_family_decodes_by_int8_copies_with_logits_close_to_bf16s(
    family, rows, tmp_path, monkeypatch
):
    folder = save(family, tmp_path / family)
    loaded = load_model(folder, dtype="bfloat16", decode_weights="int8")
    model = loaded.model
    for m in model.modules():
        if isinstance(m, precision.RowLinear):
            m.copy_rows = rows  # (2: as if the load had measured two rows faster)
    calls = int8_calls(monkeypatch)
    ids = torch.tensor([[5, 9, 11, 40, 7], [2, 4, 6, 8, 10]][:rows])
    bf16 = decode_logits(model, ids, int8=False)
    assert calls == []
    got = decode_logits(model, ids, int8=True)
    taken = sum(getattr(m, "int8", None) is not None for m in model.modules())
    assert taken and len(calls) == 3 * taken  # every layer the kernel takes, at every step
    diff = (got - bf16).abs().max() / bf16.abs().max()
    assert diff < LOGITS, f"{family}: {diff:.3f}"


def test_a_width_the_kernel_does_not_take_keeps_bf16_and_its_neighbours_use_int8(
    tmp_path, monkeypatch
):
    # 24 wide (not a multiple of 16): q/k/v/gate/up and o_proj (4 heads of 6) multiply by mv
    folder = save("llama", tmp_path / "narrow", hidden_size=24, intermediate_size=48)
    model = load_model(folder, dtype="bfloat16", decode_weights="int8").model
    with_int8 = {n for n, m in model.named_modules() if getattr(m, "int8", None) is not None}
    assert with_int8 == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    calls = int8_calls(monkeypatch)
    ids = torch.tensor([[5, 9, 11]])
    bf16, got = decode_logits(model, ids, int8=False), decode_logits(model, ids, int8=True)
    assert len(calls) == 3 * 2
    assert (got - bf16).abs().max() / bf16.abs().max() < LOGITS


def test_lora_adapters_apply_on_top_of_int8_rows_and_are_saved_without_the_copies(
    adapter_dirs, tmp_path
):
    base = load_model("tiny", dtype="bfloat16", decode_weights="int8").model
    model = PeftModel.from_pretrained(base, adapter_dirs["alpha"], adapter_name="alpha")
    model.load_adapter(adapter_dirs["beta"], adapter_name="beta")
    model.eval()
    ids = torch.tensor([[40, 50, 60, 70]])
    for name in ("alpha", "beta", "__base__"):
        bf16 = decode_logits(model, ids, int8=False, adapters=[name])
        got = decode_logits(model, ids, int8=True, adapters=[name])
        assert (got - bf16).abs().max() / bf16.abs().max() < LOGITS, name
        if name != "__base__":  # the adapter is applied: it moves the logits far more
            plain = decode_logits(model, ids, int8=True, adapters=["__base__"])
            assert (got - plain).abs().max() > 5 * (got - bf16).abs().max(), name
    # mixed-adapter rows (several rows: the bf16 weights, as before)
    two = torch.cat([ids, ids])
    mixed = decode_logits(model, two, int8=True, adapters=["alpha", "beta"])
    assert torch.equal(mixed, decode_logits(model, two, int8=False, adapters=["alpha", "beta"]))
    assert not any("int8" in k for k in model.state_dict())
    model.save_pretrained(tmp_path / "saved", selected_adapters=["alpha"])
    from safetensors.torch import load_file

    (file,) = (tmp_path / "saved").rglob("adapter_model.safetensors")
    saved = load_file(file)
    assert saved and all("lora_" in k for k in saved)


def only_one_row_decodes_call(engine, calls: list) -> None:
    """Two answers decoded together (two rows a pass: bf16) leave the kernel's `calls` empty;
    one answer alone (one-row passes) calls it."""
    pair = [engine.generate(p, max_new_tokens=4, ignore_eos=True) for p in PROMPTS[:2]]
    run_until_done(engine, pair)
    assert calls == []
    one = engine.generate(PROMPTS[2], max_new_tokens=4, ignore_eos=True)
    run_until_done(engine, [one])
    assert len(calls) > 0 and len(one.final["token_ids"]) == 4


def test_the_engine_decodes_single_rows_by_int8_and_status_says_so(tmp_path, monkeypatch):
    config = EngineConfig(
        model="tiny", data_dir=tmp_path, policy="immediate", dtype="bfloat16", decode_weights="int8"
    )
    with Engine(config, thread=False) as e:
        info = e.status()["model"]
        assert info["decode_weights"] == "int8" and info["decode_weights_reason"].startswith(
            "int8: "
        )
        assert info["int8_bytes"] == int8rows.int8_bytes(e.core.loaded.model) > 0
        calls = int8_calls(monkeypatch)
        first = e.generate(PROMPTS[0], max_new_tokens=1)  # prefill only
        run_until_done(e, [first])
        assert calls == []
        only_one_row_decodes_call(e, calls)
    base = EngineConfig(
        model="tiny", data_dir=tmp_path / "b", dtype="bfloat16", decode_weights="base"
    )
    with Engine(base, thread=False) as e:
        info = e.status()["model"]
        assert (info["decode_weights"], info["int8_bytes"]) == ("base", 0)


def test_the_server_setting_reaches_the_engine_and_the_status_line_says_int8():
    from fineinfer_jupyter.engine import config
    from fineinfer_jupyter.kernel.render import status_lines
    from fineinfer_jupyter.server import app

    assert app.DECODE_WEIGHTS == config.DECODE_WEIGHTS == int8rows.MODES
    assert app.FineInferApp(decode_weights="base").engine_config()["decode_weights"] == "base"
    assert app.FineInferApp().engine_config()["decode_weights"] == "auto"
    why = "int8: 211 of 211 linear layers' one-row decode products (129 MiB of copies)"
    model = {"name": "m", "decode_weights": "int8", "decode_weights_reason": why}
    assert f"decode weights {why}" in status_lines({"model": model}, "url")
    model = {"name": "m", "decode_weights": "base", "decode_weights_reason": "base: set"}
    assert not any(
        line.startswith("decode weights") for line in status_lines({"model": model}, "u")
    )


def test_a_decode_pass_on_one_thread_leaves_another_threads_forwards_in_bf16(monkeypatch):
    import threading

    loaded = load_model("tiny", dtype="bfloat16", decode_weights="int8")
    layer = loaded.model.model.layers[0].mlp.up_proj
    calls = int8_calls(monkeypatch)
    x = torch.randn(1, layer.in_features, dtype=torch.bfloat16)
    inside, other = threading.Event(), []

    def elsewhere():  # e.g. a training or evaluation thread beside the engine's decode
        inside.wait()
        with torch.no_grad():
            other.append(layer(x))

    t = threading.Thread(target=elsewhere)
    t.start()
    with torch.no_grad(), precision.decoding():
        inside.set()
        t.join()
        mine = layer(x)
    assert len(calls) == 1  # this thread's product only
    assert torch.equal(other[0], torch.mv(layer.weight, x[0])[None])
    assert not torch.equal(mine, other[0])


# -- int4 copies (decode_weights="int4") ---------------------------------------------------


def int4_calls(monkeypatch) -> list:
    calls, kernel = [], torch._weight_int4pack_mm_for_cpu
    spy = lambda x, w, g, s: calls.append(w) or kernel(x, w, g, s)  # noqa: E731
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", spy)
    return calls


def as_dequantized4(model) -> torch.nn.Module:
    """A copy of `model` whose layers with int4 copies hold their dequantized weights (in
    bf16), without the copies: what the int4 kernel multiplies by, through the bf16 path."""
    twin = copy.deepcopy(model)  # (a copy drops the copies)
    for m, t in zip(model.modules(), twin.modules(), strict=True):
        if getattr(m, "int4", None) is not None:
            w = int8rows.dequantized4(int8rows.quantize4(m.weight)).to(torch.bfloat16)
            t.weight = torch.nn.Parameter(w, requires_grad=False)
    return twin


@pytest.mark.skipif(not int8rows.kernel4(), reason="torch has no int4 kernel")
def test_int4_copies_are_groups_of_32_and_only_one_row_decode_products_use_them(monkeypatch):
    loaded = load_model("tiny", dtype="bfloat16", decode_weights="int4")
    assert loaded.decode_reason.startswith("int4: ") and "groups of 32" in loaded.decode_reason
    rows = [m for m in loaded.model.modules() if isinstance(m, precision.RowLinear)]
    assert all(m.int4 is not None and m.int8 is None for m in rows)  # "tiny": every shape fits
    # shapes the kernel refuses (it raises for them): outputs not a multiple of 16, inputs
    # not a multiple of the group
    assert not int8rows.takes4(torch.nn.Linear(64, 300).to(torch.bfloat16))
    assert not int8rows.takes4(torch.nn.Linear(48, 64).to(torch.bfloat16))
    layer = loaded.model.model.layers[0].mlp.down_proj
    q, scales, zeros = int8rows.quantize4(layer.weight)
    groups = layer.in_features // precision.INT4_GROUP
    assert q.min() >= 0 and q.max() <= 15 and scales.shape == (layer.out_features, groups)
    err = (int8rows.dequantized4((q, scales, zeros)) - layer.weight.float()).abs()
    step = scales.float().repeat_interleave(precision.INT4_GROUP, 1)
    assert (err <= step / 2 * 1.01 + 1e-6).all()  # each weight rounded to its group's step
    assert (
        int8rows.int4_bytes(loaded.model)
        == sum(
            sum(t.numel() * t.element_size() for t in m.int4)
            for m in loaded.model.modules()
            if getattr(m, "int4", None) is not None
        )
        > 0
    )
    calls = int4_calls(monkeypatch)
    x = torch.randn(1, 1, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = layer(x)  # outside a decode pass: mv
        assert calls == []
        with precision.decoding():
            got = layer(x)
            assert len(calls) == 1
            layer(x.expand(1, 3, -1).contiguous())  # several rows: bf16
            assert len(calls) == 1
    ref = x.float() @ int8rows.dequantized4((q, scales, zeros)).T
    torch.testing.assert_close(got.float(), ref, rtol=ROUNDING, atol=ROUNDING * ref.abs().max())
    assert not torch.equal(got, plain)  # (4 bits: not the bf16 product)
    x.requires_grad_()
    with precision.decoding():
        layer(x).sum().backward()  # records gradients: F.linear on the bf16 weight
    assert len(calls) == 1 and x.grad is not None
    twin = copy.deepcopy(layer)
    assert twin.int4 is None
    plain_model = load_model("tiny", dtype="bfloat16")
    assert int8rows.make(plain_model.model, "int4", available=1).startswith("base: ")
    assert int8rows.int4_bytes(plain_model.model) == 0


@pytest.mark.skipif(not int8rows.kernel4(), reason="torch has no int4 kernel")
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_decodes_by_int4_copies_as_its_dequantized_weights_would(
    family, rows, tmp_path, monkeypatch
):
    folder = save(family, tmp_path / family)
    model = load_model(folder, dtype="bfloat16", decode_weights="int4").model
    taken = sum(getattr(m, "int4", None) is not None for m in model.modules())
    assert taken
    for m in model.modules():
        if isinstance(m, precision.RowLinear):
            m.copy_rows = rows  # (3: as if the load had measured three rows faster)
    ids = torch.tensor([[5, 9, 11, 40, 7], [1, 2, 3, 4, 5], [8, 8, 8, 8, 8]][:rows])
    # (the prefill by the bf16 weights, both ways)
    reference = decode_logits(model, ids, int8=False, decoder=as_dequantized4(model))
    calls = int4_calls(monkeypatch)
    got = decode_logits(model, ids, int8=True)
    assert len(calls) == 3 * taken  # every layer the kernel takes, at every step
    diff = (got - reference).abs().max() / reference.abs().max()
    assert diff < 0.03, f"{family}: {diff:.3f}"  # bf16 roundings of the same weights
    bf16 = decode_logits(model, ids, int8=False)
    assert (got - bf16).abs().max() > 0  # (the copies were used: not the bf16 weights)


@pytest.mark.skipif(not int8rows.kernel4(), reason="torch has no int4 kernel")
def test_the_engine_decodes_single_rows_by_int4_and_status_says_so(tmp_path, monkeypatch):
    from fineinfer_jupyter.kernel.render import status_lines

    config = EngineConfig(
        model="tiny", data_dir=tmp_path, policy="immediate", dtype="bfloat16", decode_weights="int4"
    )
    with Engine(config, thread=False) as e:
        info = e.status()["model"]
        assert info["decode_weights"] == "int4" and info["int8_bytes"] == 0
        assert info["int4_bytes"] == int8rows.int4_bytes(e.core.loaded.model) > 0
        assert f"decode weights {info['decode_weights_reason']}" in status_lines(e.status(), "u")
        only_one_row_decodes_call(e, int4_calls(monkeypatch))
    fp32 = EngineConfig(model="tiny", data_dir=tmp_path / "f", decode_weights="int4")
    with Engine(fp32, thread=False) as e:
        info = e.status()["model"]
        assert info["decode_weights"] == "base" and info["int4_bytes"] == 0
        assert info["decode_weights_reason"] == "base: int4 copies are for a bf16 model on a CPU"


# -- decode passes of a few rows by the copies (RowLinear.copy_rows) ----------------------


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_decode_of_up_to_copy_rows_rows_multiplies_by_the_copies_and_more_rows_by_bf16(
    kind, monkeypatch
):
    if kind == "int4" and not int8rows.kernel4():
        pytest.skip("torch has no int4 kernel")
    loaded = load_model("tiny", dtype="bfloat16", decode_weights=kind)
    layer = loaded.model.model.layers[0].mlp.up_proj
    assert layer.copy_rows == 1  # (64 wide: not measured, one row only)
    if kind == "int4":
        calls, weight = (
            int4_calls(monkeypatch),
            int8rows.dequantized4(int8rows.quantize4(layer.weight)),
        )
    else:
        calls, weight = int8_calls(monkeypatch), int8rows.dequantized(layer.int8)
    layer.copy_rows = 4
    x = torch.randn(2, 2, layer.in_features, dtype=torch.bfloat16)  # a batch of 2 x 2 rows
    with torch.no_grad():
        plain = layer(x)  # outside a decode pass: the blocked bf16 copy
        assert calls == []
        with precision.decoding():
            got = layer(x)
            assert len(calls) == 1 and got.shape == (2, 2, layer.out_features)
            five = torch.randn(5, 1, layer.in_features, dtype=torch.bfloat16)
            layer(five)  # more than copy_rows rows: bf16
            assert len(calls) == 1
        layer.copy_rows = 1
        with precision.decoding():
            layer(x)  # one row only: bf16 for four
            assert len(calls) == 1
    ref = x.float() @ weight.T
    torch.testing.assert_close(got.float(), ref, rtol=ROUNDING, atol=ROUNDING * ref.abs().max())
    assert not torch.equal(got, plain)


def wide_bf16_model() -> torch.nn.Module:
    """The tiny Llama widened to 256 (families.py), in bf16 with RowLinear layers, prepacked
    (as a load makes it): wide enough for copy_rows to measure."""
    model = build("llama", hidden_size=256, intermediate_size=512)[0].to(torch.bfloat16)
    precision.single_rows_by_mv(model)
    precision.prepack(model)
    return model


def test_copy_rows_keeps_each_count_measured_faster_and_every_smaller_one():
    model = wide_bf16_model()
    reason = int8rows.make(model, "int8")
    layers = [m for m in model.modules() if isinstance(m, precision.RowLinear)]
    rows = {m.copy_rows for m in layers}
    assert len(rows) == 1 and reason.startswith("int8: ")
    (chosen,) = rows
    # "... (the copies' speed over bf16's at load: 2 rows 1.13x, 4 rows 0.78x)": the counts
    # tried in order, each kept one MIN_GAIN faster, the first that was not ends the trials
    shown = reason.split("at load: ")[-1].rstrip(")").split(", ")
    gains = {int(s.split(" rows ")[0]): float(s.split(" rows ")[1][:-1]) for s in shown}
    assert list(gains) == list(int8rows.ROWS_TRIED[: len(gains)])
    kept = [n for n, g in gains.items() if g >= int8rows.MIN_GAIN]
    assert kept == list(gains)[: len(kept)]  # (the first miss stops)
    assert chosen == max(kept, default=1)
    assert len(kept) == len(gains) or len(gains) == len(kept) + 1
    assert f"passes of up to {chosen} rows" in reason or (
        chosen == 1 and "one-row passes only" in reason
    )


def test_a_kernel_that_refuses_several_rows_leaves_one_row_passes_and_the_load_goes_on(
    monkeypatch,
):
    kernel = torch._weight_int8pack_mm

    def one_row_only(x, w, s):
        if x.shape[0] > 1:
            raise RuntimeError("only one row here")
        return kernel(x, w, s)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", one_row_only)
    model = wide_bf16_model()
    reason = int8rows.make(model, "int8")
    assert reason.startswith("int8: ")
    assert "one-row passes only (the kernel refused several rows at load: only one row" in reason
    layers = [m for m in model.modules() if isinstance(m, precision.RowLinear)]
    assert {m.copy_rows for m in layers} == {1} and all(m.int8 is not None for m in layers)


@pytest.mark.skipif(not int8rows.kernel4(), reason="torch has no int4 kernel")
def test_the_engine_decodes_a_few_rows_together_by_the_copies_as_it_decodes_each_alone(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(int8rows, "copy_rows", lambda layers: (4, "as the test says"))
    config = EngineConfig(
        model="tiny", data_dir=tmp_path, policy="immediate", dtype="bfloat16", decode_weights="int4"
    )
    with Engine(config, thread=False) as e:
        reason = e.status()["model"]["decode_weights_reason"]
        assert "passes of up to 4 rows (as the test says)" in reason
        alone = []
        for p in PROMPTS[:3]:
            one = e.generate(p, max_new_tokens=5, ignore_eos=True)
            run_until_done(e, [one])
            alone.append(one.final["token_ids"])
            rows, kernel = [], torch._weight_int4pack_mm_for_cpu
        spy = lambda x, w, g, s: rows.append(x.shape[0]) or kernel(x, w, g, s)  # noqa: E731
        monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", spy)
        three = [e.generate(p, max_new_tokens=5, ignore_eos=True) for p in PROMPTS[:3]]
        run_until_done(e, three)
        assert [s.final["token_ids"] for s in three] == alone
        assert rows and set(rows) == {3}  # every decode pass: three rows, by the copies
        rows.clear()
        five = [e.generate(p, max_new_tokens=3, ignore_eos=True) for p in PROMPTS + ["x y"]]
        run_until_done(e, five)
        # five rows a pass, more than copy_rows: by the bf16 weights
        assert rows == [] and all(len(s.final["token_ids"]) == 3 for s in five)
