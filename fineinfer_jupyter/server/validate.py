"""The one place that parses request JSON and paths; every failure is a 400 naming the field.

Shapes are checked here; ranges (temperature in [0, 100], ...) are the engine's config
dataclasses' job, whose "field: message" errors the handlers map to 400s as well.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from .errors import ApiError, field_of

KINDS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}
SAMPLING = {  # GenerateRequest field -> JSON kind; passed to the engine as they are
    "max_new_tokens": "integer",
    "temperature": "number",
    "top_p": "number",
    "top_k": "integer",
    "repetition_penalty": "number",
    "seed": "integer",
    "ignore_eos": "boolean",
}
# asked-for features this server lacks (a falsy value, as clients send by default, is fine)
UNSUPPORTED = (
    "echo",
    "suffix",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "functions",
    "response_format",
    "best_of",
)
OPENAI_EXTRAS = {"top_k": "integer", "repetition_penalty": "number", "ignore_eos": "boolean"}


def bad(field_name: str | None, message: str) -> ApiError:
    return ApiError(400, f"{field_name}: {message}" if field_name else message, field_name)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


class Body:
    """A request's JSON object; `get` checks a field's JSON type."""

    def __init__(self, raw: bytes):
        try:
            data = json.loads(raw or b"{}", parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad("body", f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise bad("body", "must be a JSON object")
        self.data = data

    def get(self, name: str, *kinds: str, required: bool = False, default=None):
        value = self.data.get(name)
        if value is None:
            if required:
                raise bad(name, "is required")
            return default
        if not any(KINDS[k](value) for k in kinds):
            raise bad(name, f"must be {' or '.join(_article(k) for k in kinds)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(name, "must be a finite number")
        return value

    def only(self, *names: str) -> None:
        unknown = sorted(set(self.data) - set(names))
        if unknown:
            raise bad(unknown[0], f"unknown field; known: {', '.join(sorted(names))}")


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


@dataclass
class GenerateRequest:
    prompt: str | list[dict]  # text, or chat messages
    adapter: str | None = None
    sampling: dict = field(default_factory=dict)  # SamplingParams fields
    ttft: float | None = None
    tpot: float | None = None
    stream: bool = True  # OpenAI routes only
    include_usage: bool = False  # OpenAI stream_options.include_usage
    model: str = ""  # OpenAI routes only


def generate_request(raw: bytes) -> GenerateRequest:
    """POST api/generate (docs/api.md GenerateRequest); unknown fields are refused."""
    body = Body(raw)
    body.only("prompt", "messages", "adapter", "stop", "ttft", "tpot", *SAMPLING)
    prompt, messages = body.get("prompt", "string"), body.get("messages", "array")
    if (prompt is None) == (messages is None):
        raise bad("prompt", "send either prompt (text) or messages (a chat), not both")
    return GenerateRequest(
        prompt=prompt if prompt is not None else messages,
        adapter=body.get("adapter", "string"),
        sampling=_sampling(body, SAMPLING),
        ttft=body.get("ttft", "number"),
        tpot=body.get("tpot", "number"),
    )


def _sampling(body: Body, kinds: dict) -> dict:
    out = {name: body.get(name, kind) for name, kind in kinds.items()}
    stop = body.get("stop", "string", "array")
    if stop is not None:
        out["stop"] = [stop] if isinstance(stop, str) else stop
    return {k: v for k, v in out.items() if v is not None}


def openai_request(raw: bytes, *, chat: bool) -> GenerateRequest:
    """POST v1/chat/completions or v1/completions. Fields OpenAI clients send by default are
    accepted and ignored; features this server lacks are refused when asked for."""
    body = Body(raw)
    model = body.get("model", "string", required=True)
    if chat:
        prompt = _messages(body.get("messages", "array", required=True))
    else:
        prompt = body.get("prompt", "string", "array", required=True)
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise bad("prompt", "must be a string (or a list of one string)")
            prompt = prompt[0]
    for name in UNSUPPORTED:
        if body.data.get(name) not in (None, False, 0, "", [], {}):
            raise bad(name, "is not supported by this server")
    if body.get("n", "integer", default=1) != 1:
        raise bad("n", "only n=1 is supported")
    sampling = _sampling(body, {"temperature": "number", "top_p": "number", "seed": "integer"})
    sampling.update(_sampling(body, OPENAI_EXTRAS))
    sampling.setdefault("temperature", 1.0)  # OpenAI's default
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        max_tokens = body.get(name, "integer")
        if max_tokens is not None:
            if max_tokens < 1:
                raise bad(name, "must be an integer >= 1")
            sampling["max_new_tokens"] = max_tokens
            break
    options = body.get("stream_options", "object", default={})
    return GenerateRequest(
        prompt=prompt,
        sampling=sampling,
        ttft=body.get("ttft", "number"),
        tpot=body.get("tpot", "number"),
        stream=body.get("stream", "boolean", default=False),
        include_usage=options.get("include_usage") is True,
        model=model,
    )


def _messages(messages: list) -> list[dict]:
    """OpenAI chat messages -> the engine's {role, content} (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object with role and content")
        content = m.get("content") or ""
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"{where}.content", "only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        out.append({"role": role, "content": content})
    return out


