"""Every supported family in fp32 and bf16 (bf16 at bf16 tolerance), each a tiny random model
saved as a Hugging Face folder (tests/families.py): the walk gives the model's own logits past
the sliding window with mixed adapters, a micro-step in units gives the whole step's gradients,
the engine's greedy tokens equal transformers' generate while rows join and leave, a prompt's
echoed logprobs are the model's own, a job trains
and its PEFT folder loads in plain PEFT to the same logits, and the adapter exports to llama.cpp
or is refused in one line. GPT-NeoX runs through the fallback (the model's own forward)."""

import copy

import pytest
import torch
from families import FAMILIES, WALKED, WINDOW, save
from peft import LoraConfig, PeftModel, get_peft_model
from test_training import RECORDS
from test_walk import walk_logits
from transformers import DynamicCache

from fineinfer_jupyter.engine import export
from fineinfer_jupyter.engine.batch import Batch
from fineinfer_jupyter.engine.config import EngineConfig, SamplingParams, Slo
from fineinfer_jupyter.engine.data import Example, collate
from fineinfer_jupyter.engine.engine import Engine
from fineinfer_jupyter.engine.features import FEATURES
from fineinfer_jupyter.engine.lean import SHAPES, LeanLayer
from fineinfer_jupyter.engine.models import load_model
from fineinfer_jupyter.engine.precision import decoding
from fineinfer_jupyter.engine.runner import Runner
from fineinfer_jupyter.engine.sequence import Sequence
from fineinfer_jupyter.engine.walk import FAMILIES as WALK_FAMILIES
from fineinfer_jupyter.engine.walk import LayerWalk, TrainingPass
from fineinfer_jupyter.kernel.render import status_lines

EPS = {"fp32": 2**-23, "bf16": 2**-7}  # a unit in the last place, relative
CASES = [(f, d) for f in FAMILIES for d in EPS]
WALKED_CASES = [c for c in CASES if c[0] in WALKED]
# longer than the sliding window (8) before the first decoded token
PROMPTS = ["The quick brown fox", "Hello there, tiny!", "1234567890ab", "Sing, O muse, of"]
TRAIN = dict(r=8, lora_alpha=16, learning_rate=2e-2, batch_size=4, micro_batch_size=2)


def assert_close(got, expected, dtype, what="", ulps=None):
    """Equal up to a few rounding steps of `dtype` at the tensor's scale (bf16: 4 units in the
    last place of the largest value; the same computations in another order)."""
    scale = expected.abs().max().item()
    ulps = ulps or (4 if dtype == "bf16" else 64)
    torch.testing.assert_close(
        got, expected, rtol=ulps * EPS[dtype], atol=ulps * EPS[dtype] * scale, msg=what or None
    )


