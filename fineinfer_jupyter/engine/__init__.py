"""The engine: one base model, LoRA training and inference interleaved. Never imports Jupyter.

Importing the package does not import torch: `Engine` loads it on first use, after
threads.set_wait_policy() has set how OpenMP threads wait (read once, when torch starts).
"""

from .bnbguard import install as guard_bitsandbytes
from .threads import set_wait_policy

set_wait_policy()
guard_bitsandbytes()  # before anything imports peft, which imports bitsandbytes

from .config import (  # noqa: E402
    EngineConfig,
    EngineNotReady,
    LimitReached,
    NameTaken,
    QueueFull,
    SamplingParams,
    Slo,
    TrainParams,
    UnknownName,
)
from .request import Completion, RequestError, RequestStream  # noqa: E402

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineNotReady",
    "LimitReached",
    "NameTaken",
    "QueueFull",
    "RequestError",
    "RequestStream",
    "SamplingParams",
    "Slo",
    "TrainParams",
    "UnknownName",
]


def __getattr__(name: str):
    if name == "Engine":
        from .engine import Engine

        globals()["Engine"] = Engine
        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
