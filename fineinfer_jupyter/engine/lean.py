"""A decode step's decoder layers without the module tree (docs/design.md, "The lean decode step").

A decode step of a small model on a CPU spends more of its time in Python than in its products:
the default model's step made ~660 module calls (each decoder layer, its attention, MLP and
norms, each projection twice, PEFT's LoRA layer and then the base layer under it) and each
module call's hooks and keyword plumbing. Here a decoder layer of a walked family runs as its
transformers modeling code runs it, the same tensor operations in the same order and so the
same numbers bit for bit (tests/test_families.py), calling each norm's and each base
projection's forward directly; a projection whose rows ask for an adapter goes through its PEFT
layer as the model's forward would. Only a decode pass (no gradients, a KV cache) of a layer in
eval mode, of a class transformers ships for its family, takes this path; anything else keeps
the module call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers.integrations.sdpa_attention import (
    pack_gqa,
    sdpa_attention_forward,
    use_gqa_in_sdpa,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import chunk_attention_forward

BASE_ROW = "__base__"  # PEFT's per-row name for "no adapter"
ON_BASE = "every row on the base"  # a pass's rows, when none asks for an adapter (`rows_of`)


@dataclass(frozen=True)
class Shape:
    """How a family's decoder layer differs from Llama's (transformers' modeling_<family>.py)."""

    fused_qkv: bool = False  # one qkv_proj, split (Phi-3)
    # q_norm/k_norm on each head: "before" the heads move to dim 1 (Qwen3), "after" (Gemma3)
    qk_norm: str | None = None
    sandwich: bool = False  # norms after attention and around the MLP (Gemma2, Gemma3)
    fused_gate_up: bool = False  # one gate_up_proj, chunked; up x act(gate) (Phi-3)
    # the attention function's sliding_window argument: from the "config" or the "module"
    window: str | None = None
    softcap: bool = False  # attention logits soft-capped (Gemma2)


# config.model_type -> its layer's shape; the decoder layer class transformers ships for it
SHAPES = {
    "llama": (Shape(), "LlamaDecoderLayer"),
    "mistral": (Shape(window="config"), "MistralDecoderLayer"),
    "qwen2": (Shape(window="module"), "Qwen2DecoderLayer"),
    "qwen3": (Shape(qk_norm="before", window="module"), "Qwen3DecoderLayer"),
    "phi3": (Shape(fused_qkv=True, fused_gate_up=True, window="config"), "Phi3DecoderLayer"),
    "gemma": (Shape(), "GemmaDecoderLayer"),
    "gemma2": (Shape(sandwich=True, window="module", softcap=True), "Gemma2DecoderLayer"),
    "gemma3_text": (Shape(qk_norm="after", sandwich=True, window="module"), "Gemma3DecoderLayer"),
}


def hooked(module: torch.nn.Module) -> bool:
    """A forward hook is on the module (walk.LayerWalk.rows' adapter hooks, a user's)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def direct(module: torch.nn.Module) -> Callable:
    """The module's forward, called without the module call around it, unless a hook is on it
    (its call then runs, hooks and all)."""
    return module if hooked(module) else module.forward


@dataclass(frozen=True)
class Rows:
    """A pass's rows when some ask for an adapter: PEFT's per-row names, and each adapter's rows
    (None: every row), found once for the pass rather than in every LoRA layer."""

    names: list[str]
    groups: tuple[tuple[str, list[int] | None], ...]


def rows_of(adapters: list[str] | None) -> Rows | str | None:
    """A pass's per-row adapter names as `project` takes them: ON_BASE when every row is on the
    base (BASE_ROW), Rows when some ask for an adapter, None for no PEFT model (or its active
    adapter)."""
    if adapters is None:
        return None
    if all(a == BASE_ROW for a in adapters):
        return ON_BASE
    groups = []
    for name in dict.fromkeys(adapters):
        if name != BASE_ROW:
            rows = [i for i, a in enumerate(adapters) if a == name]
            groups.append((name, None if len(rows) == len(adapters) else rows))
    return Rows(list(adapters), tuple(groups))


def project(module: torch.nn.Module, x: torch.Tensor, rows: Rows | str | None):
    """module(x) in a decode pass whose rows are `rows` (rows_of). A LoRA layer runs its base
    layer only when every row is on the base, as PEFT's disabled-adapter path does; with an
    adapter among them, PEFT's per-row path (`lora_rows`, or the layer itself for what that
    does not cover)."""
    if isinstance(module, LoraLayer):
        if rows is None:
            return module(x)
        if rows is not ON_BASE:
            if type(module) is LoraLinear and not module.lora_variant and not hooked(module):
                return lora_rows(module, x, rows)
            return module(x, adapter_names=rows.names)
        module = module.base_layer
    return direct(module)(x)


def lora_rows(module: LoraLinear, x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """PEFT's per-row forward of a plain LoRA Linear (`Linear._mixed_batch_forward`: the base
    layer's output plus, for each adapter's rows, B(A(dropout(x))) x scaling computed in the
    adapter's dtype), the same operations without the module calls; every row on one adapter
    adds to the whole output (the same sums as PEFT's indexed ones)."""
    result = direct(module.base_layer)(x)
    dtype = result.dtype
    for name, index in rows.groups:
        if name not in module.lora_A:  # (an adapter that leaves this layer alone)
            continue
        a, b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        sub = (x if index is None else x[index]).to(a.weight.dtype)
        out = direct(b)(direct(a)(direct(dropout)(sub))) * module.scaling[name]
        if index is None:
            result += out.to(dtype)
        else:
            result[index] += out.to(dtype)
    return result


class LeanLayer:
    """One decoder layer's decode pass (see the module's docstring): `run(hidden, ...)`."""

    def __init__(self, layer: torch.nn.Module, shape: Shape, config):
        self.layer, self.shape, self.config = layer, shape, config
        a = self.attn = layer.self_attn
        self.mlp = layer.mlp
        self.modules = (layer, a, self.mlp)
        # the family's own rotary function and eager attention, as its forward finds them
        family = sys.modules[type(a).__module__]
        self.rope = family.apply_rotary_pos_emb
        self.eager = family.eager_attention_forward
        self.extra = {}
        if shape.window == "config":
            self.extra["sliding_window"] = getattr(config, "sliding_window", None)
        elif shape.window == "module":
            self.extra["sliding_window"] = a.sliding_window
        if shape.softcap:
            self.extra["softcap"] = a.attn_logit_softcapping
        # (transformers' sdpa refuses a soft cap: that error stays the module's to raise)
        self.one_query = self.extra.get("softcap") is None
        if shape.fused_qkv:
            q = config.num_attention_heads * a.head_dim
            kv = a.num_key_value_heads * a.head_dim
            self.split = (q, q + kv)

    @property
    def hooked(self) -> bool:
        """Something hooks the layer, its attention or its MLP: the module calls run (the hooks
        see what they expect)."""
        return any(hooked(m) for m in self.modules)

    def run(
        self,
        hidden: torch.Tensor,
        *,
        mask,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache,
        rows: Rows | str | None,
        **kwargs,
    ) -> torch.Tensor:
        layer, shape = self.layer, self.shape
        residual = hidden
        hidden = direct(layer.input_layernorm)(hidden)
        hidden = self._attention(hidden, mask, position_embeddings, cache, rows, kwargs)
        if shape.sandwich:
            hidden = direct(layer.post_attention_layernorm)(hidden)
            hidden = residual + hidden
            residual = hidden
            hidden = direct(layer.pre_feedforward_layernorm)(hidden)
            hidden = self._mlp(hidden, rows)
            hidden = direct(layer.post_feedforward_layernorm)(hidden)
            return residual + hidden
        hidden = residual + hidden  # (Phi-3's residual dropouts: identity in eval mode)
        residual = hidden
        hidden = direct(layer.post_attention_layernorm)(hidden)
        hidden = self._mlp(hidden, rows)
        return residual + hidden

    def _attention(self, hidden, mask, position_embeddings, cache, rows, kwargs) -> torch.Tensor:
        a, shape = self.attn, self.shape
        input_shape = hidden.shape[:-1]
        hidden_shape = (*input_shape, -1, a.head_dim)
        if shape.fused_qkv:
            qkv = project(a.qkv_proj, hidden, rows)
            q_end, k_end = self.split
            q, k, v = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
            q = q.view(hidden_shape).transpose(1, 2)
            k = k.view(hidden_shape).transpose(1, 2)
        elif shape.qk_norm == "before":
            q = direct(a.q_norm)(project(a.q_proj, hidden, rows).view(hidden_shape)).transpose(1, 2)
            k = direct(a.k_norm)(project(a.k_proj, hidden, rows).view(hidden_shape)).transpose(1, 2)
            v = project(a.v_proj, hidden, rows)
        else:
            q = project(a.q_proj, hidden, rows).view(hidden_shape).transpose(1, 2)
            k = project(a.k_proj, hidden, rows).view(hidden_shape).transpose(1, 2)
            v = project(a.v_proj, hidden, rows)
        v = v.view(hidden_shape).transpose(1, 2)
        if shape.qk_norm == "after":
            q, k = direct(a.q_norm)(q), direct(a.k_norm)(k)
        cos, sin = position_embeddings
        q, k = self.rope(q, k, cos, sin)
        k, v = cache.update(k, v, a.layer_idx, kwargs=kwargs)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
        if attend is chunk_attention_forward and q.shape[2] == 1:  # (it hands one query on)
            attend = ALL_ATTENTION_FUNCTIONS["sdpa"]
        inner = getattr(attend, "inner", attend)  # (precision.upcast_attention's wrapper)
        if q.shape[2] == 1 and inner is sdpa_attention_forward and self.one_query:
            out = one_query_sdpa(a, q, k, v, mask, upcast=attend is not inner)
        else:
            out, _ = attend(
                a, q, k, v, mask, dropout=0.0, scaling=a.scaling, **self.extra, **kwargs
            )
        out = out.reshape(*input_shape, -1).contiguous()
        return project(a.o_proj, out, rows)

    def _mlp(self, hidden: torch.Tensor, rows) -> torch.Tensor:
        m = self.mlp
        if self.shape.fused_gate_up:
            gate, up = project(m.gate_up_proj, hidden, rows).chunk(2, dim=-1)
            return project(m.down_proj, up * m.activation_fn(gate), rows)
        gate = m.act_fn(project(m.gate_proj, hidden, rows))
        return project(m.down_proj, gate * project(m.up_proj, hidden, rows), rows)


def one_query_sdpa(module, query, key, value, mask, *, upcast: bool) -> torch.Tensor:
    """What transformers' "sdpa" attention (`upcast`: as precision.upcast_attention wraps it)
    computes for one query position of a no-grad pass (a decode step; [B, H, 1, D] ->
    [B, 1, H, D]), with the wrapper's and the interface's per-call work left out (~50 us a
    layer, a default-model decode step's 1.5 ms): float32 for a bf16 (fp16) CPU pass where the
    wrapper would, transformers' choice between grouped-query attention in the kernel and query
    heads packed per key head, one kernel call. The same kernel on the same tensors, so the
    same numbers (tests/test_families.py)."""
    dtype = query.dtype
    low = upcast and dtype in (torch.bfloat16, torch.float16) and query.device.type == "cpu"
    if low:
        query, key, value = query.float(), key.float(), value.float()
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
    extra = {}
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        if use_gqa_in_sdpa(mask, key, value):
            extra["enable_gqa"] = True
        else:
            query, mask = pack_gqa(query, groups), pack_gqa(mask, groups)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=0.0, scale=module.scaling, **extra
    )
    out = out.reshape(out.shape[0], -1, 1, value.shape[-1]).transpose(1, 2).contiguous()
    return out.to(dtype) if low else out


def lean_layer(layer: torch.nn.Module, config) -> LeanLayer | None:
    """The layer's lean decode (None: it keeps the module call): a decoder layer of the class
    transformers ships for a family in SHAPES (LayerWalk.layers runs it in eval mode only)."""
    entry = SHAPES.get(getattr(config, "model_type", None))
    if entry is None:
        return None
    shape, name = entry
    cls = type(layer)
    if cls.__name__ != name or not cls.__module__.startswith("transformers.models."):
        return None  # (a model's own code, trust_remote_code: not what this mirrors)
    if any(hasattr(m, "_hf_hook") for m in (layer, layer.self_attn, layer.mlp)):
        return None  # (accelerate's device hooks wrap these modules' forward: keep it)
    return LeanLayer(layer, shape, config)
