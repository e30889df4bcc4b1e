"""The engine: one base model, LoRA training and inference interleaved. Never imports Jupyter."""

from .config import (
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
from .engine import Engine
from .request import Completion, RequestError, RequestStream

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
