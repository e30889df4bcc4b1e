"""The Jupyter server extension: configuration (traitlets) and the engine's lifecycle."""

from __future__ import annotations

import math
import os

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Enum, Float, Int, TraitError, Unicode, validate

from . import openai_api, routes
from .host import EngineHost

# engine.config.POLICIES, repeated: importing the engine here would load torch while the server
# starts (a test checks that the two agree)
POLICIES = ("deferred", "fineinfer", "immediate", "exclusive")
QUANTIZE = ("none", "nf4", "int8")  # engine.config.QUANTIZE, likewise
DECODE_WEIGHTS = ("auto", "int8", "int4", "base")  # engine.config.DECODE_WEIGHTS, likewise


class FineInferApp(ExtensionApp):
    """Hosts one fineinfer engine: REST and OpenAI-compatible APIs under <base_url>/fineinfer/."""

    name = "fineinfer_jupyter"
    description = "Fine-tune LoRA adapters and serve the same model at once."
    load_other_extensions = True

    model = Unicode(
        "default",
        help="""The base model: "default" (SmolLM2-135M-Instruct), "tiny" (a random model for
        tests), a local Hugging Face model folder or a .gguf file.""",
    ).tag(config=True)
    device = Unicode("auto", help='Where the model runs: "auto", "cpu", "cuda", "cuda:1", ...').tag(
        config=True
    )
    dtype = Unicode(
        "auto",
        help="""Model weights' dtype: "float32", "bfloat16", ... or "auto": bfloat16 on a GPU;
        on a CPU bfloat16 where it has bf16 matrix units (AMX, AVX512-BF16) and a probe at load
        measures it faster, else float32 (status says which and why).""",
    ).tag(config=True)
    quantize = Enum(
        QUANTIZE,
        default_value="none",
        help="""The frozen base's linear layers in 4-bit NF4 or int8 (bitsandbytes, QLoRA):
        about 1/7 (NF4) or 1/4 (int8) of their float32 bytes; embeddings, norms and the head
        stay in `dtype`, LoRA adapters and their optimizer in float32. Needs
        `pip install 'fineinfer-jupyter[quant]'`; not with `offload`.""",
    ).tag(config=True)
    decode_weights = Enum(
        DECODE_WEIGHTS,
        default_value="auto",
        help="""Decodes of a bfloat16 model on a CPU (of one row, and of a few rows where a
        measurement at load finds the copies faster for them): "auto" multiplies
        by int8 copies of its linear weights (per-row scales; torch's int8 weight-only kernel)
        where a probe at load measures them faster, "int8" wherever the kernel takes them,
        "int4" by int4 copies instead (a scale and zero point per 32 weights: faster where the
        weights stream from memory, a larger error; never chosen by "auto"), "base" by the
        bf16 weights. The int8 copies cost half the layers' bf16 bytes again, int4 a quarter;
        prefill, evaluation and training keep bf16 (status says which and why).""",
    ).tag(config=True)
    data_dir = Unicode(
        None,
        allow_none=True,
        help="""Where adapters, checkpoints and jobs live, in one folder per base model
        (<name>-<hash>). Default: $FINEINFER_DATA_DIR or ~/.local/share/fineinfer (the
        engine's default).""",
    ).tag(config=True)
    cache_dir = Unicode(
        None,
        allow_none=True,
        help="Where converted models are cached. Default: ~/.cache/fineinfer.",
    ).tag(config=True)
    policy = Enum(
        POLICIES,
        default_value="deferred",
        help="""How training and inference share the model: "deferred" (train while every
        request's latency targets allow), "immediate" (inference first), "fineinfer" (a fixed
        deferral bound) or "exclusive" (inference waits for training).""",
    ).tag(config=True)
    ttft = Float(
        None,
        allow_none=True,
        help="""Default time-to-first-token target, in seconds (a request may set its own).
        Default: by device, 3 s on CPU, 1 s on GPU.""",
    ).tag(config=True)
    tpot = Float(
        None,
        allow_none=True,
        help="""Default time-per-output-token target, in seconds (a request may set its own):
        a pace, the n-th token after the first is due n * tpot after it. Default: by device,
        0.2 s on CPU (a reading pace, ~5 tokens/s), 0.1 s on GPU.""",
    ).tag(config=True)
    max_queue = Int(
        256, help="Requests that may wait for the model; more are refused with HTTP 429."
    ).tag(config=True)
    max_new_tokens_cap = Int(
        2048, help="The largest max_new_tokens (max_tokens) a request may ask for."
    ).tag(config=True)
    max_batch_size = Int(32, help="Requests decoding together at most.").tag(config=True)
    max_request_bytes = Int(
        16 << 20,
        help="""The largest request body /fineinfer/ routes read, in bytes (inline training
        records included); larger ones are refused with HTTP 413.""",
    ).tag(config=True)
    max_prompt_chars = Int(
        None,
        allow_none=True,
        help="""The longest prompt, in characters (for a chat, all contents together), checked
        before tokenizing it; longer ones are refused with HTTP 400. Default: 16 per token of
        the model's context.""",
    ).tag(config=True)
    max_stop_strings = Int(16, help="Stop strings one request may give.").tag(config=True)
    max_stop_chars = Int(256, help="Characters in one stop string.").tag(config=True)
    max_data_bytes = Int(
        32 << 20,
        help="The largest training data file a job may read, in bytes (checked before reading).",
    ).tag(config=True)
    max_jobs = Int(
        16, help="Training jobs that may be queued or running; more are refused with HTTP 409."
    ).tag(config=True)
    max_adapters = Int(
        64,
        help="""Adapters that may be loaded or training at once; loading or training one more is
        refused with HTTP 409 (delete one first).""",
    ).tag(config=True)
    offload = Enum(
        ("none", "cpu", "disk"),
        default_value="none",
        help="""Layer offload, for a model larger than the memory the engine may use: the
        decoder layers over `memory_budget` live in host memory ("cpu") or in safetensors files
        under the cache directory ("disk") and are fetched layer by layer as they run; LoRA
        weights and the optimizer never move.""",
    ).tag(config=True)
    memory_budget = Int(
        None,
        allow_none=True,
        help="""Bytes of decoder layers kept on the device when `offload` is on (the first
        layers that fit; the rest stream). Default: none (every layer streams).""",
    ).tag(config=True)
    heterogeneous = Bool(
        True,
        help="""With offload: a layer fetched for an inference pass also runs the training
        micro-step's forward through it, so it is fetched once for both.""",
    ).tag(config=True)
    threads = Int(
        None,
        allow_none=True,
        help="""torch's intra-op threads for the engine. Default: the physical cores this
        process may use. OpenMP threads spin only briefly before they sleep (GOMP_SPINCOUNT=1000
        unless you set a policy), so other programs slow the engine only in proportion to the
        cores they take.""",
    ).tag(config=True)
    train_thread = Enum(
        ["auto", "on", "off"],
        default_value="auto",
        help="""Training on a thread of its own beside the engine thread (one core each on a
        small CPU; deferred policy). auto: on for a bf16 CPU model at least 256 wide with >= 2
        threads and no offload; off: training takes turns with inference in one thread.""",
    ).tag(config=True)
    train_streams = Int(
        2,
        help="""With the training thread on: micro-steps trained at once. 2: while nothing is
        being served (and the engine has two threads or more), the engine thread trains a
        second micro-step of the same batch beside the worker's, one core each; 1: the worker
        alone, on every thread then.""",
    ).tag(config=True)
    lean_decode = Bool(
        True,
        help="""Decode steps run each decoder layer of a walked family (Llama, Mistral, Qwen,
        Gemma, Phi-3) as its modeling code does, without the module calls (the same numbers,
        faster on a CPU); False: through the modules, as prefill and training do.""",
    ).tag(config=True)
    prefix_cache_bytes = Int(
        None,
        allow_none=True,
        help="""Bytes of finished requests' KV cache kept on the device so that a prompt that
        starts the same way (a chat resending its history) prefills only the rest; least
        recently used out first. Default: an eighth of the free memory at start, at most 2 GiB.
        0: no prefix cache.""",
    ).tag(config=True)
    chunked_prefill = Bool(
        True,
        help="""Prefill a long prompt in chunks between the running answers' tokens, so that
        they keep their pace. False: every prompt in one pass.""",
    ).tag(config=True)
    load_at_start = Bool(
        True,
        help="""Load the model in the background when the server starts. When False, it loads
        on the first authenticated request to any /fineinfer/ route (status included); until
        it is ready, routes that need the model answer 503.""",
    ).tag(config=True)

    @validate("memory_budget", "prefix_cache_bytes")
    def _bytes(self, proposal):
        value = proposal["value"]
        if value is not None and value < 0:
            name = proposal["trait"].name
            raise TraitError(f"{name} must be >= 0 bytes, not {value}")
        return value

    @validate("ttft", "tpot")
    def _positive_seconds(self, proposal):
        value = proposal["value"]
        if value is not None and not (math.isfinite(value) and value > 0):
            raise TraitError(f"{proposal['trait'].name} must be > 0 seconds, not {value}")
        return value

    @validate(
        "max_queue",
        "max_new_tokens_cap",
        "max_batch_size",
        "max_request_bytes",
        "max_prompt_chars",
        "max_stop_strings",
        "max_stop_chars",
        "max_data_bytes",
        "max_jobs",
        "max_adapters",
        "threads",
    )
    def _at_least_one(self, proposal):
        if proposal["value"] is not None and proposal["value"] < 1:
            raise TraitError(f"{proposal['trait'].name} must be >= 1")
        return proposal["value"]

    def engine_config(self) -> dict:
        """EngineConfig's fields, from the traits."""
        names = ("model", "device", "dtype", "quantize", "data_dir", "cache_dir", "policy")
        names += ("decode_weights",)
        names += ("offload", "memory_budget", "heterogeneous")
        names += ("prefix_cache_bytes", "chunked_prefill", "train_thread", "train_streams")
        names += ("lean_decode",)
        limits = (
            "max_queue",
            "max_new_tokens_cap",
            "max_batch_size",
            "max_prompt_chars",
            "max_stop_strings",
            "max_stop_chars",
            "max_data_bytes",
            "max_jobs",
            "max_adapters",
            "threads",
        )
        return {
            **{n: getattr(self, n) for n in names + limits},
            "slo": {"ttft": self.ttft, "tpot": self.tpot},
        }

    def initialize_settings(self):
        self.host = EngineHost(self.engine_config(), root_dir=self.serverapp.root_dir, log=self.log)

    def initialize_handlers(self):
        self.handlers.extend(routes.handlers() + openai_api.handlers())

    async def _start_jupyter_server_extension(self, serverapp):
        # the port is bound by now; kernels started from here on inherit these
        os.environ["FINEINFER_SERVER_URL"] = server_url(serverapp)
        os.environ["FINEINFER_TOKEN"] = serverapp.identity_provider.token or ""
        if self.load_at_start:
            self.host.start()

    async def stop_extension(self):
        await self.host.close()


def server_url(serverapp) -> str:
    """The URL a process on this machine reaches the server at, base_url included."""
    if serverapp.sock:
        return serverapp.connection_url
    ip = serverapp.ip
    if ip in ("", "0.0.0.0", "localhost", "127.0.0.1"):
        host = "127.0.0.1"
    elif ip in ("::", "::1"):
        host = "[::1]"
    else:
        host = f"[{ip}]" if ":" in ip else ip
    scheme = "https" if serverapp.certfile else "http"
    return f"{scheme}://{host}:{serverapp.port}{serverapp.base_url}"
