"""The frozen base's linear layers in 4-bit NF4 or int8 (bitsandbytes): QLoRA (docs/design.md,
"Base weight formats").

Applied once at load, before any adapter: every nn.Linear of the model except the output head
becomes a bitsandbytes Linear4bit (NF4, double quantization) or Linear8bitLt, computing in the
model's dtype. Embeddings, norms and the head stay in that dtype; PEFT wraps the quantized
layers with its own bitsandbytes LoRA layers, whose weights (and so gradients and optimizer
state) stay in fp32. On CPUs with AVX512-BF16, NF4 layers are packed once for bitsandbytes'
fast kernel (pack_for_cpu): no-grad forwards use it, training forwards dequantize the same
packed copy, and state_dict() never changes it.
"""

from __future__ import annotations

import logging

import torch

from .config import QUANTIZE

INSTALL = "pip install 'fineinfer-jupyter[quant]' (bitsandbytes)"


def bnb():
    """The bitsandbytes module, or a one-line error saying how to install it."""
    try:
        import bitsandbytes  # (no Hub kernels: bnbguard.py)
    except ImportError as e:
        raise ValueError(f"quantize: needs bitsandbytes ({e}); {INSTALL}") from None
    # int8 from fp32 warns on every matmul that it computes in fp16: said once in the docs instead
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes


def check_quantize(kind: str) -> str:
    if kind not in QUANTIZE:
        raise ValueError(f"quantize: {kind!r} is not one of {', '.join(QUANTIZE)}")
    return kind


def quantize_base(model: torch.nn.Module, kind: str, device: torch.device) -> int:
    """Replace the model's linear layers (not its output head) by bitsandbytes ones, in place;
    returns how many. The compute dtype is the model's (the user's dtype, chosen by device)."""
    check_quantize(kind)
    if kind == "none":
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = _quantize_linears(model, kind, device, skip=head)
    # PEFT reads these to wrap the layers with its bitsandbytes LoRA layers (lora/bnb.py)
    model.is_loaded_in_4bit = kind == "nf4"
    model.is_loaded_in_8bit = kind == "int8"
    model.fineinfer_quantize = kind
    return count


def _quantize_linears(root: torch.nn.Module, kind: str, device, skip=None) -> int:
    b = bnb()
    targets = [
        (name, m)
        for name, m in root.named_modules()
        if type(m) is torch.nn.Linear and m is not skip
    ]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, _quantized(b, lin, kind, device))
    return len(targets)


def _quantized(b, lin: torch.nn.Linear, kind: str, device: torch.device) -> torch.nn.Module:
    weight, bias = lin.weight.data, lin.bias
    dtype = weight.dtype
    with torch.device("meta"):  # no full-size weights made only to be replaced
        if kind == "nf4":
            q = b.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=bias is not None,
                compute_dtype=dtype,
                compress_statistics=True,  # double quantization
                quant_type="nf4",
                quant_storage=torch.uint8,
            )

        else:
            q = b.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=bias is not None, has_fp16_weights=False
            )
    if kind == "nf4":
        q.weight = b.nn.Params4bit(
            weight.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
    else:
        q.weight = b.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    if kind == "nf4":
        # bitsandbytes' own repack at a no-grad forward would round the double-quantized absmax
        # again at every state_dict() and leave training forwards without a backward: off, and
        # the layer is packed once, here, by pack_for_cpu instead (after .to(), which quantizes).
        q.support_avx512bf16_for_cpu = False
    if bias is not None:
        q.bias = torch.nn.Parameter(bias.data, requires_grad=False)
    q = q.to(device)  # quantizes
    return pack_for_cpu(q) if kind == "nf4" else q


# -- NF4 on CPUs with AVX512-BF16: one packed copy, a fast kernel for inference, a backward ------


def pack_for_cpu(q: torch.nn.Module) -> torch.nn.Module:
    """Repack an NF4 layer's weight, once, into the layout of bitsandbytes' AVX512-BF16 CPU kernel
    (nibbles reordered in blocks of 32 rows, absmax un-nested and rounded to bf16), if this CPU
    has one and the shape fits; the layer becomes a PackedLinear4bit. The packed copy is the only
    one: it is the base from here on (docs/design.md, "Base weight formats")."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16

    state = q.weight.quant_state
    n, k = state.shape
    if q.weight.device.type != "cpu" or not has_avx512bf16() or n % 32 or k % state.blocksize:
        return q
    q.weight.data, q.weight.quant_state = _convert_weight_packed_for_cpu(q.weight.data, state)
    q.quant_state = q.weight.quant_state
    q.__class__ = _packed_class(type(q))
    return q


def dequantize_packed(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight a packed layer stands for (codes x bf16 absmax, exactly), by
    bitsandbytes' own CPU dequantize kernel on the plain layout."""
    n, k = state.shape
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        plain_layout(packed, n, k), _plain_absmax(state), state.blocksize, state.quant_type,
        (n, k), dtype,
    )  # fmt: skip


