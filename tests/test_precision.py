"""dtype "auto" on a CPU (precision.py) and bf16 mixed precision through the engine."""

import copy

import pytest
import torch
from conftest import PROMPTS, run_until_done
from families import WALKED, save
from peft import LoraConfig, get_peft_model
from test_training import FAST, RECORDS, train_to_end
from transformers import LlamaConfig, LlamaForCausalLM

from fineinfer_jupyter.engine import precision
from fineinfer_jupyter.engine.attention import NAME as CHUNK_SDPA
from fineinfer_jupyter.engine.config import EngineConfig
from fineinfer_jupyter.engine.data import Example, collate
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.models import load_model
from fineinfer_jupyter.engine.walk import LayerWalk, TrainingPass

AGREE = 0.5  # the tiny random model's greedy tokens, bf16 vs fp32, that must agree (seen: below)
LOSS_REL = 0.15  # bf16 mixed-precision losses within 15% of fp32's at every step


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """A 256-wide one-layer Llama saved as a Hugging Face folder (wide enough for the probe)."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    """Each walked family's tiny random model, saved as a Hugging Face folder (families.py)."""
    root = tmp_path_factory.mktemp("families")
    return {f: save(f, root / f) for f in WALKED}


def test_auto_falls_back_to_fp32_without_bf16_units_or_when_the_probe_is_not_faster(
    wide_folder, monkeypatch
):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: [])
    loaded = load_model(str(wide_folder), device="cpu", dtype="auto")
    assert loaded.dtype == torch.float32
    assert "no bf16 matrix units" in loaded.dtype_reason
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["avx512_bf16"])
    monkeypatch.setattr(precision, "measure", lambda out, inp: (1.0, 0.95))  # barely faster
    loaded = load_model(str(wide_folder), device="cpu", dtype="auto")
    assert loaded.dtype == torch.float32 and "1.05x" in loaded.dtype_reason
    monkeypatch.setattr(precision, "measure", lambda out, inp: (1.0, 0.25))
    loaded = load_model(str(wide_folder), device="cpu", dtype="auto")
    assert loaded.dtype == torch.bfloat16 and "4.0x faster" in loaded.dtype_reason
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    forced = load_model(str(wide_folder), device="cpu", dtype="float32")  # dtype still forces
    assert forced.dtype == torch.float32 and forced.dtype_reason == "set"


def test_auto_keeps_a_narrow_model_in_fp32_and_the_probe_measures_both_dtypes(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["amx_bf16"])
    tiny = load_model("tiny")
    assert tiny.dtype == torch.float32 and "hidden size 64 < 256" in tiny.dtype_reason
    fp32, bf16 = precision.measure(128, 64, rows=8, repeats=1)
    assert fp32 > 0 and bf16 > 0


def greedy(dtype, tmp_path, prompts, n):
    config = EngineConfig(model="tiny", data_dir=tmp_path / dtype, policy="immediate", dtype=dtype)
    with Engine(config, thread=False) as e:
        streams = [e.generate(p, max_new_tokens=n, ignore_eos=True) for p in prompts]
        run_until_done(e, streams)
        return [s.final["token_ids"] for s in streams]


def test_bf16_engine_tokens_agree_with_fp32_on_a_fixed_prompt_set(tmp_path):
    prompts = PROMPTS + ["Once upon a time", "def main():", "Colorless green ideas", "Q: 2+2?"]
    fp32, bf16 = greedy("float32", tmp_path, prompts, 16), greedy("bfloat16", tmp_path, prompts, 16)
    same = sum(a == b for x, y in zip(fp32, bf16) for a, b in zip(x, y)) / sum(map(len, fp32))
    first = sum(x[0] == y[0] for x, y in zip(fp32, bf16)) / len(prompts)
    print(f"bf16 vs fp32 greedy agreement: {same:.0%} of tokens, {first:.0%} of first tokens")
    assert same >= AGREE and first >= 0.75


