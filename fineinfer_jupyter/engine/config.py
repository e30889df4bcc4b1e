"""Engine configuration and per-request parameters: small dataclasses, validated in one place."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

POLICIES = ("deferred", "fineinfer", "immediate", "exclusive")
ADAPTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
RESERVED_NAMES = {"base", "train", "eval", "default", "forward", "__base__"}
BASE = "base"


def check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field_name}: {message}")


def check_adapter_name(name: object, field_name: str = "adapter") -> str:
    check(isinstance(name, str), field_name, "must be a string")
    check(
        bool(ADAPTER_NAME.match(name)),
        field_name,
        f"{name!r} is not a valid adapter name (a letter, then up to 63 letters, digits, '_' or '-')",
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
                isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f, "must be > 0 seconds"
            )


def default_slo(device_type: str) -> Slo:
    """Latency targets that make sense where the model runs. On this kind of CPU a 128-token
    training micro-step of the default model takes about a second and a decode step ~0.1 s;
    on a GPU everything is ~50-100x faster, and reading speed is the bar."""
    return Slo(ttft=3.0, tpot=0.5) if device_type == "cpu" else Slo(ttft=1.0, tpot=0.1)


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

    def __post_init__(self):
        check(
            is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            "max_new_tokens",
            "must be an integer >= 1",
        )
        check(
            is_num(self.temperature) and 0 <= self.temperature <= 100,
            "temperature",
            "must be in [0, 100]",
        )
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0")
        check(
            is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
            "repetition_penalty",
            "must be in (0, 10]",
        )
        check(self.seed is None or is_int(self.seed), "seed", "must be an integer or null")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "must be a list of non-empty strings",
        )
        check(len(self.stop) <= 16, "stop", "at most 16 stop strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class EngineConfig:
    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"
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
    threads: int | None = None  # torch's intra-op threads; None: by the usable cores (threads.py)

    def __post_init__(self):
        check(self.policy in POLICIES, "policy", f"must be one of {', '.join(POLICIES)}")
        check(
            is_int(self.max_batch_size) and self.max_batch_size >= 1,
            "max_batch_size",
            "must be >= 1",
        )
        check(is_int(self.max_queue) and self.max_queue >= 1, "max_queue", "must be >= 1")
        check(
            self.threads is None or (is_int(self.threads) and 1 <= self.threads <= 1024),
            "threads",
            "must be an integer in [1, 1024] or None (by the usable cores)",
        )
        check(
            is_int(self.max_new_tokens_cap) and self.max_new_tokens_cap >= 1,
            "max_new_tokens_cap",
            "must be >= 1",
        )
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


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainParams:
    r: int = 16
    lora_alpha: int = 32
    target_modules: str | list[str] = "all-linear"
    lora_dropout: float = 0.0  # the model stays in eval mode (docs/design.md): keep 0
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 4  # examples per optimizer step (the effective batch)
    micro_batch_size: int = 1  # examples per forward/backward; the scheduler may run fewer
    max_length: int = 256  # tokens per example (longer ones are truncated)
    max_grad_norm: float = 1.0  # 0 = no clipping
    val_fraction: float = 0.0
    eval_every: int = 0  # optimizer steps between eval-loss passes (0 = at the end only)
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    seed: int = 0

    def __post_init__(self):
        check(is_int(self.r) and 1 <= self.r <= 1024, "r", "must be an integer in [1, 1024]")
        check(is_num(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "must be > 0")
        check(
            isinstance(self.target_modules, str)
            or (
                isinstance(self.target_modules, list)
                and self.target_modules
                and all(isinstance(m, str) for m in self.target_modules)
            ),
            "target_modules",
            'must be "all-linear" or a list of module names',
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
            is_int(self.warmup_steps) and self.warmup_steps >= 0,
            "warmup_steps",
            "must be an integer >= 0",
        )
        check(is_num(self.epochs) and 0 < self.epochs <= 1000, "epochs", "must be in (0, 1000]")
        check(
            self.max_steps is None or (is_int(self.max_steps) and self.max_steps >= 1),
            "max_steps",
            "must be an integer >= 1",
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
            "must be an integer >= 8",
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
            is_int(self.eval_every) and self.eval_every >= 0,
            "eval_every",
            "must be an integer >= 0",
        )
        check(
            is_int(self.checkpoint_every) and self.checkpoint_every >= 1,
            "checkpoint_every",
            "must be an integer >= 1",
        )
        check(is_int(self.seed), "seed", "must be an integer")

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainParams:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        check(
            not unknown,
            "params",
            f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
        )
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class UnknownName(ValueError):
    """An adapter or job that does not exist (HTTP 404)."""


class NameTaken(ValueError):
    """An adapter name already in use (HTTP 409)."""


class QueueFull(RuntimeError):
    """Too many waiting requests (HTTP 429)."""


class EngineNotReady(RuntimeError):
    """The model is still loading, failed to load, or the engine has stopped (HTTP 503)."""
