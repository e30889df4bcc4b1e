"""What a saved adapter folder must hold before it is loaded into the shared model.

Every adapter shares each pass with the others (one row each), so only plain LoRA pairs are
served: a DoRA adapter, another PEFT method, whole replaced modules or trained biases would
change the rows of every adapter, the base's too. An adapter trained on another base model has
pairs whose shapes do not fit this one. All of it is checked from the files alone (the config and
the safetensors header), before PEFT touches the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import check

PREFIX = "base_model.model."
PAIRS = {"lora_A.weight": 0, "lora_B.weight": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


def check_lora_folder(path: Path, shapes: dict[str, tuple[int, int]]) -> dict:
    """The folder's adapter config, once it passes (else ValueError "path: <why>").
    `shapes`: (in, out) features of each module of the base model a pair may wrap."""
    where = path.name
    config_file = path / "adapter_config.json"
    check(
        config_file.is_file(),
        "path",
        f"{where!r} is not a PEFT adapter folder (no adapter_config.json)",
    )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"path: {where}/adapter_config.json does not parse ({e})") from None
    check(isinstance(config, dict), "path", f"{where}/adapter_config.json is not a JSON object")
    kind = config.get("peft_type")
    check(kind is not None, "path", f"{where}/adapter_config.json has no peft_type")
    check(
        kind == "LORA",
        "path",
        f"{where}: {kind} adapters are not served, only LoRA ones (every adapter shares its "
        "passes with the others)",
    )
    refused = {
        "use_dora": "a DoRA adapter: its magnitude vectors cannot share a pass with other adapters",
        "modules_to_save": "it replaces whole modules",
        "lora_bias": "its LoRA B layers have biases",
    }
    for key, why in refused.items():
        check(
            not config.get(key), "path", f"{where}: {why} ({key}); only plain LoRA pairs are served"
        )
    bias = config.get("bias", "none")
    check(bias == "none", "path", f"{where}: it trains the base model's biases (bias={bias!r})")
    for key, shape in _weight_shapes(path).items():
        _check_pair(where, key, shape, shapes)
    return config


def _weight_shapes(path: Path) -> dict[str, list[int]]:
    st, pt = path / "adapter_model.safetensors", path / "adapter_model.bin"
    try:
        if st.is_file():
            with safe_open(str(st), framework="pt") as f:
                return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        if pt.is_file():
            state = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
            return {k: list(v.shape) for k, v in state.items()}
    except Exception as e:
        raise ValueError(f"path: {path.name}: the weights do not load ({e})") from None
    raise ValueError(f"path: {path.name} has no adapter_model.safetensors")


def _check_pair(where: str, key: str, shape: list[int], shapes: dict) -> None:
    module, part = _split(key)
    check(
        part is not None,
        "path",
        f"{where}: {key} is not part of a LoRA pair; only LoRA pairs are served",
    )
    size = shapes.get(module)
    check(size is not None, "path", f"{where}: {module} is not a layer of this base model")
    side = PAIRS[part]  # A: [r, in], B: [out, r]
    want = size[side]
    got = shape[1 - side] if len(shape) == 2 else None
    check(
        got == want,
        "path",
        f"{where}: {module}.{part} has shape {shape}, the base model's layer takes {want} "
        "features there (an adapter for another base model?)",
    )


def _split(key: str) -> tuple[str, str | None]:
    name = key.removeprefix(PREFIX)
    for part in PAIRS:
        if name.endswith("." + part):
            return name[: -len(part) - 1], part
    return name, None


def layer_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of the model's linear and embedding layers, by module name (the name
    of a layer PEFT has wrapped, not of the layer inside the wrapper)."""
    shapes = {}
    for name, m in model.named_modules():
        if ".base_layer" in name or ".lora_" in name or "modules_to_save" in name:
            continue
        if isinstance(m, torch.nn.Embedding):
            shapes[name] = (m.num_embeddings, m.embedding_dim)
        elif hasattr(m, "in_features") and hasattr(m, "out_features"):
            shapes[name] = (m.in_features, m.out_features)
        elif hasattr(m, "nx") and hasattr(m, "nf"):  # GPT-2's Conv1D
            shapes[name] = (m.nx, m.nf)
    return shapes