def test_bf16_lora_training_is_mixed_precision_and_follows_the_fp32_losses(tmp_path):
    params = dict(FAST, max_steps=10)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = EngineConfig(
            model="tiny", data_dir=tmp_path / dtype, policy="immediate", dtype=dtype
        )
        with Engine(config, thread=False) as e:
            job = e.tune("herb", RECORDS, **params)
            while e.job(job["id"])["step"] < 1:
                e.iterate()
            model, opt = e.core.runner.model, e.core.trainer.current.optimizer
            lora = [p for n, p in model.named_parameters() if ".herb." in n]
            assert lora and {p.dtype for p in lora} == {torch.float32}  # fp32 master weights
            states = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
            assert states and {t.dtype for t in states} == {torch.float32}
            base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
            assert base == {getattr(torch, dtype)}
            # a bf16 base's training forwards compute in bf16 (autocast); PEFT's input casting
            # is back on after each of them (inference with an fp32 adapter casts as before)
            seen = []
            lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.herb"))
            hook = lora_a.register_forward_hook(
                lambda m, i, o, seen=seen: seen.append((i[0].dtype, o.dtype))
            )
            while e.job(job["id"])["step"] < 2:
                e.iterate()
            hook.remove()
            want = getattr(torch, dtype)
            assert seen and set(seen) == {(want, want)}
            assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "lora_A"))
            losses[dtype] = [loss for _, loss in train_to_end(e, job["id"])["loss_history"]]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=LOSS_REL)
    assert losses["bfloat16"][-1] < 0.5 * losses["bfloat16"][0]


def test_a_bf16_cpu_model_decodes_one_row_by_mv_with_linears_results_and_gradients():
    loaded = load_model("tiny", dtype="bfloat16")
    layer = loaded.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, precision.RowLinear) and isinstance(layer, torch.nn.Linear)
    x = torch.randn(1, 1, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        row = layer(x)
        assert row.shape == (1, 1, layer.out_features)
        ref = torch.nn.functional.linear(x, layer.weight)
    assert torch.allclose(row.float(), ref.float(), atol=2e-2, rtol=2e-2)
    x.requires_grad_()
    layer(x).sum().backward()  # a training forward takes F.linear: the gradient reaches x
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert type(load_model("tiny").model.model.layers[0].mlp.up_proj) is torch.nn.Linear


def _spy_attention(monkeypatch) -> list:
    """(query dtype, grad enabled) of every torch sdpa call from here on."""
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append((query.dtype, torch.is_grad_enabled()))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def _lora(model):
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), config).eval()


