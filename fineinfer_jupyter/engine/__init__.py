"""The engine: one base model, LoRA training and inference interleaved. Never imports Jupyter."""

from .config import (
    EngineConfig,
    EngineNotReady,
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
    "NameTaken",
    "QueueFull",
    "RequestError",
    "RequestStream",
    "SamplingParams",
    "Slo",
    "TrainParams",
    "UnknownName",
]
