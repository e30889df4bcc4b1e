"""A chunk's attention: the attention function of models that run transformers' sdpa, which
splits a pass with earlier KV (a chunk of a long prompt, the suffix of a prefix-cache hit) into
its queries over the earlier keys (no mask) and over its own keys (causal), merged by their
log-sum-exps, instead of SDPA's masked kernel (~1.5x the causal kernel's cost per pair on a
CPU). Anything else goes to transformers' sdpa function unchanged (docs/design.md, "Scheduling").
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "chunk_sdpa"  # config._attn_implementation of the models that use it (models.py)
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
# extra arguments some families pass that change attention: soft-capping, sinks (gpt-oss)
_CHANGES = ("softcap", "s_aux", "sinks")


def chunk_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention function (same arguments, same result), split where
    `splits` says the split is exact; otherwise the "sdpa" entry of transformers' table, so
    that its overrides (a training forward's attention in float32, precision.py) hold here."""
    if not splits(query, key, attention_mask, dropout, kwargs):
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]  # (with its overrides: precision.attention_in_fp32)
        return sdpa(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    return split_attention(query, key, value, scaling), None


def splits(query, key, mask, dropout, kwargs) -> bool:
    """CPU, no gradient, earlier keys (more keys than queries), and a mask that is exactly the
    plain causal one with the queries last: no padding, no sliding window that cuts into the
    earlier keys, no dropout, soft-capping, position bias nor sinks."""
    q, k = query.shape[2], key.shape[2]
    return (
        query.device.type == "cpu"
        and 1 < q < k
        and mask is not None
        and not dropout
        and kwargs.get("position_bias") is None
        and all(kwargs.get(name) is None for name in _CHANGES)
        and not (torch.is_grad_enabled() and query.requires_grad)
        and _plain_causal(mask, q, k)
    )


_seen: tuple = (None, 0, 0, False)  # (the last mask checked (weakref), q, k, its verdict)


def _plain_causal(mask: torch.Tensor, q: int, k: int) -> bool:
    """Whether `mask` ([B, 1, q, k] booleans) lets query i see keys 0 .. k - q + i, no more, no
    less, in every row. A pass's layers share its mask, so the verdict is kept for that tensor."""
    global _seen
    ref, q_seen, k_seen, verdict = _seen
    if ref is not None and ref() is mask and (q_seen, k_seen) == (q, k):
        return verdict
    verdict = (
        mask.dtype == torch.bool
        and mask.dim() == 4
        and mask.shape[1:] == (1, q, k)
        and torch.equal(mask, torch.ones(q, k, dtype=torch.bool).tril(k - q).expand_as(mask))
    )
    _seen = (weakref.ref(mask), q, k, verdict)  # (replaced whole: one assignment)
    return verdict


def split_attention(query, key, value, scaling) -> torch.Tensor:
    """softmax(q k^T) v over [earlier keys, own keys causally], as [B, S, H, D]. Over the earlier
    keys the grouped query heads of a key/value head are one longer query (no mask, so rows are
    independent): the earlier keys are not repeated. The own keys are few: repeated."""
    b, h, s, d = query.shape
    hkv, past = key.shape[1], key.shape[2] - s
    groups = h // hkv
    folded = query.reshape(b, hkv, groups * s, d)
    o1, l1 = _flash(folded, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scaling)
    o1, l1 = o1.reshape(b, h, s, -1), l1.reshape(b, h, s)
    own_k, own_v = repeat_kv(key[:, :, past:], groups), repeat_kv(value[:, :, past:], groups)
    o2, l2 = _flash(query, own_k, own_v, 0.0, True, scale=scaling)
    w1 = torch.sigmoid(l1 - l2).unsqueeze(-1)  # exp(l1) / (exp(l1) + exp(l2))
    out = torch.lerp(o2.float(), o1.float(), w1).to(query.dtype)
    return out.transpose(1, 2).contiguous()


def chunks_split(config, device: torch.device) -> bool:
    """Whether a model's chunks take the split (its attention is this one, on a CPU): a chunk's
    attention then costs a one pass's per pair (the cost model's `split`)."""
    return device.type == "cpu" and getattr(config, "_attn_implementation", None) == NAME


def register() -> str:
    """Make NAME a name transformers knows (attention and mask: the mask is sdpa's)."""
    AttentionInterface.register(NAME, chunk_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


register()