def _mixed_step(model, batch, autocast):
    run = TrainingPass(LayerWalk(model), model, batch, scale=0.1, autocast=autocast)
    run.run(run.units)
    return run.loss_sum, {
        n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("family", WALKED)
def test_bf16_training_attention_computes_in_fp32_and_follows_the_fp32_step_in_every_family(
    family, family_folders, monkeypatch
):
    """A bf16 base's training forward (autocast) runs transformers' sdpa attention on float32
    queries, keys and values (torch's bf16 CPU attention backward is 5-7x slower); inference
    keeps bf16 but for a decode pass's one query position (float32: faster); the
    mixed-precision micro-step's loss and LoRA gradients follow fp32's."""
    from transformers import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = _spy_attention(monkeypatch)
    fp32 = _lora(load_model(family_folders[family], dtype="float32", device="cpu").model)
    bf16 = _lora(load_model(family_folders[family], dtype="bfloat16", device="cpu").model)
    own = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert getattr(own, "upcasts", False)  # (a bf16 CPU model's load put it in)
    examples = [
        Example(list(range(3, 23)), [-100] * 5 + list(range(8, 23))),
        Example(list(range(30, 42)), [-100] * 3 + list(range(33, 42))),
    ]  # padded: the mask is given to the attention
    batch = collate(examples, 0)
    loss32, grads32 = _mixed_step(fp32, batch, None)
    seen.clear()
    loss16, grads16 = _mixed_step(bf16, batch, precision.autocast_dtype(bf16))
    sdpa = bf16.config._attn_implementation in ("sdpa", CHUNK_SDPA)  # (chunk_sdpa: its fallback)
    assert set(seen) == ({(torch.float32, True)} if sdpa else set())  # (gemma2: eager)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is own  # put back after each unit
    seen.clear()
    with torch.no_grad():  # an inference forward of the same model: bf16 attention
        cache = DynamicCache(config=bf16.config)
        mask = batch["attention_mask"]
        bf16(input_ids=batch["input_ids"], attention_mask=mask, cache=cache)
        assert set(seen) == ({(torch.bfloat16, False)} if sdpa else set())
        seen.clear()  # a decode pass after it (one query position): float32
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        bf16(input_ids=batch["input_ids"][:, -1:], attention_mask=mask, cache=cache)
    assert set(seen) == ({(torch.float32, False)} if sdpa else set())
    assert loss16 == pytest.approx(loss32, rel=0.02)
    assert grads16.keys() == grads32.keys() and grads16
    for name, g in grads32.items():  # bf16 activations: a few percent of the largest
        scale = g.abs().max().item()
        torch.testing.assert_close(grads16[name], g, rtol=0.1, atol=0.1 * scale, msg=name)


def test_a_small_one_row_product_runs_on_one_thread_and_a_large_one_on_all(monkeypatch):
    # torch's bf16 matrix-vector kernel opens a parallel region for any size: a layer's weight
    # under ROW_PARALLEL_MIN multiplies on the calling thread, the count is restored after
    layer = load_model("tiny", dtype="bfloat16").model.model.layers[0].self_attn.k_proj
    x = torch.randn(1, 1, layer.in_features, dtype=torch.bfloat16)
    seen, mv = [], torch.mv
    monkeypatch.setattr(torch, "mv", lambda w, v: seen.append(torch.get_num_threads()) or mv(w, v))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            small = layer(x)
            monkeypatch.setattr(precision, "ROW_PARALLEL_MIN", layer.weight.numel())
            large = layer(x)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(small, large)
    assert torch.equal(small, mv(layer.weight, x.reshape(-1)).view(1, 1, -1))


def test_a_bf16_decode_at_batch_1_runs_on_one_thread_but_its_head_and_larger_batches_on_all(
    monkeypatch,
):
    from fineinfer_jupyter.engine.batch import Batch
    from fineinfer_jupyter.engine.config import SamplingParams, Slo
    from fineinfer_jupyter.engine.runner import Runner
    from fineinfer_jupyter.engine.sequence import Sequence

    loaded = load_model("tiny", dtype="bfloat16")
    runner = Runner(loaded.model, device=loaded.device)
    head = loaded.model.lm_head
    monkeypatch.setattr(precision, "ROW_PARALLEL_MIN", head.weight.numel())  # the head is large
    seen = {"layer": [], "head": []}  # the thread count in layer 0 and in the head's product
    layer = loaded.model.model.layers[0]
    layer.register_forward_pre_hook(lambda *_: seen["layer"].append(torch.get_num_threads()))
    mv = torch.mv

    def spy(w, v):
        if w is head.weight:
            seen["head"].append(torch.get_num_threads())
        return mv(w, v)

    monkeypatch.setattr(torch, "mv", spy)

    def decode(rows: int) -> torch.Tensor:
        seqs = [
            Sequence([5, 6, 7], sampling=SamplingParams(max_new_tokens=4), slo=Slo())
            for _ in range(rows)
        ]
        batch = Batch()
        for s in seqs:
            cache, mask, _ = runner.prefill([s])
            s.output_ids.append(8)
            batch.join([s], cache, mask)
        seen["layer"].clear(), seen["head"].clear()
        return runner.decode(batch)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one = decode(1)
        assert seen["layer"] == [1] and seen["head"] == [2]  # one thread, the head all
        assert torch.get_num_threads() == 2
        two = decode(2)
        assert seen["layer"] == [2] and seen["head"] == []  # (two rows: F.linear)
        torch.set_num_threads(1)
        assert torch.equal(decode(1), one)  # the same tokens' logits on any thread count
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(two[0], one[0], atol=2e-2 * one.abs().max(), rtol=0)  # bf16 tolerance


@pytest.mark.parametrize("faster", [1, 2])
def test_a_bf16_prefill_takes_one_thread_only_up_to_the_size_calibration_measured_it_faster(
    monkeypatch, faster
):
    from types import SimpleNamespace

    from fineinfer_jupyter.engine import runner as runner_module
    from fineinfer_jupyter.engine.config import SamplingParams, Slo
    from fineinfer_jupyter.engine.runner import Runner
    from fineinfer_jupyter.engine.sequence import Sequence

    loaded = load_model("tiny", dtype="bfloat16")
    runner = Runner(loaded.model, device=loaded.device)
    now, seen, forward = [0.0], [], runner.forward

    def timed(ids, **kwargs):  # up to 8 tokens a pass takes 1 s on `faster` threads, 2 s on
        # the other count; longer passes are faster on two threads (their products scale)
        seen.append((ids.shape[1], torch.get_num_threads()))
        wins = faster if ids.shape[1] <= 8 else 2
        now[0] += 1.0 if seen[-1][1] == wins else 2.0
        return forward(ids, **kwargs)

    monkeypatch.setattr(runner, "forward", timed)
    monkeypatch.setattr(runner_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner.choose_prefill_threads(sizes=(8, 32))
        probes = [(8, 1), (8, 1), (8, 2), (8, 2)]
        if faster == 1:  # 8 tokens won on one thread: 32 measured too, and lost
            probes += [(32, 1), (32, 1), (32, 2), (32, 2)]
            assert sorted(seen[1:5]) == probes[:4] and sorted(seen[6:]) == probes[4:]
        else:  # one thread lost at the smallest size: no larger size measured
            assert sorted(seen[1:]) == probes
        assert runner.one_thread_upto == (8 if faster == 1 else 0)
        assert set(runner.prefill_seconds) == ({8, 32} if faster == 1 else {8})
        for n in (3, 8, 9, 40):
            seen.clear()
            seq = Sequence(
                list(range(5, 5 + n)), sampling=SamplingParams(max_new_tokens=2), slo=Slo()
            )
            runner.prefill([seq])
            want = 1 if faster == 1 and n <= 8 else 2
            assert seen == [(n, want)] and torch.get_num_threads() == 2, (n, seen)
        # a chunk after earlier tokens attends to them: every thread, however short
        seen.clear()
        seq = Sequence(list(range(5, 13)), sampling=SamplingParams(max_new_tokens=2), slo=Slo())
        cache, _, _ = runner.prefill([seq], end=4)
        seq.prefilled = 4
        runner.prefill([seq], cache=cache)
        assert seen == [(4, 1 if faster == 1 else 2), (4, 2)], seen
    finally:
        torch.set_num_threads(threads)
    fp32 = Runner(load_model("tiny", dtype="float32").model, device=loaded.device)
    fp32.choose_prefill_threads(sizes=(8,))  # float32: nothing measured, every thread kept
    assert fp32.one_thread_upto == 0 and fp32.prefill_seconds == {}


@pytest.mark.parametrize("faster", [1, 2])
def test_one_row_products_take_every_thread_only_where_calibration_measured_it_faster(
    monkeypatch, faster
):
    from types import SimpleNamespace

    from fineinfer_jupyter.engine import runner as runner_module
    from fineinfer_jupyter.engine.batch import Batch
    from fineinfer_jupyter.engine.config import SamplingParams, Slo
    from fineinfer_jupyter.engine.runner import Runner
    from fineinfer_jupyter.engine.sequence import Sequence

    loaded = load_model("tiny", dtype="bfloat16")
    runner = Runner(loaded.model, device=loaded.device)
    layers = [m for m in loaded.model.modules() if isinstance(m, precision.RowLinear)]
    small = loaded.model.model.layers[0].mlp.down_proj
    assert layers and small.weight.numel() < precision.ROW_PARALLEL_MIN
    now, passes, forward = [0.0], [], runner.forward

    def timed(ids, **kwargs):  # a pass takes 1 s with its products spread the `faster` way
        spread = {m.spread for m in layers}
        assert len(spread) == 1  # every layer the same way within a pass
        passes.append(spread.pop())
        now[0] += 1.0 if passes[-1] == (faster == 2) else 1.5
        return forward(ids, **kwargs)

    seen, mv = [], torch.mv  # the thread count in a small layer's one-row product

    def spy(w, v):
        if w is small.weight:
            seen.append(torch.get_num_threads())
        return mv(w, v)

    def batch_of_one() -> Batch:
        seq = Sequence([5, 6, 7], sampling=SamplingParams(max_new_tokens=4), slo=Slo())
        cache, mask, _ = runner.prefill([seq])
        seq.output_ids.append(8)
        batch = Batch()
        batch.join([seq], cache, mask)
        return batch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reference = runner.decode(batch_of_one())  # (as loaded: products on one thread)
        probe = batch_of_one()
        monkeypatch.setattr(runner, "forward", timed)
        monkeypatch.setattr(runner_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
        timed_passes = runner.choose_row_threads(probe, repeats=2)
        monkeypatch.setattr(runner, "forward", forward)
        assert timed_passes == [1.0, 1.0]  # the chosen way's, after its warm-up: calibration's
        assert passes == [False, True] * 3  # interleaved, a warm-up of each first
        assert {m.spread for m in layers} == {faster == 2}
        assert runner.row_threads["threads"] == faster
        assert runner.row_threads["seconds"] == (
            {"one": 1.0, "all": 1.5} if faster == 1 else {"one": 1.5, "all": 1.0}
        )
        monkeypatch.setattr(torch, "mv", spy)
        got = runner.decode(batch_of_one())
        assert seen == [faster] and torch.get_num_threads() == 2
        assert torch.equal(got, reference)  # the same logits whichever way (one dot a row)
        seen.clear()
        torch.set_num_threads(1)  # beside the training worker (Executor._beside_worker): one
        assert torch.equal(runner.decode(batch_of_one()), reference)
        assert seen == [1]
    finally:
        torch.set_num_threads(threads)
    fp32 = Runner(load_model("tiny", dtype="float32").model, device=loaded.device)
    assert fp32.choose_row_threads(Batch()) == []  # float32: no RowLinear, nothing measured
    assert fp32.row_threads == {}


def test_the_engine_measures_the_one_row_threads_at_start_and_status_says_which(tmp_path):
    from fineinfer_jupyter.kernel.render import status_lines

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = EngineConfig(model="tiny", data_dir=tmp_path, policy="immediate", dtype="bfloat16")
        with Engine(config, thread=False) as e:
            rows = e.status()["row_threads"]
            layers = [
                m for m in e.core.loaded.model.modules() if isinstance(m, precision.RowLinear)
            ]
            assert rows["threads"] in (1, 2) and "a one-row pass took" in rows["reason"]
            assert {m.spread for m in layers} == {rows["threads"] == 2}
            seconds = rows["seconds"]
            assert (seconds["all"] * 1.03 < seconds["one"]) is (rows["threads"] == 2)
            line = f"one-row products on {rows['threads']} thread"
            assert any(x.startswith(line) for x in status_lines(e.status(), "url"))
            stream = e.generate(PROMPTS[0], max_new_tokens=3, ignore_eos=True)
            run_until_done(e, [stream])
            assert len(stream.final["token_ids"]) == 3
        fp32 = EngineConfig(model="tiny", data_dir=tmp_path / "f", dtype="float32")
        with Engine(fp32, thread=False) as e:
            assert e.status()["row_threads"] is None
            assert not any("one-row products" in x for x in status_lines(e.status(), "url"))
    finally:
        torch.set_num_threads(threads)


def test_a_bf16_model_multiplies_many_rows_by_a_prepacked_weight_until_the_weight_moves(
    monkeypatch,
):
    import copy

    loaded = load_model("tiny", dtype="bfloat16")
    layer = loaded.model.model.layers[0].mlp.down_proj
    assert layer.packed is not None  # (a tiny model: its copies fit)
    rows = [m for m in loaded.model.modules() if isinstance(m, precision.RowLinear)]
    # status reports the copies' bytes: one more copy of every RowLinear's weight
    assert precision.prepacked_bytes(loaded.model) == sum(
        m.weight.numel() * m.weight.element_size() for m in rows
    )
    calls, pointwise = [], torch.ops.mkldnn._linear_pointwise
    spy = lambda *a: calls.append(a[1]) or pointwise(*a)  # noqa: E731
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        assert calls == [layer.packed]
        ref = torch.nn.functional.linear(x, layer.weight)
        torch.testing.assert_close(got, ref, rtol=2**-6, atol=2**-6 * ref.abs().max().item())
        twin = copy.deepcopy(layer)  # a copy has no packed weight, and multiplies as before
        assert twin.packed is None and torch.equal(twin(x), ref)
        layer.weight = torch.nn.Parameter(layer.weight * 2, requires_grad=False)  # moved
        assert torch.equal(layer(x), 2 * ref) and len(calls) == 1
    x.requires_grad_()
    layer(x).sum().backward()  # a forward with gradients: F.linear
    assert x.grad is not None and len(calls) == 1
    small = load_model("tiny", dtype="bfloat16").model
    for m in small.modules():
        m.__dict__.pop("packed", None)
    assert precision.prepack(small, available=1).startswith("not prepacked")  # no room
    assert all(getattr(m, "packed", None) is None for m in small.modules())
    assert precision.prepacked_bytes(small) == 0
    assert precision.prepacked_bytes(load_model("tiny", dtype="float32").model) == 0


def test_many_rows_multiply_in_counts_padded_to_a_bucket(
    monkeypatch,
):
    loaded = load_model("tiny", dtype="bfloat16")
    layer = loaded.model.model.layers[0].mlp.up_proj
    seen, pointwise = [], torch.ops.mkldnn._linear_pointwise
    spy = lambda *a: seen.append((a[0].shape[0], a[1].shape)) or pointwise(*a)  # noqa: E731
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    x = torch.randn(3, 15, layer.in_features, dtype=torch.bfloat16)  # 45 rows: padded to 64
    with torch.no_grad():
        got = layer(x)
        assert got.shape == (3, 15, layer.out_features) and seen == [(64, layer.packed.shape)]
        # each row's product is its own: the padding's zero rows change none of them
        alone = torch.cat([layer(x[:, i : i + 1].reshape(3, 1, -1)) for i in range(15)], 1)
        torch.testing.assert_close(got, alone.reshape(got.shape), rtol=2**-7, atol=1e-3)
        seen.clear()
        assert layer(x[:1, :8]).shape == (1, 8, layer.out_features)  # 8 rows: as they are
        assert seen == [(8, layer.packed.shape)]


def test_a_one_thread_block_is_its_own_threads_and_leaves_another_threads_products_alone():
    import threading

    seen = []

    def elsewhere():  # a training worker's thread beside the engine thread's block
        torch.set_num_threads(3)
        seen.append((precision._pass.threads, torch.get_num_threads()))

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with precision.fewer_threads(1):
            assert precision._pass.threads == 2 and torch.get_num_threads() == 1
            t = threading.Thread(target=elsewhere)
            t.start(), t.join()
        assert precision._pass.threads is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [(None, 3)]


def test_a_decodes_one_query_attention_computes_in_fp32_and_nothing_else_changes():
    """No gradients, one query position, bf16 on a CPU: float32 queries, keys and values (the
    bf16 flash kernel took 2.5-6x longer), the output cast back; a prefill's several query
    positions, a float32 model's, and a forward that records gradients (outside a training
    block) are transformers' own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    precision.upcast_attention()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.training, module.num_key_value_groups = True, False, 2
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1, :, :, :7] = False  # (a padded row)
    q = torch.randn(2, 4, 1, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 40, 16, dtype=torch.bfloat16) for _ in range(2))
    kw = dict(scaling=0.25)
    plain = sdpa_attention_forward(module, q, k, v, mask, **kw)[0]
    upcast = sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, **kw)[0]
    assert not torch.equal(plain, upcast.to(torch.bfloat16))  # (the test can tell them apart)
    with torch.no_grad():
        got = fns["sdpa"](module, q, k, v, mask, **kw)[0]
        assert got.dtype == torch.bfloat16 and torch.equal(got, upcast.to(torch.bfloat16))
        many = torch.randn(2, 4, 3, 16, dtype=torch.bfloat16)  # three query positions
        mask3 = mask.expand(2, 1, 3, 40)
        ref = sdpa_attention_forward(module, many, k, v, mask3, **kw)[0]
        assert torch.equal(fns["sdpa"](module, many, k, v, mask3, **kw)[0], ref)
        q32 = q.float()
        ref = sdpa_attention_forward(module, q32, k.float(), v.float(), mask, **kw)[0]
        assert torch.equal(fns["sdpa"](module, q32, k.float(), v.float(), mask, **kw)[0], ref)
    with torch.enable_grad():
        assert torch.equal(fns["sdpa"](module, q, k, v, mask, **kw)[0], plain)
