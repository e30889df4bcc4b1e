"""A chunk's attention (attention.py): a pass with earlier KV split into its queries over the
earlier keys and over its own keys gives transformers' sdpa result, and anything the split
would not compute exactly goes to transformers' sdpa unchanged (docs/design.md, "Scheduling")."""

from types import SimpleNamespace

import pytest
import torch
from families import FAMILIES, build
from test_longctx import GROWN, PROMPT, TOL, chunked, true_prefill
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fineinfer_jupyter.engine import attention
from fineinfer_jupyter.engine.attention import NAME, chunk_attention_forward, splits
from fineinfer_jupyter.engine.config import SamplingParams, Slo
from fineinfer_jupyter.engine.costmodel import CostModel, pass_units
from fineinfer_jupyter.engine.runner import Runner
from fineinfer_jupyter.engine.sequence import Sequence

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def qkv(dtype, heads, kv_heads, new, past, rows=1, d=16):
    """Random q ([B, H, S, D], strided as the models' transposed projections are), k and v
    ([B, H_kv, P + S, D]), and the plain causal mask of S queries after P earlier tokens."""
    g = torch.Generator().manual_seed(new * 1000 + past)
    q = torch.randn(rows, new, heads, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(rows, kv_heads, past + new, d, generator=g).to(dtype)
    v = torch.randn(rows, kv_heads, past + new, d, generator=g).to(dtype)
    mask = torch.ones(new, past + new, dtype=torch.bool).tril(past)
    return q, k, v, mask.expand(rows, 1, new, past + new)


def layer(heads, kv_heads):
    return SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (9, 3)])
@pytest.mark.parametrize("new,past", [(2, 1), (7, 30), (64, 64), (100, 257)])
def test_a_split_chunk_gives_sdpas_attention(dtype, heads, kv_heads, new, past):
    q, k, v, mask = qkv(dtype, heads, kv_heads, new, past, rows=2)
    m = layer(heads, kv_heads)
    assert splits(q, k, mask, 0.0, {})  # the split path, not the fallback
    want, _ = sdpa_attention_forward(m, q, k, v, mask, scaling=0.3)
    got, none = chunk_attention_forward(m, q, k, v, mask, scaling=0.3)
    assert none is None and got.shape == want.shape and got.dtype == dtype
    assert got.is_contiguous()
    assert torch.allclose(got.float(), want.float(), atol=ATOL[dtype], rtol=0)


def fallbacks():
    """(what, q, k, v, mask, kwargs) the split must leave to sdpa."""
    q, k, v, mask = qkv(torch.float32, 4, 2, 8, 24)
    padded = mask.clone()
    padded[..., :3] = False  # a left-padded row
    window = mask & torch.ones(8, 32, dtype=torch.bool).triu(32 - 8 - 5)  # last 5+ keys only
    q1, k1, v1, m1 = qkv(torch.float32, 4, 2, 1, 24)
    grad = q.clone().requires_grad_()
    return [
        ("padding", q, k, v, padded, {}),
        ("a sliding window that cuts", q, k, v, window, {}),
        ("a float mask", q, k, v, torch.zeros(1, 1, 8, 32).masked_fill(~mask, -1e9), {}),
        ("one-query decode", q1, k1, v1, m1, {}),
        ("one pass (no earlier keys)", q, k[:, :, :8], v[:, :, :8], None, {}),
        ("no mask", q, k, v, None, {}),
        ("soft-capping", q, k, v, mask, {"softcap": 30.0}),
        ("sinks", q, k, v, mask, {"s_aux": torch.zeros(4)}),
        ("a gradient", grad, k, v, mask, {}),
    ]


@pytest.mark.parametrize("case", fallbacks(), ids=lambda c: c[0])
def test_what_the_split_would_change_goes_to_sdpa_bit_for_bit(case):
    _, q, k, v, mask, kwargs = case
    m = layer(4, 2)
    assert not splits(q, k, mask, 0.0, kwargs)
    if "softcap" in kwargs:  # sdpa itself refuses it (such models run eager attention)
        with pytest.raises(ValueError):
            chunk_attention_forward(m, q, k, v, mask, **kwargs)
        return
    want, _ = sdpa_attention_forward(m, q, k, v, mask, scaling=0.3, **kwargs)
    got, _ = chunk_attention_forward(m, q, k, v, mask, scaling=0.3, **kwargs)
    assert torch.equal(got, want)


def test_dropout_and_a_window_that_does_not_cut():
    q, k, v, mask = qkv(torch.float32, 4, 2, 8, 24)
    assert not splits(q, k, mask, 0.1, {})
    assert splits(q, k, mask, 0.0, {"sliding_window": 4096})  # the mask says what it cuts