def plain_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bitsandbytes' plain [N, K/2] layout (two columns' codes a byte, the first high) of a
    packed weight, whose 32-byte groups hold two columns of 32 rows: rows 0-15 in the low
    nibbles, rows 16-31 in the high ones. Each byte pair becomes one int16, remixed at once."""
    x = packed.view(torch.int16).view(n // 32, k // 2, 16)
    y = ((x & 0x0F) << 4) | ((x >> 8) & 0x0F) | ((x & 0xF0) << 8) | ((x >> 4) & 0x0F00)
    return y.view(torch.uint8).view(n // 32, k // 2, 16, 2).permute(0, 3, 2, 1).reshape(n, k // 2)


def _plain_absmax(state) -> torch.Tensor:
    return state.absmax.T.reshape(-1).float()  # packed: [K / blocksize, N] in bf16


class _PackedMatmul(torch.autograd.Function):
    """x @ W.T with W dequantized from the packed copy, again in the backward (not kept)."""

    @staticmethod
    def forward(ctx, x, packed, state):
        ctx.packed, ctx.state = packed, state
        return torch.nn.functional.linear(x, dequantize_packed(packed, state, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ dequantize_packed(ctx.packed, ctx.state, grad.dtype), None, None


def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
    """No grad (serving, evaluation): bitsandbytes' packed kernel, which computes in bf16 (its
    input rounded to bf16). With grad (training): the plain dequantize-and-matmul path, from the
    same packed copy, in the input's dtype, with a backward."""
    state = self.weight.quant_state
    if torch.is_grad_enabled():
        out = _PackedMatmul.apply(x, self.weight.data, state)
    else:
        out = torch.ops.bitsandbytes.gemv_4bit.default(
            x, self.weight.data, state.shape, state.absmax, state.code, state.blocksize
        )
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out


def _packed_save(self, destination, prefix, keep_vars):
    """state_dict() without touching the layer: the weight in bitsandbytes' plain layout (the same
    codes, absmax not nested, in fp32: lossless), never the lossy unpack that re-nests absmax."""
    from bitsandbytes.functional import QuantState

    state = self.weight.quant_state
    n, k = state.shape
    destination[prefix + "weight"] = plain_layout(self.weight.data, n, k).view(-1, 1)
    if self.bias is not None:
        destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
    plain = QuantState(
        absmax=_plain_absmax(state),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=getattr(state, "original_dtype", state.dtype),
    )
    for key, value in plain.as_dict(packed=True).items():
        destination[prefix + "weight." + key] = value


_PACKED: dict[type, type] = {}


def _packed_class(base: type) -> type:
    if base not in _PACKED:
        _PACKED[base] = type(
            "PackedLinear4bit",
            (base,),
            {"forward": _packed_forward, "_save_to_state_dict": _packed_save},
        )
    return _PACKED[base]


def quantized_kind(model: torch.nn.Module) -> str:
    m = model.get_base_model() if hasattr(model, "peft_config") else model
    return getattr(m, "fineinfer_quantize", "none")


def logical_numel(p: torch.Tensor) -> int:
    """The number of weights a (possibly packed 4-bit) parameter stands for."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def logical_shape(p: torch.Tensor) -> tuple:
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return tuple(shape) if shape is not None else tuple(p.shape)


def weight_bytes(model: torch.nn.Module) -> dict:
    """Bytes of the base model's weights (LoRA adapters not counted): all of them, and those of
    the linear layers that quantization applies to, quantization state included."""
    m = model.get_base_model() if hasattr(model, "peft_config") else model
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    total = linear = 0
    seen: set[int] = set()
    for name, mod in m.named_modules():
        if "lora_" in name or name.endswith("lora_dropout"):
            continue
        own = 0
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            own += t.numel() * t.element_size() + _state_bytes(getattr(t, "quant_state", None))
            own += _int8_state_bytes(t)
        total += own
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            linear += own
    return {"total": total, "linear": linear}


def _state_bytes(state) -> int:
    if state is None:
        return 0
    n = 0
    for attr in ("absmax", "code"):
        t = getattr(state, attr, None)
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    return n + _state_bytes(getattr(state, "state2", None))


def _int8_state_bytes(t: torch.Tensor) -> int:
    scb = getattr(t, "SCB", None)  # int8: one scale per output row
    return scb.numel() * scb.element_size() if isinstance(scb, torch.Tensor) else 0