def ids_of(case):
    return f"{case[0]}-{case[1]}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the engines here use: the same rounding in every run, and tiny
    models run faster on one thread than on two shared ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: save(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(folders):
    """The folder of each case loaded as the engine loads it (its dtype, its attention)."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = load_model(folders[case[0]], dtype=case[1], device="cpu")
        return cache[case]

    return get


def two_adapters(model):
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(model), config, adapter_name="one")
    peft.add_adapter("two", config)
    return peft.eval()


@pytest.mark.parametrize("case", WALKED_CASES, ids=ids_of)
@torch.no_grad()
def test_the_walk_gives_the_models_own_logits_past_the_sliding_window_with_mixed_adapters(
    case, loaded
):
    model = two_adapters(loaded(case).model)
    walk = LayerWalk(model)
    assert walk.supported, walk.why_not
    torch.manual_seed(2)
    ids = torch.randint(3, 250, (3, 12))  # [B, P]: P > WINDOW
    ids[0, :5] = ids[2, :1] = 0  # left padding
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows, names = ["one", "two", None], ["one", "two", "__base__"]
    theirs, mine = DynamicCache(config=model.config), DynamicCache(config=model.config)
    for _ in range(4):  # prefill, then decodes past the window of every row
        ref = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=theirs,
            use_cache=True, adapter_names=names,
        ).logits  # fmt: skip
        assert_close(walk_logits(walk, ids, mask, positions, mine, rows), ref, case[1])
        ids = ref[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        positions = positions[:, -1:] + 1
    assert mask.sum(1).min() > WINDOW + 1
    assert not torch.equal(ref[0], ref[2])  # the adapters do change the answer


@pytest.mark.parametrize("case", WALKED_CASES, ids=ids_of)
@torch.no_grad()
def test_the_lean_decode_gives_the_module_calls_logits_bit_for_bit(case, folders, monkeypatch):
    """lean.py's decoder layers against the modules' own calls: the same numbers, bit for bit,
    without PEFT, for rows on two adapters and the base, rows all on one adapter (lean.lora_rows
    adds to the whole output), rows all on the base (the LoRA layers' base layers alone); in
    bf16 by the int4 copies of a decode pass."""
    family, dtype = case
    weights = "int4" if dtype == "bf16" else "base"
    model = load_model(folders[family], dtype=dtype, device="cpu", decode_weights=weights).model
    copies = [m for m in model.modules() if getattr(m, "int4", None) is not None]
    assert bool(copies) == (dtype == "bf16")
    for m in copies:  # (the test's three rows multiply by them too)
        m.copy_rows = 3
    ran = []  # the layers the lean decode ran (not a silent fallback to the module calls)
    run = LeanLayer.run
    monkeypatch.setattr(LeanLayer, "run", lambda self, *a, **k: ran.append(1) or run(self, *a, **k))
    for rows in (None, ["one", "two", None], ["two"] * 3, [None] * 3):
        if rows is not None and not hasattr(model, "peft_config"):  # adapters, in place
            torch.manual_seed(1)
            config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
            model = get_peft_model(model, config, adapter_name="one")
            model.add_adapter("two", config)
            model.eval()
        lean, calls = LayerWalk(model), LayerWalk(model)
        calls.lean = False
        assert lean.lean_why_not is None and calls.lean_why_not == "lean_decode is off"
        torch.manual_seed(2)
        ids = torch.randint(3, 250, (3, 12))  # [B, P]: P > WINDOW
        ids[0, :5] = ids[2, :1] = 0  # left padding
        mask = (ids != 0).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = [DynamicCache(config=model.config) for _ in range(2)]
        kind = "prefill"
        for _ in range(5):  # prefill, then decodes past the window of every row
            with decoding(kind == "decode"):
                got = [
                    walk_logits(w, ids, mask, positions, c, rows, kind=kind)
                    for w, c in zip((lean, calls), caches)
                ]
            assert torch.equal(got[0], got[1]), (kind, rows)
            assert len(ran) == (lean.num_layers if kind == "decode" else 0)
            ran.clear()
            ids, kind = got[1][:, -1:].argmax(-1), "decode"
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            positions = positions[:, -1:] + 1
        assert mask.sum(1).min() > WINDOW + 1


def test_every_walked_family_has_a_lean_decode():
    assert set(SHAPES) == set(WALK_FAMILIES)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", WALKED_CASES, ids=ids_of)
def test_a_micro_step_in_units_gives_the_whole_steps_loss_and_gradients(case, loaded):
    model = two_adapters(loaded(case).model)
    model.set_adapter("one")
    examples = [
        Example(list(range(3, 23)), [-100] * 5 + list(range(8, 23))),
        Example(list(range(30, 42)), [-100] * 3 + list(range(33, 42))),
    ]
    batch = collate(examples, 0)
    whole = TrainingPass(None, model, batch, scale=0.1)  # the model's own forward and backward
    whole.run(whole.units)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    cut = TrainingPass(LayerWalk(model), model, batch, scale=0.1)
    while not cut.finished:
        cut.run(2)
    got = grads(model)
    assert cut.units == 2 * (model.config.num_hidden_layers + 1)
    assert cut.loss_sum == pytest.approx(whole.loss_sum, rel=64 * EPS[case[1]])
    assert got.keys() == expected.keys() and len(got) > 0
    for name, g in expected.items():
        assert_close(got[name], g, case[1], name)
    # kept apart (two micro-steps at once, Trainer.work_side): none on .grad until add_grads(),
    # then exactly backward's, added to what was there
    own = TrainingPass(LayerWalk(model), model, batch, scale=0.1, own_grads=True)
    while not own.finished:
        own.run(2)
    left = grads(model)
    assert left.keys() == got.keys() and all(torch.equal(left[n], got[n]) for n in got)
    assert len(own.grads) == len(got)
    kept = dict(own.grads)
    own.add_grads()  # onto cut's: added
    assert own.loss_sum == cut.loss_sum and own.grads == {}
    assert all(torch.equal(g, got[n] + got[n]) for n, g in grads(model).items())
    model.zero_grad(set_to_none=True)
    own.grads = kept
    own.add_grads()  # onto none: exactly cut's
    mine = grads(model)
    assert mine.keys() == got.keys() and all(torch.equal(mine[n], got[n]) for n in got)


@pytest.fixture(scope="module", params=CASES, ids=ids_of)
def engine(request, folders, tmp_path_factory):
    """An engine on the case's folder (no thread: tests iterate it), with an adapter trained."""
    family, dtype = request.param
    config = EngineConfig(
        model=folders[family],
        dtype=dtype,
        device="cpu",
        data_dir=tmp_path_factory.mktemp("data"),
        policy="immediate",
        threads=1,  # the same reduction order in every run (bf16 rounds by it)
    )
    e = Engine(config, thread=False)
    e.case = request.param
    yield e
    e.shutdown()


def run_until_done(e, streams, also=None):
    for i in range(10_000):
        if all(s.final is not None for s in streams):
            return
        if also is not None:
            also(i)
        e.iterate()
    raise AssertionError("requests did not finish")


def generate(model, tokenizer, prompt, n):
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
    )
    return out[0, ids.shape[1] :].tolist()


def test_greedy_tokens_equal_generate_while_rows_join_and_leave_past_the_window(engine, loaded):
    base = loaded(engine.case)
    lengths = [3, 9, 6, 7]  # rows leave at different steps, the longest prompt first
    expected = [
        generate(base.model, base.tokenizer, p, n) for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    streams = [engine.generate(p, max_new_tokens=n) for p, n in zip(PROMPTS[:3], lengths[:3])]
    late = []

    def join(i):  # a fourth row joins the running batch after a few decodes
        if i == 3:
            late.append(engine.generate(PROMPTS[3], max_new_tokens=lengths[3]))

    run_until_done(engine, streams, also=join)
    run_until_done(engine, late)
    for prompt, stream, theirs in zip(PROMPTS, streams + late, expected, strict=True):
        mine = stream.final["token_ids"]
        if mine != theirs and engine.case[1] == "bf16":
            assert_near_tie(base, prompt, mine, theirs)
        else:
            assert mine == theirs
    walk = engine.status()["layer_walk"]
    assert walk["enabled"] == (engine.case[0] in WALKED), walk
    assert walk["lean_decode"] == (engine.case[0] in WALKED), walk  # (these decodes ran lean)


def test_status_says_which_features_the_model_lacks_and_why(engine):
    features = engine.status()["features"]
    lines = status_lines(engine.status(), "http://x")
    if engine.case[0] in WALKED:
        assert features == {"available": list(FEATURES), "lacking": {}}
        assert not any("lacks" in line for line in lines)
        return
    lacking = ["pausable_micro_steps", "offload", "gguf_export", "vllm_export"]
    assert features["available"] == ["serving", "training"]
    assert list(features["lacking"]) == lacking
    assert "model type 'gpt_neox'" in features["lacking"]["offload"]
    assert "this model is a GPTNeoXForCausalLM" in features["lacking"]["gguf_export"]
    assert [line.split(":")[0] for line in lines if "lacks" in line] == [
        f"this model lacks {f.replace('_', ' ')}" for f in lacking
    ]


@torch.no_grad()
def assert_near_tie(base, prompt, mine, theirs):
    """bf16 only: where the tokens part, the reference's two best logits were within a few
    rounding steps (the batch adds in another order), and the engine took one of them."""
    i = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
    ids = base.tokenizer(prompt, add_special_tokens=False)["input_ids"] + theirs[:i]
    logits = base.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    top = logits.topk(2)
    assert {mine[i], theirs[i]} == set(top.indices.tolist()), (i, mine, theirs)
    assert top.values[0] - top.values[1] <= 4 * EPS["bf16"] * logits.abs().max(), (i, top)


@pytest.fixture(scope="module")
def trained(engine):
    job = engine.tune("herb", RECORDS, max_steps=8, **TRAIN)["id"]
    while engine.core.trainer.current is not None or engine.core.trainer.queue:
        engine.iterate()
    return engine.job(job)


def test_a_job_trains_and_its_peft_folder_loads_in_peft_to_the_same_logits(
    engine, trained, folders
):
    assert trained["state"] == "done", trained.get("error")
    losses = [loss for _, loss in trained["loss_history"]]
    assert losses[-1] < losses[0] * 0.9, losses
    base = load_model(folders[engine.case[0]], dtype=engine.case[1], device="cpu").model
    peft = PeftModel.from_pretrained(base, engine.home / "adapters" / "herb").eval()
    ids = torch.tensor([list(range(10, 30))])
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
        mine = engine.core.runner.forward(
            ids, mask=torch.ones_like(ids), position_ids=None, adapters=["herb"]
        )
    # per-row adapters (PEFT's mixed-batch path) round each LoRA output to bf16 before adding
    # it, PEFT's plain forward adds in float32 and rounds once: a unit more per layer in bf16
    assert_close(mine, theirs, engine.case[1], ulps=8)


def test_the_adapter_exports_where_llama_cpp_names_the_modules_else_one_line(engine, trained):
    family = engine.case[0]
    if family in WALKED:
        result = engine.export_adapter("herb", "gguf")
        assert result["modules"] == 7 * 2 or result["modules"] == 4 * 2  # Phi-3: fused
        assert engine.export_adapter("herb", "vllm")["r"] == TRAIN["r"]
        return
    for to in ("gguf", "vllm"):
        with pytest.raises(ValueError, match=r"^base: .*this model is a GPTNeoXForCausalLM$"):
            engine.export_adapter("herb", to)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
@torch.no_grad()
def test_a_failed_decode_is_rewound_in_every_cache_layer(family, loaded):
    runner = Runner(loaded((family, "fp32")).model, device=torch.device("cpu"))
    seqs = [Sequence(list(range(3, 3 + n)), sampling=SamplingParams(), slo=Slo()) for n in (14, 9)]
    batch = Batch()
    batch.join(seqs, *runner.prefill(seqs)[:2])
    for s in seqs:
        s.output_ids.append(5)
    mark = batch.mark()
    before = [(x.keys.clone(), getattr(x, "cumulative_length", None)) for x in batch.cache.layers]
    first = runner.decode(batch)
    batch.rewind(mark)
    after = [(x.keys, getattr(x, "cumulative_length", None)) for x in batch.cache.layers]
    assert all(torch.equal(a, b) and m == n for (a, m), (b, n) in zip(before, after))
    assert torch.equal(runner.decode(batch), first)
    assert any(getattr(x, "is_sliding", False) for x in batch.cache.layers)


def test_gpt_neox_falls_back_to_its_own_forward_and_says_why(loaded):
    walk = LayerWalk(loaded(("gpt_neox", "fp32")).model)
    assert not walk.supported and "'gpt_neox'" in walk.why_not


def test_export_knows_every_walked_family():
    assert {
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
        "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
    } <= set(export.ARCHS)  # fmt: skip


@pytest.mark.parametrize(
    "case, mode",
    [(("mistral", "bf16"), "cpu"), (("gemma3", "fp32"), "disk"), (("qwen2", "bf16"), "disk")],
    ids=["mistral-bf16-cpu", "gemma3-fp32-disk", "qwen2-bf16-disk"],
)
def test_offloaded_layers_of_a_sliding_window_family_give_generates_tokens(
    case, mode, folders, loaded, tmp_path
):
    base = loaded(case)
    config = EngineConfig(
        model=folders[case[0]], dtype=case[1], device="cpu", data_dir=tmp_path, threads=1,
        offload=mode, memory_budget=0, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    with Engine(config, thread=False) as e:
        assert e.status()["offload"]["layers"] == 2
        streams = [e.generate(p, max_new_tokens=6) for p in PROMPTS[:2]]
        run_until_done(e, streams)
    for prompt, stream in zip(PROMPTS, streams, strict=False):
        theirs = generate(base.model, base.tokenizer, prompt, 6)
        mine = stream.final["token_ids"]
        if mine != theirs and case[1] == "bf16":
            assert_near_tie(base, prompt, mine, theirs)
        else:
            assert mine == theirs


def decode_alone(runner, seq, n):
    batch = Batch()
    cache, mask, logits = runner.prefill([seq])
    batch.join([seq], cache, mask)
    seq.output_ids.append(int(logits.argmax(-1)))
    for _ in range(n - 1):
        seq.output_ids.append(int(runner.decode(batch).argmax(-1)))
    return seq.output_ids


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen2"])
@torch.no_grad()
def test_rows_join_wider_and_narrower_and_leave_with_the_tokens_they_get_alone(family, loaded):
    """Every cache layer (full or sliding) padded when a wider row joins, and trimmed when the
    widest row leaves, past the sliding window."""
    runner = Runner(loaded((family, "fp32")).model, device=torch.device("cpu"))
    prompts = [list(range(3, 13)), list(range(40, 55)), list(range(80, 85)), list(range(90, 96))]
    seqs = [Sequence(p, sampling=SamplingParams(), slo=Slo()) for p in prompts]
    batch = Batch()

    def join(group):
        cache, mask, logits = runner.prefill(group)
        batch.join(group, cache, mask)
        for s, t in zip(group, logits.argmax(-1).tolist(), strict=True):
            s.output_ids.append(t)

    def decode(n):
        for _ in range(n):
            for s, t in zip(batch.seqs, runner.decode(batch).argmax(-1).tolist(), strict=True):
                s.output_ids.append(t)

    join(seqs[:1])
    decode(2)  # 12 columns
    join(seqs[1:3])  # 15 columns: the batch is padded, the 5-token row too
    decode(3)
    batch.drop(seqs[1])  # the widest leaves: the leading columns go
    assert batch.length < 18
    join(seqs[3:])  # narrower: it is padded
    decode(WINDOW)
    got = [s.output_ids for s in seqs]
    alone = [
        decode_alone(runner, Sequence(p, sampling=SamplingParams(), slo=Slo()), len(g))
        for p, g in zip(prompts, got, strict=True)
    ]
    assert got == alone
    assert any(getattr(x, "is_sliding", False) for x in batch.cache.layers)


def test_a_long_prompt_in_chunks_and_a_cached_turn_give_generates_tokens(engine, loaded):
    """Chunked prefill and the prefix cache (S1) in every family and dtype: a prompt prefilled
    64 tokens at a time past the sliding window, then a second turn that starts with the first
    (its KV from the prefix cache, except where a sliding-window layer cannot keep a prefix)."""
    base = loaded(engine.case)
    tight = {"ttft": 0.0005, "tpot": 0.0005}  # no pass may be long: 64-token chunks
    first = "Sing, O muse, of the wrath of Achilles, son of Peleus, that brought woes. " * 2
    a = engine.generate(first, max_new_tokens=5, slo=tight)
    run_until_done(engine, [a])
    second = first + "And then? Tell me more of it."
    b = engine.generate(second, max_new_tokens=5, slo=tight)
    run_until_done(engine, [b])
    sliding = any(
        getattr(x, "is_sliding", False) for x in DynamicCache(config=base.model.config).layers
    )
    for prompt, stream in ((first, a), (second, b)):
        mine, theirs = stream.final["token_ids"], generate(base.model, base.tokenizer, prompt, 5)
        if mine != theirs and engine.case[1] == "bf16":
            assert_near_tie(base, prompt, mine, theirs)
        else:
            assert mine == theirs, prompt
    assert a.final["stats"]["prefill_chunks"] > 2
    cached = b.final["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert (cached >= len(first) - 1) if not sliding else cached == 0, cached


def test_echoed_prompt_logprobs_are_the_models_own_past_the_window(engine, loaded):
    """max_new_tokens 0 with prompt_logprobs (the OpenAI routes' echo): each prompt token's
    logprob is the log-softmax of the model's own forward, every family and dtype."""
    base = loaded(engine.case)
    streams = [engine.generate(p, max_new_tokens=0, prompt_logprobs=1) for p in PROMPTS[:2]]
    run_until_done(engine, streams)
    for prompt, stream in zip(PROMPTS[:2], streams, strict=True):
        (echo,) = [e for e in stream if "prompt_logprobs" in e]
        ids = base.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert [e["id"] for e in echo["prompt_logprobs"]] == ids
        with torch.no_grad():
            logits = base.model(input_ids=torch.tensor([ids])).logits[0].float()
        expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
        got = torch.tensor([[e["logprob"]] for e in echo["prompt_logprobs"][1:]])
        assert_close(got, expected, engine.case[1], f"{engine.case} {prompt!r}")
        assert stream.final["finish_reason"] == "length" and stream.final["token_ids"] == []
