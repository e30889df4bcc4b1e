"""Engine configuration and per-request parameters: small dataclasses, validated in one place."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

DECODE_WEIGHTS = ("auto", "int8", "int4", "base")  # int8rows.py (which imports torch)
QUANTIZE = ("none", "nf4", "int8")  # quant.py (which imports torch; this module must not)
POLICIES = ("deferred", "fineinfer", "immediate", "exclusive")
OFFLOAD_MODES = ("none", "cpu", "disk")
TRAIN_THREAD = ("auto", "on", "off")
ADAPTER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # fullmatch: no trailing newline
# PEFT keys an adapter's tensors by its name inside module paths (...q_proj.lora_A.<name>.weight),
# and adapters.train() picks them with f".{name}.": a name that is also a module name would
# pick the base model's weights. These are PEFT's words and the usual decoder module names.
MODULE_WORDS = {
    "base_model", "base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
    "lora_magnitude_vector", "lora_dropout", "weight", "bias", "model", "layers", "layer",
    "self_attn", "attn", "attention", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
    "up_proj", "down_proj", "embed_tokens", "lm_head", "norm", "input_layernorm",
    "post_attention_layernorm", "rotary_emb", "act_fn", "transformer", "h", "wte", "wpe", "ln_f",
    "c_attn", "c_proj", "c_fc",
}  # fmt: skip
RESERVED_NAMES = {"base", "train", "eval", "default", "forward", "__base__"} | {
    w.lower() for w in MODULE_WORDS
}
TARGET_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}(\.[A-Za-z0-9_]{1,128}){0,15}")
BASE = "base"
# edges of what torch accepts or computes sensibly
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed
MIN_TEMPERATURE = 0.01  # logits / temperature must stay finite in float16 too
MAX_SECONDS = 1e6  # latency targets (ttft, tpot)
MAX_LOGPROBS = 20  # alternatives per position a request may ask for (OpenAI's limit)
MAX_STEPS = 10**9  # optimizer steps, warm-up, eval and checkpoint intervals
PROMPT_CHARS_PER_TOKEN = 16  # max_prompt_chars when unset: this many per token of context


def check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field_name}: {message}")


def shown(value: str, limit: int = 80) -> str:
    """repr(value), cut short: messages quote what the user sent without echoing megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_adapter_name(name: object, field_name: str = "adapter") -> str:
    check(isinstance(name, str), field_name, "must be a string")
    check(
        bool(ADAPTER_NAME.fullmatch(name)) and "__" not in name,
        field_name,
        f"{shown(name)} is not a valid adapter name (a letter, then up to 63 letters, digits, "
        "'_' or '-'; no '__')",
    )
    check(name.lower() not in RESERVED_NAMES, field_name, f"{name!r} is a reserved name")
    return name