def test_a_pass_checks_its_mask_once_and_a_new_mask_again():
    q, k, v, mask = qkv(torch.float32, 4, 2, 8, 24)
    padded = mask.clone()
    padded[..., 0] = False
    assert splits(q, k, mask, 0.0, {}) and splits(q, k, mask, 0.0, {})
    assert not splits(q, k, padded, 0.0, {})
    assert splits(q, k, mask.clone(), 0.0, {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"] + ["mistral-wide"])
def test_chunks_split_in_every_family_give_one_pass_logits(family, dtype, monkeypatch):
    """Every family that runs sdpa, with the chunk attention as models.py picks it: chunks
    (through the walk, or the model's own forward) give one pass's logits, and the split ran
    where a layer's mask is the plain causal one (not in a layer whose 8-token window cuts
    into the earlier keys; a window wider than the prompt splits; Gemma2 runs eager)."""
    wide = family == "mistral-wide"
    model, _ = build(family.removesuffix("-wide"), max_position_embeddings=1024)
    if wide:
        model, _ = build("mistral", max_position_embeddings=1024, sliding_window=512)
    cutting = [getattr(x, "is_sliding", False) for x in DynamicCache(config=model.config).layers]
    model.set_attn_implementation(NAME)
    runner = Runner(model.to(dtype), device=torch.device("cpu"))
    ran = []
    split = attention.split_attention
    monkeypatch.setattr(attention, "split_attention", lambda *a: ran.append(1) or split(*a))
    one = Sequence(PROMPT, sampling=SamplingParams(), slo=Slo())
    _, _, whole = runner.prefill([one])
    assert not ran  # a one pass keeps sdpa's causal kernel
    for ends in ([10, 33, 61, 90], [64, 90]):
        logits, _ = chunked(runner, ends)
        assert torch.allclose(logits, whole, atol=TOL[dtype], rtol=0), ends
        assert logits.argmax() == whole.argmax()
    assert bool(ran) == (not all(cutting) or wide)


# -- the cost model (costmodel.py): a split chunk costs a one pass's per pair ---------------------


def split_prefill(new: int, past: int, per_token: float, per_pair: float) -> float:
    """test_longctx.true_prefill where chunks split: every pair at a one pass's causal rate
    (`per_pair` is the masked rate, 1.5x it)."""
    return true_prefill(new, 0, per_token, 0.0) + per_pair * new * (past + new / 2) / 1.5


@pytest.mark.parametrize(
    "per_token, per_pair",
    [(0.0003, 7.5e-8), (0.0025, 8e-8), (0.0003, 1e-9)],
    ids=["bf16-like", "fp32-like", "attention-cheap"],
)
def test_calibrated_on_split_chunks_one_passes_and_chunks_are_estimated_within_5_percent(
    per_token, per_pair
):
    """The load-time probes (grown to 1,024 tokens, the chunk after 2,048) timed where chunks
    split: a 4,096-token one pass and chunks after 1,000-3,800 tokens are estimated within 5%
    (counted as masked chunks, as before, the fit absorbed most of the difference: within 7%)."""
    probes = [(n, p, split_prefill(n, p, per_token, per_pair)) for n, p in GROWN]
    costs = CostModel()
    costs.split, costs.span = True, 3072.0
    costs.calibrate_prefill(probes)
    for new, past in ((4096, 0), (512, 3584), (1024, 3072), (1024, 1024), (256, 3840)):
        estimate = costs.prefill(pass_units(new, past, costs.span, split=True))
        want = split_prefill(new, past, per_token, per_pair)
        assert estimate == pytest.approx(want, rel=0.05), (new, past)


def test_the_engine_counts_chunks_as_split_where_they_are():
    """The executor and the scheduler's cost model agree; sdpa (the old path), eager and a GPU
    do not split."""
    from fineinfer_jupyter.engine.attention import chunks_split
    from fineinfer_jupyter.engine.models import build_tiny

    config = build_tiny()[0].config
    assert chunks_split(config, torch.device("cpu"))
    assert not chunks_split(config, torch.device("cuda"))
    for other in ("sdpa", "eager"):
        config._attn_implementation = other
        assert not chunks_split(config, torch.device("cpu"))


# prefill passes of SmolLM2-135M in bf16 with the chunk attention on this project's CPU (1
# thread, process seconds, the least of two, a shared machine, 2026-12-06 06:12 UTC):
# (new tokens, tokens already in the KV cache) -> seconds (test_longctx.RECORDED: before)
RECORDED_SPLIT = {
    (16, 0): 0.0577, (64, 0): 0.0742, (256, 0): 0.137, (512, 0): 0.2596, (1024, 0): 0.5375,
    (2048, 0): 1.3529, (4096, 0): 3.2294, (1024, 2048): 0.9837, (512, 3584): 0.6579,
    (1024, 3072): 1.2019, (256, 3840): 0.3692,
}  # fmt: skip


def test_from_recorded_split_probes_one_passes_and_chunks_are_estimated_within_10_percent():
    """The probes Executor.calibrate times, as measured on the real model with the chunk
    attention: a 4,096-token one pass, chunks after 2,000-3,800 tokens and a whole prompt in
    chunks of 1,024 or 512 are estimated within 10% (the prompt in chunks: ~1.0x its one pass,
    as measured side by side in docs/benchmarks.md, round 3b)."""
    r = RECORDED_SPLIT
    costs = CostModel()
    costs.split, costs.span = True, 3072.0
    costs.calibrate_prefill([(n, p, r[n, p]) for n, p in GROWN if (n, p) in r])

    def estimate(new, past):
        return costs.prefill(pass_units(new, past, costs.span, split=True))

    for new, past in ((4096, 0), (1024, 2048), (512, 3584), (1024, 3072), (256, 3840)):
        assert estimate(new, past) == pytest.approx(r[new, past], rel=0.1), (new, past)
    for size in (1024, 512):
        chunks = sum(estimate(size, past) for past in range(0, 4096, size))
        assert chunks / estimate(4096, 0) == pytest.approx(1.0, abs=0.1), size
