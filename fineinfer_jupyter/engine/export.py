"""A PEFT LoRA folder for other runtimes: a llama.cpp LoRA .gguf (llama.cpp, Ollama, LM Studio)
or a folder vLLM's LoRA loader accepts. Names, layouts and metadata follow llama.cpp's
convert_lora_to_gguf.py; the vLLM rules follow vllm/lora (PEFTHelper, LoRAModel)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file

from .config import check

FORMATS = ("gguf", "vllm")
# HF architecture -> (llama.cpp architecture, q/k rows permuted as llama.cpp's converter does)
ARCHS = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": (gguf.MODEL_ARCH.QWEN3, False),
    "GemmaForCausalLM": (gguf.MODEL_ARCH.GEMMA, False),
    "Gemma2ForCausalLM": (gguf.MODEL_ARCH.GEMMA2, False),
    "Gemma3ForCausalLM": (gguf.MODEL_ARCH.GEMMA3, False),
    "Phi3ForCausalLM": (gguf.MODEL_ARCH.PHI3, False),  # fused qkv_proj, gate_up_proj as they are
}
VLLM_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VLLM_FUSED = {"Phi3ForCausalLM": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank choices; 16 by default
VLLM_URL = "http://localhost:8000"
PREFIX = "base_model.model."
PAIR = re.compile(r"^(.+)\.lora_([AB])\.weight$")


@dataclass
class Base:
    """What the export needs to know of the base model."""

    config: dict  # its Hugging Face config (config.to_dict())
    architecture: str  # its Hugging Face class: LlamaForCausalLM, ...
    name: str
    folder: str | None = None  # its Hugging Face folder, when there is one
    gguf: str | None = None  # a .gguf of it that llama.cpp loads, when there is one


@dataclass
class Lora:
    """One PEFT LoRA folder, read: its config and one (A [r, in], B [out, r]) pair per module."""

    config: dict
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A, B)

    @property
    def r(self) -> int:
        return int(self.config["r"])

    def scale(self, module: str) -> float:
        """PEFT's scaling of one module: lora_alpha / r (or / sqrt(r) with rsLoRA)."""
        c = self.config
        r = self.pairs[module][0].shape[0]
        alpha = c["lora_alpha"]
        for pattern, value in (c.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / (r**0.5 if c.get("use_rslora") else r)


def read(folder: str | Path) -> Lora:
    """Read a PEFT folder; anything that is not plain LoRA A/B pairs is refused in one line."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"adapter: {folder} has no readable adapter_config.json ({e})") from None
    check(
        config.get("peft_type", "LORA") == "LORA",
        "peft_type",
        f"only LoRA adapters can be exported; this one is {config.get('peft_type')}",
    )
    check(
        not config.get("use_dora"),
        "use_dora",
        "a DoRA adapter has magnitude vectors that a LoRA file (A/B pairs) cannot hold; "
        "train without DoRA to export",
    )
    check(
        not config.get("modules_to_save"),
        "modules_to_save",
        f"the adapter carries full copies of {', '.join(config['modules_to_save'] or [])}, "
        "which a LoRA file cannot hold",
    )
    check(
        config.get("bias", "none") == "none" and not config.get("lora_bias"),
        "bias",
        "the adapter trains biases, which a LoRA file cannot hold",
    )
    check(
        not config.get("layer_replication"),
        "layer_replication",
        "the adapter changes the model's layers, which a LoRA file cannot express",
    )
    weights = folder / "adapter_model.safetensors"
    check(weights.is_file(), "adapter", f"{folder} has no adapter_model.safetensors")
    state = {k.removeprefix(PREFIX): v for k, v in load_file(str(weights)).items()}
    for name in state:
        check(
            "lora_embedding_" not in name,
            "target_modules",
            f"{name.split('.lora_embedding_')[0]} is an embedding; only linear layers are exported",
        )
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name.endswith(".base_layer.weight"):
            continue  # a copy of the base weight, saved by PEFT when lm_head is targeted
        m = PAIR.match(name)
        check(m is not None, "adapter", f"unexpected tensor {name!r} (not a LoRA A/B weight)")
        halves.setdefault(m.group(1), {})[m.group(2)] = tensor
    check(bool(halves), "adapter", f"{weights} holds no LoRA weights")
    pairs = {}
    for module, ab in sorted(halves.items(), key=lambda kv: _natural(kv[0])):
        lacking = sorted({"A", "B"} - set(ab))
        check(not lacking, "adapter", f"{module} has no lora_{''.join(lacking)} weight")
        pairs[module] = (ab["A"], ab["B"])
    return Lora(config, pairs)


# -- llama.cpp --------------------------------------------------------------------------------------


def write_gguf(folder: str | Path, base: Base, out: str | Path, *, name: str) -> dict:
    """Write `folder` as a llama.cpp LoRA adapter .gguf at `out` (atomically).

    Each adapted module W [out, in] becomes `<llama.cpp name>.weight.lora_a` (A, [r, in]) and
    `.lora_b` (B, [out, r]), float32. llama.cpp applies alpha / r; a module whose PEFT scale is
    not the adapter's alpha / r (alpha_pattern, rank_pattern) has the difference folded into B.
    """
    lora = read(folder)
    arch, permute = _arch(base)
    cfg = base.config
    names = gguf.get_tensor_name_map(arch, int(cfg["num_hidden_layers"]))
    alpha = lora.config["lora_alpha"] * (lora.r**0.5 if lora.config.get("use_rslora") else 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, base.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for module, (a, b) in lora.pairs.items():
        target = names.get_name(module)
        check(
            target is not None,
            "target_modules",
            f"llama.cpp has no tensor for {module!r} in a {base.architecture}",
        )
        check(
            not (target == "output" and cfg.get("tie_word_embeddings")),
            "target_modules",
            "lm_head is tied to the embeddings in this model; llama.cpp has no output tensor to adapt",
        )
        a, b = a.float(), b.float()
        factor = lora.scale(module) * a.shape[0] / alpha
        if abs(factor - 1) > 1e-6:
            b = b * factor
        leaf = module.rsplit(".", 1)[-1]
        if permute and leaf in ("q_proj", "k_proj"):
            heads = cfg["num_attention_heads"]
            if leaf == "k_proj":
                heads = cfg.get("num_key_value_heads") or heads
            b = rope_rows(b, heads)
        writer.add_tensor(f"{target}.weight.lora_a", a.contiguous().numpy())
        writer.add_tensor(f"{target}.weight.lora_b", b.contiguous().numpy())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out)
    return {
        "modules": len(lora.pairs),
        "r": lora.r,
        "alpha": float(alpha),
        "arch": gguf.MODEL_ARCH_NAMES[arch],
    }


def rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from Hugging Face's rotate-half order to llama.cpp's
    interleaved one, per head (what llama.cpp's converter does to the base weights)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def modelfile(base_gguf: str, adapter_gguf: Path) -> str:
    return (
        "# Ollama: the base model plus the LoRA adapter (written by fineinfer)\n"
        f"FROM {base_gguf}\nADAPTER {adapter_gguf}\n"
    )


def gguf_commands(name: str, adapter: Path, base: Base, model_file: Path | None) -> list[str]:
    q = shlex.quote
    if base.gguf:
        lines = [f"llama-cli -m {q(base.gguf)} --lora {q(str(adapter))}"]
    elif base.folder:
        lines = [
            "# first a .gguf of the base model, with llama.cpp's converter:",
            f"python convert_hf_to_gguf.py {q(base.folder)} --outfile base.gguf",
            f"llama-cli -m base.gguf --lora {q(str(adapter))}",
        ]
    else:
        lines = [f"llama-cli -m BASE.gguf --lora {q(str(adapter))}  # BASE.gguf: the base model"]
    if model_file is not None:
        tag = ollama_name(name)
        lines += [f"ollama create {tag} -f {q(str(model_file))}", f"ollama run {tag}"]
    return lines


def ollama_name(name: str) -> str:
    return name.lower().replace("_", "-")


# -- vLLM -------------------------------------------------------------------------------------------


def check_vllm(folder: str | Path, base: Base) -> dict:
    """Refuse, in one line, what vLLM's LoRA loader refuses or would apply differently.

    Returns {"r", "max_lora_rank"}: the --max-lora-rank the server needs (vLLM's default is 16).
    """
    lora = read(folder)  # DoRA, modules_to_save, bias, embeddings: refused there too
    check(
        base.architecture in ARCHS,
        "base",
        f"vLLM's LoRA modules are known here for {', '.join(ARCHS)}; this model is a {base.architecture}",
    )
    modules = VLLM_FUSED.get(base.architecture, VLLM_MODULES)
    for module in lora.pairs:
        leaf = module.rsplit(".", 1)[-1]
        check(
            leaf in modules,
            "target_modules",
            f"vLLM applies LoRA to {', '.join(modules)} of a {base.architecture}, not {leaf}",
        )
    ranks = {a.shape[0] for a, _ in lora.pairs.values()}
    check(
        not _patterned(lora) and ranks == {lora.r},
        "rank_pattern",
        "vLLM scales every module by one lora_alpha / r; this adapter sets them per module",
    )
    check(
        lora.r <= VLLM_RANKS[-1],
        "r",
        f"vLLM takes ranks up to {VLLM_RANKS[-1]}; this adapter has r={lora.r}",
    )
    return {"r": lora.r, "max_lora_rank": next(n for n in VLLM_RANKS if n >= max(lora.r, 16))}


def vllm_commands(name: str, folder: Path, base: Base, max_lora_rank: int) -> list[str]:
    q = shlex.quote
    serve = f"vllm serve {q(base.folder or base.name)} --enable-lora --lora-modules {q(f'{name}={folder}')}"
    if max_lora_rank > 16:
        serve += f" --max-lora-rank {max_lora_rank}"
    body = json.dumps({"lora_name": name, "lora_path": str(folder)})
    return [
        serve,
        "# or into a running server (started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True):",
        f"curl -X POST {VLLM_URL}/v1/load_lora_adapter -H 'Content-Type: application/json' -d {q(body)}",
    ]


# -- the whole export ------------------------------------------------------------------------------


def export(folder: Path, to: str, base: Base, out: Path, *, name: str) -> dict:
    """Export the PEFT folder `folder` of adapter `name`.

    gguf: `out` is the .gguf file; an Ollama Modelfile goes beside it when the base has a .gguf.
    vllm: `out` is the folder vLLM loads; `folder` (a scratch copy) is checked and moved there.
    """
    check(to in FORMATS, "to", f"must be one of {', '.join(FORMATS)}, not {to!r}")
    if to == "gguf":
        info = write_gguf(folder, base, out, name=name)
        files, model_file = [str(out)], None
        if base.gguf:
            model_file = out.with_suffix(".Modelfile")
            model_file.write_text(modelfile(base.gguf, out))
            files.append(str(model_file))
        commands = gguf_commands(name, out, base, model_file)
        return {"format": "gguf", "path": str(out), "files": files, "commands": commands, **info}
    info = check_vllm(folder, base)
    check(
        not out.exists()
        or (out.is_dir() and ((out / "adapter_config.json").is_file() or not any(out.iterdir()))),
        "path",
        f"{out} exists and is not an adapter folder; refusing to replace it",
    )
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), out)
    files = sorted(str(p) for p in out.iterdir())
    commands = vllm_commands(name, out, base, info["max_lora_rank"])
    return {"format": "vllm", "path": str(out), "files": files, "commands": commands, **info}


def _arch(base: Base) -> tuple[gguf.MODEL_ARCH, bool]:
    check(
        base.architecture in ARCHS,
        "base",
        f"llama.cpp export knows {', '.join(ARCHS)}; this model is a {base.architecture}",
    )
    return ARCHS[base.architecture]


def _patterned(lora: Lora) -> bool:
    return bool(lora.config.get("alpha_pattern") or lora.config.get("rank_pattern"))


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