def default_data_dir() -> Path:
    env = os.environ.get("FINEINFER_DATA_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "fineinfer"


@dataclass
class Slo:
    ttft: float = 3.0  # seconds to first token
    tpot: float = 0.5  # seconds per output token, as a pace: token n after the first by n*tpot

    def __post_init__(self):
        for f in ("ttft", "tpot"):
            v = getattr(self, f)
            check(
                is_num(v) and 0 < v <= MAX_SECONDS, f, f"must be > 0 and <= {MAX_SECONDS:g} seconds"
            )


def default_slo(device_type: str) -> Slo:
    """Latency targets for people: the first token within a few seconds, then a reading pace
    (~5 tokens/s on CPU, where a decode step of the default model takes ~0.05-0.1 s; faster
    on a GPU, where everything is ~50-100x faster). Training micro-steps pause between
    layers, so they need not fit between two tokens (docs/design.md)."""
    return Slo(ttft=3.0, tpot=0.2) if device_type == "cpu" else Slo(ttft=1.0, tpot=0.1)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # each sampled token's logprob and this many alternatives
    prompt_logprobs: int | None = None  # the prompt's own (echo); with max_new_tokens 0: score only

    def __post_init__(self):
        check(
            is_int(self.max_new_tokens)
            and (
                self.max_new_tokens >= 1
                or (self.max_new_tokens == 0 and self.prompt_logprobs is not None)
            ),
            "max_new_tokens",
            "must be an integer >= 1 (0 only to score a prompt: with prompt_logprobs)",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(
                value is None or (is_int(value) and 0 <= value <= MAX_LOGPROBS),
                name,
                f"must be null or an integer in [0, {MAX_LOGPROBS}]",
            )
        check(
            is_num(self.temperature)
            and (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 100),
            "temperature",
            f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, 100]",
        )
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0")
        check(
            is_num(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 10,
            "repetition_penalty",
            "must be in [0.01, 10]",
        )
        check(
            self.seed is None or (is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
            "seed",
            "must be null or an integer in [-2**63, 2**64 - 1]",
        )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "must be a list of non-empty strings",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def score_only(self) -> bool:
        """Prefill only: the prompt's logprobs, no token generated."""
        return self.max_new_tokens == 0


@dataclass
class EngineConfig:
    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"  # the frozen base's linear layers: "none", "nf4" or "int8" (quant.py)
    # decodes of a bf16 model on a CPU (one row; a few where int8rows.copy_rows measured them
    # faster): "auto" (int8 copies of its linear weights where a probe at load measures them
    # faster), "int8" (wherever the kernel takes them), "int4" (int4 copies instead: faster, a
    # larger error; never "auto"'s choice), "base"
    decode_weights: str = "auto"
    data_dir: str | Path | None = (
        None  # adapters, checkpoints, jobs; default ~/.local/share/fineinfer
    )
    cache_dir: str | Path | None = None  # converted models; default ~/.cache/fineinfer
    policy: str = "deferred"
    slo: Slo | dict | None = (
        None  # default latency targets; None or missing keys: by device (default_slo)
    )
    max_batch_size: int = 32  # rows decoding at once
    max_queue: int = 256  # waiting requests before new ones are refused
    max_new_tokens_cap: int = 2048
    fineinfer_bound: float = (
        2.0  # seconds: the prototype's fixed deferral bound (policy "fineinfer")
    )
    # limits on what one request may ask (check_prompt, check_stop, check_train)
    max_prompt_chars: int | None = None  # None: PROMPT_CHARS_PER_TOKEN x the model's context
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # characters of one stop string
    max_data_bytes: int = 32 << 20  # a training data file
    max_jobs: int = 16  # jobs queued or running
    max_adapters: int = 64  # adapters loaded or training (snapshots not counted)
    # layer offload (offload.py): where the decoder layers over the budget live
    offload: str = "none"  # "none", "cpu" (host memory) or "disk" (safetensors files)
    memory_budget: int | None = None  # bytes of decoder layers kept resident (None: none)
    heterogeneous: bool = True  # one fetched layer serves inference and training together
    offload_cold: bool = False  # drop offloaded files from the page cache before each read
    threads: int | None = None  # torch's intra-op threads; None: by the usable cores (threads.py)
    # bytes of finished requests' KV kept for prompts that start the same way (prefix.py);
    # None: an eighth of the free memory at start, at most 2 GiB; 0: no prefix cache
    prefix_cache_bytes: int | None = None
    chunked_prefill: bool = True  # False: every prompt in one pass, however long (as before)
    # training on a thread of its own beside the engine thread (worker.py): "auto" (a wide bf16
    # CPU model with >= 2 threads, policy deferred), "on" or "off" (time-sliced in the engine thread)
    train_thread: str = "auto"
    # with it on: micro-steps at once, 2 (a second one on the engine thread while it has nothing
    # to serve and two threads or more: docs/design.md, "The training worker") or 1
    train_streams: int = 2
    # decode passes run each walked decoder layer as lean.py does (its modeling code's tensor
    # operations, the same numbers, without the module calls: docs/design.md, "The lean decode
    # step"); False: the module calls, as prefill and training do
    lean_decode: bool = True

    def __post_init__(self):
        check(self.policy in POLICIES, "policy", f"must be one of {', '.join(POLICIES)}")
        check(
            is_int(self.max_batch_size) and self.max_batch_size >= 1,
            "max_batch_size",
            "must be >= 1",
        )
        check(is_int(self.max_queue) and self.max_queue >= 1, "max_queue", "must be >= 1")
        check(
            self.offload in OFFLOAD_MODES, "offload", f"must be one of {', '.join(OFFLOAD_MODES)}"
        )
        check(
            self.train_thread in TRAIN_THREAD,
            "train_thread",
            f"must be one of {', '.join(TRAIN_THREAD)}",
        )
        check(
            is_int(self.train_streams) and self.train_streams in (1, 2),
            "train_streams",
            "must be 1 or 2",
        )
        check(isinstance(self.lean_decode, bool), "lean_decode", "must be true or false")
        check(self.quantize in QUANTIZE, "quantize", f"must be one of {', '.join(QUANTIZE)}")
        check(
            self.decode_weights in DECODE_WEIGHTS,
            "decode_weights",
            f"must be one of {', '.join(DECODE_WEIGHTS)}",
        )
        check(
            self.quantize == "none" or self.offload == "none",
            "offload",
            f"cannot move {self.quantize} layers yet (their quantization state stays behind); "
            "use offload='none' or quantize='none'",
        )
        check(
            self.threads is None or (is_int(self.threads) and 1 <= self.threads <= 1024),
            "threads",
            "must be an integer in [1, 1024] or None (by the usable cores)",
        )
        check(
            self.memory_budget is None or (is_int(self.memory_budget) and self.memory_budget >= 0),
            "memory_budget",
            "must be a number of bytes >= 0",
        )
        check(
            self.prefix_cache_bytes is None
            or (is_int(self.prefix_cache_bytes) and self.prefix_cache_bytes >= 0),
            "prefix_cache_bytes",
            "must be a number of bytes >= 0 (0: off), or None (from the free memory)",
        )
        for name in LIMITS:
            value = getattr(self, name)
            if not (name == "max_prompt_chars" and value is None):
                check(is_int(value) and value >= 1, name, "must be an integer >= 1")
        if isinstance(self.slo, dict):  # a partial dict: the rest comes from default_slo at load
            self.slo = {k: v for k, v in self.slo.items() if v is not None}
            unknown = set(self.slo) - {"ttft", "tpot"}
            check(not unknown, "slo", f"unknown target(s) {', '.join(sorted(unknown))}")
            Slo(**{"ttft": 1.0, "tpot": 1.0, **self.slo})  # validates the values given
        self.data_dir = Path(self.data_dir) if self.data_dir else default_data_dir()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["slo"] = asdict(self.slo) if isinstance(self.slo, Slo) else self.slo
        d["data_dir"] = str(self.data_dir)
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return d


LIMITS = (
    "max_new_tokens_cap",
    "max_prompt_chars",
    "max_stop_strings",
    "max_stop_chars",
    "max_data_bytes",
    "max_jobs",
    "max_adapters",
)


def prompt_chars(config: EngineConfig, max_context: int) -> int:
    return config.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * max_context


def check_prompt(config: EngineConfig, prompt: str | list[dict], max_context: int) -> None:
    """Refuse a prompt far too long for the model before tokenizing it (a tokenizer takes time
    in proportion, under a lock decode steps need). Text, or chat messages' contents; every
    message takes at least a token, so a chat has at most max_context of them."""
    if isinstance(prompt, str):
        n, where = len(prompt), "prompt"
    else:
        n, where = sum(len(m.get("content") or "") for m in prompt), "messages"
        check(
            len(prompt) <= max_context,
            where,
            f"are {len(prompt)}; at most {max_context} fit in the model's context",
        )
    limit = prompt_chars(config, max_context)
    check(n <= limit, where, f"is {n} characters; at most {limit} are accepted")


def check_stop(config: EngineConfig, stop: list[str]) -> None:
    check(
        len(stop) <= config.max_stop_strings,
        "stop",
        f"at most {config.max_stop_strings} stop strings",
    )
    longest = max(map(len, stop), default=0)
    check(
        longest <= config.max_stop_chars,
        "stop",
        f"a stop string is {longest} characters; at most {config.max_stop_chars}",
    )


def check_train(config: EngineConfig, params: TrainParams, max_context: int) -> None:
    """TrainParams against the model: an example cannot be longer than its context."""
    check(
        params.max_length <= max_context,
        "max_length",
        f"must be <= {max_context} (the model's context)",
    )


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    """A finite number (an int too large for a float is not one)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


@dataclass
class TrainParams:
    r: int = 16
    lora_alpha: int = 32
    target_modules: str | list[str] = "all-linear"
    lora_dropout: float = 0.0  # the model stays in eval mode (docs/design.md): keep 0
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    epochs: float | None = None  # None (and no max_steps): job.planned_steps' rule
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 4  # examples per optimizer step (the effective batch)
    micro_batch_size: int = 1  # examples per forward/backward; the scheduler may run fewer
    max_length: int = 256  # tokens per example (longer ones are truncated)
    max_grad_norm: float = 1.0  # 0 = no clipping
    val_fraction: float = 0.0
    eval_every: int = 0  # optimizer steps between eval-loss passes (0 = about 10 per job)
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    seed: int = 0

    def __post_init__(self):
        check(is_int(self.r) and 1 <= self.r <= 1024, "r", "must be an integer in [1, 1024]")
        check(
            is_num(self.lora_alpha) and 0 < self.lora_alpha <= 65536,
            "lora_alpha",
            "must be in (0, 65536]",
        )
        # PEFT reads any other string as a regular expression over every module name, on the
        # engine thread: a pathological pattern would hang it
        check(
            self.target_modules == "all-linear"
            or (
                isinstance(self.target_modules, list)
                and 1 <= len(self.target_modules) <= 64
                and all(
                    isinstance(m, str) and TARGET_MODULE.fullmatch(m) for m in self.target_modules
                )
            ),
            "target_modules",
            'must be "all-linear" or a list of 1 to 64 module names (such as "q_proj" or '
            '"self_attn.v_proj"; no patterns)',
        )
        check(
            self.lora_dropout == 0,
            "lora_dropout",
            "must be 0 (the shared model stays in eval mode)",
        )
        check(
            is_num(self.learning_rate) and 0 < self.learning_rate <= 1,
            "learning_rate",
            "must be in (0, 1]",
        )
        check(
            is_num(self.weight_decay) and 0 <= self.weight_decay < 1,
            "weight_decay",
            "must be in [0, 1)",
        )
        check(
            is_int(self.warmup_steps) and 0 <= self.warmup_steps <= MAX_STEPS,
            "warmup_steps",
            f"must be an integer in [0, {MAX_STEPS}]",
        )
        check(
            self.epochs is None or (is_num(self.epochs) and 0 < self.epochs <= 1000),
            "epochs",
            "must be null or in (0, 1000]",
        )
        check(
            self.max_steps is None or (is_int(self.max_steps) and 1 <= self.max_steps <= MAX_STEPS),
            "max_steps",
            f"must be null or an integer in [1, {MAX_STEPS}]",
        )
        check(
            is_int(self.batch_size) and 1 <= self.batch_size <= 4096,
            "batch_size",
            "must be an integer in [1, 4096]",
        )
        check(
            is_int(self.micro_batch_size) and 1 <= self.micro_batch_size <= self.batch_size,
            "micro_batch_size",
            "must be an integer in [1, batch_size]",
        )
        check(
            is_int(self.max_length) and 8 <= self.max_length <= 1 << 20,
            "max_length",
            f"must be an integer in [8, {1 << 20}]",
        )
        check(
            is_num(self.max_grad_norm) and self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0"
        )
        check(
            is_num(self.val_fraction) and 0 <= self.val_fraction < 1,
            "val_fraction",
            "must be in [0, 1)",
        )
        check(
            is_int(self.eval_every) and 0 <= self.eval_every <= MAX_STEPS,
            "eval_every",
            f"must be an integer in [0, {MAX_STEPS}]",
        )
        check(
            is_int(self.checkpoint_every) and 1 <= self.checkpoint_every <= MAX_STEPS,
            "checkpoint_every",
            f"must be an integer in [1, {MAX_STEPS}]",
        )
        check(
            is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX,
            "seed",
            "must be an integer in [-2**63, 2**64 - 1]",
        )

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainParams:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        listed = ", ".join(shown(u, 40) for u in unknown[:3]) + (", ..." if unknown[3:] else "")
        check(
            not unknown,
            "params",
            f"unknown parameter(s) {listed}; known: {', '.join(sorted(known))}",
        )
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class UnknownName(ValueError):
    """An adapter or job that does not exist (HTTP 404)."""


class NameTaken(ValueError):
    """An adapter name already in use (HTTP 409)."""


class LimitReached(ValueError):
    """As many jobs or adapters as the engine takes (max_jobs, max_adapters; HTTP 409)."""


class QueueFull(RuntimeError):
    """Too many waiting requests (HTTP 429)."""


class EngineNotReady(RuntimeError):
    """The model is still loading, failed to load, or the engine has stopped (HTTP 503)."""