@dataclass
class JobRequest:
    adapter: str
    data: str | list[dict]  # a path (resolved under the root) or records
    data_field: str  # "data" or "records"
    params: dict


def job_request(raw: bytes, root_dir: str) -> JobRequest:
    """POST api/jobs: {"adapter", "data": path} or {"adapter", "records"}, optional "params"."""
    body = Body(raw)
    body.only("adapter", "data", "records", "params")
    adapter = body.get("adapter", "string", required=True)
    path, records = body.get("data", "string"), body.get("records", "array")
    if (path is None) == (records is None):
        raise bad("data", "send either data (a .jsonl or .txt file under the root) or records")
    if path is not None:
        file = resolve_path(root_dir, path, "data")
        if not file.is_file():
            raise bad("data", f"{path!r} is not a file")
        data, data_field = str(file), "data"
    else:
        data, data_field = records, "records"
    return JobRequest(adapter, data, data_field, body.get("params", "object", default={}))


def train_params(params: dict):
    """TrainParams from a job's "params"; a bad one is reported as params.<name>."""
    from ..engine import TrainParams

    try:
        return TrainParams.from_dict(params)
    except (TypeError, ValueError) as e:
        message = str(e)
        name = field_of(message)
        if name is None or name == "params":
            raise ApiError(400, message if name else f"params: {message}", "params") from None
        raise ApiError(400, f"params.{message}", f"params.{name}") from None


def adapter_name(name: str, field_name: str = "name") -> str:
    from ..engine.config import check_adapter_name

    try:
        return check_adapter_name(name, field_name)
    except ValueError as e:
        raise ApiError(400, str(e), field_name) from None


def adapter_load_request(raw: bytes, root_dir: str) -> tuple[str, Path]:
    """POST api/adapters: {"name", "path"} (a PEFT adapter folder under the root)."""
    body = Body(raw)
    body.only("name", "path")
    name = body.get("name", "string", required=True)
    path = resolve_path(root_dir, body.get("path", "string", required=True), "path")
    if not (path / "adapter_config.json").is_file():
        raise bad(
            "path", f"{body.data['path']!r} is not a PEFT adapter folder (no adapter_config.json)"
        )
    return name, path


def adapter_save_request(raw: bytes, root_dir: str) -> Path:
    """POST api/adapters/<name>/save: {"path"}: a new folder, or an adapter folder to replace."""
    body = Body(raw)
    body.only("path")
    value = body.get("path", "string", required=True)
    path = resolve_path(root_dir, value, "path", must_exist=False)
    if path == Path(root_dir).resolve():
        raise bad("path", "give a folder below the root directory, not the root itself")
    if path.exists() and not (path / "adapter_config.json").is_file():
        raise bad("path", f"{value!r} exists and is not an adapter folder; it would be replaced")
    return path


def adapter_export_request(raw: bytes, root_dir: str) -> tuple[str, Path | None]:
    """POST api/adapters/<name>/export: {"to": "gguf" | "vllm", "path"?} (a path under the root:
    a .gguf file or a folder for "gguf", a new folder or an adapter folder for "vllm")."""
    body = Body(raw)
    body.only("to", "path")
    to = body.get("to", "string", required=True)
    if to not in ("gguf", "vllm"):
        raise bad("to", "must be 'gguf' (llama.cpp, Ollama, LM Studio) or 'vllm'")
    value = body.get("path", "string")
    if value is None:
        return to, None
    path = resolve_path(root_dir, value, "path", must_exist=False)
    if to == "gguf" and path.is_file() and path.suffix != ".gguf":
        raise bad("path", f"{value!r} exists and is not a .gguf file; it would be replaced")
    if to == "vllm":
        if path == Path(root_dir).resolve():
            raise bad("path", "give a folder below the root directory, not the root itself")
        if path.exists() and not (path / "adapter_config.json").is_file():
            raise bad(
                "path", f"{value!r} exists and is not an adapter folder; it would be replaced"
            )
    return to, path


def resolve_path(root_dir: str, value: str, field_name: str, *, must_exist: bool = True) -> Path:
    """`value` (relative to the root, or absolute inside it) as a real path under the root.

    '..' is refused outright; symlinks are resolved before the check, so a link that points
    outside the root is refused too.
    """
    if not value or "\0" in value:
        raise bad(field_name, "must be a path under the server's root directory")
    if ".." in PurePath(value).parts:
        raise bad(field_name, "'..' is not allowed; give a path under the server's root directory")
    root = Path(root_dir).resolve()
    path = (root / value).resolve()
    if path != root and root not in path.parents:
        raise bad(field_name, f"{value!r} is outside the server's root directory")
    if must_exist and not path.exists():
        raise bad(field_name, f"{value!r}: no such file or folder under the root directory")
    return path
