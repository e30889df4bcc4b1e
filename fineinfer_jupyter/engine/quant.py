"""The frozen base's linear layers in 4-bit NF4 or int8 (bitsandbytes): QLoRA (docs/design.md,
"Base weight formats").

Applied once at load, before any adapter: every nn.Linear of the model except the output head
becomes a bitsandbytes Linear4bit (NF4, double quantization) or Linear8bitLt, computing in the
model's dtype. Embeddings, norms and the head stay in that dtype; PEFT wraps the quantized
layers with its own bitsandbytes LoRA layers, whose weights (and so gradients and optimizer
state) stay in fp32.
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
    b = bnb()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is torch.nn.Linear and m is not head
    ]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(b, lin, kind, device))
    # PEFT reads these to wrap the layers with its bitsandbytes LoRA layers (lora/bnb.py)
    model.is_loaded_in_4bit = kind == "nf4"
    model.is_loaded_in_8bit = kind == "int8"
    model.fineinfer_quantize = kind
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
        # On AVX512-BF16 CPUs bitsandbytes repacks a layer's weight for its bf16 kernel at the
        # first no-grad forward (absmax rounded to bf16), and unpacks it at every state_dict():
        # the base would drift with each adapter save, and a training forward through a packed
        # weight has no backward (gradients would not reach earlier layers). Kept unpacked.
        q.support_avx512bf16_for_cpu = False
    if bias is not None:
        q.bias = torch.nn.Parameter(bias.data, requires_grad=False)
    return q.to(device)  # quantizes


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
