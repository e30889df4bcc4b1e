"""What the loaded model can do here, and why not: the model card of README "Models", for the
model at hand (status()["features"])."""

from __future__ import annotations

from . import export

FEATURES = ("serving", "training", "pausable_micro_steps", "offload", "gguf_export", "vllm_export")


def features(walk, architecture: str) -> dict:
    """{"available": [feature, ...], "lacking": {feature: why, in one line}}."""
    why = {}
    if not walk.supported:
        why["pausable_micro_steps"] = (
            f"a micro-step runs whole (forward, backward): the engine does not walk this model's "
            f"layers ({walk.why_not})"
        )
        why["offload"] = (
            f"offload fetches layers as the walk runs them; this model is not walked ({walk.why_not})"
        )
    if architecture not in export.ARCHS:
        known = ", ".join(export.ARCHS)
        why["gguf_export"] = (
            f"llama.cpp tensor names are known here for {known}; this model is a {architecture}"
        )
        why["vllm_export"] = (
            f"vLLM's LoRA modules are known here for {known}; this model is a {architecture}"
        )
    return {"available": [f for f in FEATURES if f not in why], "lacking": why}
