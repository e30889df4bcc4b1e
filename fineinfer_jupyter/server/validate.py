"""The one place that parses request JSON and paths; every failure is a 400 naming the field.

Shapes are checked here; ranges (temperature 0 or in [0.01, 100], ...) are the engine's config
dataclasses' job, whose "field: message" errors the handlers map to 400s as well.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePath

from .errors import ApiError, field_of, shown

MAX_LOGPROBS = 20  # alternatives per token (engine.config.MAX_LOGPROBS)
MAX_DEPTH = 32  # levels of JSON nesting a request body may have
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can carry lone ones; nothing can encode them
PATH_MAX, NAME_MAX = 4095, 255  # bytes in a path, in one of its parts (Linux)
ROLES = ("system", "user", "assistant", "tool")
JOB_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DATA_SUFFIXES = (".jsonl", ".txt", ".json", ".csv", ".parquet")  # engine/sources.py
DATA_KINDS = "a .jsonl, .txt, .json, .csv or .parquet file or a save_to_disk folder"
ADAPTER_FILES = {  # what PEFT and the engine write into an adapter folder
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "fineinfer.json",
    "README.md",
}

KINDS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or _integral(v),
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
    "suffix",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "functions",
)
REFUSED = {  # by route: UNSUPPORTED plus the other route's own fields
    "chat": (*UNSUPPORTED, "echo"),
    "completions": (*UNSUPPORTED, "top_logprobs"),
}
OPENAI_EXTRAS = {"top_k": "integer", "repetition_penalty": "number", "ignore_eos": "boolean"}
OPENAI_FIELDS = (  # what openai_request reads (besides "messages" or "prompt"); others are ignored
    "model",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "ttft",
    "tpot",
    "echo",
    "logprobs",
    "top_logprobs",
    "response_format",
    "best_of",
    *OPENAI_EXTRAS,
    *UNSUPPORTED,
)
MAX_CHOICES = 64  # prompts x n in one request


def bad(field_name: str | None, message: str) -> ApiError:
    return ApiError(400, f"{field_name}: {message}" if field_name else message, field_name)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


class Body:
    """A request's JSON object; `get` checks a field's JSON type."""

    def __init__(self, raw: bytes):
        try:
            data = json.loads(raw or b"{}", parse_constant=_no_constants)
        except RecursionError:
            raise bad("body", f"nests deeper than {MAX_DEPTH} levels") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise bad("body", f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise bad("body", "must be a JSON object")
        _check_tree(data)
        self.data = data

    def get(self, name: str, *kinds: str, required: bool = False, default=None):
        value = self.data.get(name)
        if value is None:
            if required:
                raise bad(name, "is required")
            return default
        if not any(KINDS[k](value) for k in kinds):
            raise bad(name, f"must be {' or '.join(_article(k) for k in kinds)}")
        if "number" in kinds and not _finite(value):
            raise bad(name, "must be a finite number")
        if "integer" in kinds and _integral(value):
            return int(value)  # JSON has one number type: 2.0 is the integer 2
        return value

    def only(self, *names: str) -> None:
        unknown = sorted(set(self.data) - set(names))
        if unknown:
            raise bad(unknown[0][:64], f"unknown field; known: {', '.join(sorted(names))}")


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _integral(value) -> bool:
    return isinstance(value, float) and value.is_integer()


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _check_tree(data: dict) -> None:
    """Every string encodable (no lone surrogates) and no deeper nesting than MAX_DEPTH."""
    stack = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad("body", f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if SURROGATE.search(key):
                    raise bad("body", "a key is not valid Unicode (a lone surrogate)")
                key = key[:64]  # a field name in an error, not the whole key
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and SURROGATE.search(value):
            raise bad(where, "is not valid Unicode (it holds a lone surrogate such as \\ud800)")


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
    prompts: list = field(default_factory=list)  # OpenAI: each prompt's choices (`prompt` first)
    n: int = 1  # OpenAI: choices per prompt
    echo: bool = False  # OpenAI completions: the prompt comes back before the answer


GENERATE_FIELDS = ("prompt", "messages", "adapter", "stop", "ttft", "tpot", *SAMPLING)


def generate_request(raw: bytes) -> GenerateRequest:
    """POST api/generate (docs/api.md GenerateRequest); unknown fields are refused."""
    body = Body(raw)
    body.only(*GENERATE_FIELDS)
    prompt, messages = body.get("prompt", "string"), body.get("messages", "array")
    if (prompt is None) == (messages is None):
        raise bad("prompt", "send either prompt (text) or messages (a chat), not both")
    return GenerateRequest(
        prompt=prompt if prompt is not None else _messages(messages, openai=False),
        adapter=_adapter(body.get("adapter", "string")),
        sampling=_sampling(body, SAMPLING),
        ttft=body.get("ttft", "number"),
        tpot=body.get("tpot", "number"),
    )


def _adapter(name: str | None) -> str | None:
    """None or "base" for the base model, else a name an adapter could have."""
    return name if name in (None, "", "base") else adapter_name(name, "adapter")


def _sampling(body: Body, kinds: dict) -> dict:
    out = {name: body.get(name, kind) for name, kind in kinds.items()}
    stop = body.get("stop", "string", "array")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "must be a string or a list of non-empty strings")
        out["stop"] = stop
    return {k: v for k, v in out.items() if v is not None}


def openai_request(raw: bytes, *, chat: bool) -> GenerateRequest:
    """POST v1/chat/completions or v1/completions. Fields OpenAI clients send by default are
    accepted and ignored; features this server lacks are refused when asked for."""
    body = Body(raw)
    model = body.get("model", "string", required=True)
    if chat:
        prompts = [_messages(body.get("messages", "array", required=True), openai=True)]
    else:
        prompts = _prompts(body.get("prompt", "string", "array", required=True))
    for name in REFUSED["chat" if chat else "completions"]:
        if body.data.get(name) not in (None, False, 0, "", [], {}):
            raise bad(name, "is not supported by this server")
    n = body.get("n", "integer", default=1)
    if not 1 <= n <= MAX_CHOICES:
        raise bad("n", f"must be an integer in [1, {MAX_CHOICES}]")
    if n * len(prompts) > MAX_CHOICES:
        raise bad("n", f"{n} choices for each of {len(prompts)} prompts: at most {MAX_CHOICES}")
    if body.get("best_of", "integer") not in (None, 1):
        raise bad("best_of", "is not supported by this server (use n)")
    fmt = body.get("response_format", "object")
    if fmt is not None and fmt.get("type") != "text":
        raise bad("response_format", 'only {"type": "text"} is supported (no constrained decoding)')
    echo = bool(body.get("echo", "boolean")) and not chat
    sampling = _sampling(body, {"temperature": "number", "top_p": "number", "seed": "integer"})
    sampling.update(_sampling(body, OPENAI_EXTRAS))
    sampling.setdefault("temperature", 1.0)  # OpenAI's default
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        max_tokens = body.get(name, "integer")
        if max_tokens is not None:
            if max_tokens < 1 and not (max_tokens == 0 and echo):
                raise bad(name, "must be an integer >= 1 (0 only with echo: score the prompt)")
            sampling["max_new_tokens"] = max_tokens
    logprobs = _logprobs(body, chat)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    if echo:  # the prompt's logprobs (and its tokens' text) come with it
        sampling["prompt_logprobs"] = logprobs or 0
    options = body.get("stream_options", "object", default={})
    if not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options.include_usage", "must be a boolean")
    return GenerateRequest(
        prompt=prompts[0],
        sampling=sampling,
        ttft=body.get("ttft", "number"),
        tpot=body.get("tpot", "number"),
        stream=body.get("stream", "boolean", default=False),
        include_usage=options.get("include_usage") is True,
        model=model,
        prompts=prompts,
        n=n,
        echo=echo,
    )


def _prompts(prompt: str | list) -> list[str | list[int]]:
    """A completion's prompt: a string, a list of token ids, or a list of either (one choice
    each)."""
    if isinstance(prompt, str) or _token_ids(prompt):
        prompt = [prompt]
    if not prompt:
        raise bad("prompt", "must be a string, a list of token ids, or a non-empty list of them")
    for i, p in enumerate(prompt):
        if not (isinstance(p, str) or _token_ids(p)):
            where = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
            raise bad(where, "must be a string or a non-empty list of token ids (integers >= 0)")
    return prompt


def _token_ids(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _logprobs(body: Body, chat: bool) -> int | None:
    """Alternatives per token (0-20), or None: completions' `logprobs` is the number itself;
    chat's is a boolean, with the number in `top_logprobs`."""
    if not chat:
        value = body.get("logprobs", "integer")
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        return value
    wanted = body.get("logprobs", "boolean")
    top = body.get("top_logprobs", "integer")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise bad("top_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
    if top and not wanted:
        raise bad("top_logprobs", "needs logprobs: true")
    return (top or 0) if wanted else None


def _messages(messages: list, *, openai: bool) -> list[dict]:
    """Chat messages -> the engine's [{role, content}]. OpenAI's also take "developer" (as
    "system"), null content and lists of text parts (joined); other keys are ignored."""
    if not messages:
        raise bad("messages", "must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if openai and role == "developer":
            role = "system"
        if not isinstance(role, str):
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        if role not in ROLES:
            raise bad(f"{where}.role", f"unknown role {shown(role)}; use {', '.join(ROLES)}")
        if openai and content is None:
            content = ""
        if openai and isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise bad(f"{where}.content", "only text parts are supported")
                if not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}].text", "must be a string")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", "must be a string")
        out.append({"role": role, "content": content})
    return out


@dataclass
class JobRequest:
    adapter: str
    data: str | list[dict]  # a path (resolved under the root) or records
    data_field: str  # "data" or "records"
    params: dict
    columns: dict | None = None  # {"prompt": "question", ...}: engine/sources.py


JOB_FIELDS = ("adapter", "data", "records", "params", "columns")


def job_request(raw: bytes, root_dir: str) -> JobRequest:
    """POST api/jobs: {"adapter", "data": path} or {"adapter", "records"}, optional "params"
    and "columns"."""
    body = Body(raw)
    body.only(*JOB_FIELDS)
    adapter = adapter_name(body.get("adapter", "string", required=True), "adapter")
    data, data_field = data_source(body, root_dir, required=True)
    params = body.get("params", "object", default={})
    return JobRequest(adapter, data, data_field, params, columns(body))


def data_source(body: Body, root_dir: str, *, required: bool):
    """(a data file or folder under the root, "data") or (records, "records"); (None, "data")
    when neither is given and none is required."""
    path, records = body.get("data", "string"), body.get("records", "array")
    if path is not None and records is not None or (required and path is None and not records):
        raise bad("data", f"send either data ({DATA_KINDS} under the root) or records")
    if path is None:
        return records, "records" if records is not None else "data"
    file = resolve_path(root_dir, path, "data")
    with os_errors("data", path):
        if file.is_dir():
            saved = ("dataset_info.json", "dataset_dict.json")
            if not any((file / name).is_file() for name in saved):
                raise bad("data", f"{shown(path)} is a folder but not a datasets save_to_disk one")
        elif not file.is_file():
            raise bad("data", f"{shown(path)} is not a file")
        elif file.suffix not in DATA_SUFFIXES:
            raise bad("data", f"{shown(path)}: expected {DATA_KINDS}")
    return str(file), "data"


def columns(body: Body) -> dict | None:
    """ "columns": {"text" | "prompt" | "completion" | "messages": column name}."""
    from ..engine.sources import DataError, check_columns

    value = body.get("columns", "object")
    try:
        return check_columns(value) or None
    except DataError as e:
        raise bad(None, str(e)) from None


EVAL_FIELDS = ("data", "records", "columns", "compare", "limit", "max_new_tokens")


@dataclass
class EvalRequest:
    data: str | list[dict] | None  # None: the adapter's held-out examples
    data_field: str
    columns: dict | None
    compare: list[str]
    limit: int
    max_new_tokens: int | None


def eval_request(raw: bytes, root_dir: str) -> EvalRequest:
    """POST api/adapters/<name>/eval: optional data or records, columns, "compare" (models to
    put beside it, ["base"] by default), "limit" (examples), "max_new_tokens"."""
    body = Body(raw)
    body.only(*EVAL_FIELDS)
    data, data_field = data_source(body, root_dir, required=False)
    compare = body.get("compare", "array", default=["base"])
    if not all(isinstance(c, str) for c in compare) or len(compare) > 8:
        raise bad("compare", 'must be a list of at most 8 names ("base" or adapters)')
    compare = [_adapter(c) or "base" for c in compare]
    limit = body.get("limit", "integer", default=32)
    if not 1 <= limit <= 1024:
        raise bad("limit", "must be an integer in [1, 1024]")
    max_new_tokens = body.get("max_new_tokens", "integer")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise bad("max_new_tokens", "must be an integer >= 1")
    return EvalRequest(data, data_field, columns(body), compare, limit, max_new_tokens)


def train_params(params: dict):
    """TrainParams from a job's "params" (JSON's 5.0 taken as 5 where an integer is due); a
    bad one is reported as params.<name>."""
    from ..engine import TrainParams

    ints = {f.name for f in fields(TrainParams) if "int" in str(f.type) and f.name != "lora_alpha"}
    params = {k: int(v) if k in ints and _integral(v) else v for k, v in params.items()}
    try:
        return TrainParams.from_dict(params)
    except (TypeError, ValueError) as e:
        message = str(e)
        name = field_of(message)
        if name is None or name == "params":
            raise ApiError(400, message if name else f"params: {message}", "params") from None
        raise ApiError(400, f"params.{message}", f"params.{name}") from None


@contextmanager
def params_errors():
    """The engine's errors about a training parameter, as params.<name> (how the request
    names it); any other error as it is."""
    from ..engine import TrainParams

    try:
        yield
    except ApiError as e:
        if e.field in {f.name for f in fields(TrainParams)}:
            raise ApiError(e.status_code, f"params.{e.message}", f"params.{e.field}") from None
        raise


def job_id(value: str) -> str:
    """A job id from a URL: what the engine names jobs ("job-12"), or a 404 quoting it briefly."""
    if not JOB_ID.fullmatch(value):
        raise ApiError(404, f"job: no job {shown(value)}", "job")
    return value


def adapter_name(name: str, field_name: str = "name") -> str:
    from ..engine.config import check_adapter_name

    try:
        return check_adapter_name(name, field_name)
    except ValueError as e:
        raise ApiError(400, str(e), field_name) from None


ADAPTER_LOAD_FIELDS = ("name", "path")
ADAPTER_SAVE_FIELDS = ("path",)
ADAPTER_EXPORT_FIELDS = ("to", "path")


def adapter_load_request(raw: bytes, root_dir: str) -> tuple[str, Path]:
    """POST api/adapters: {"name", "path"} (a PEFT adapter folder under the root)."""
    body = Body(raw)
    body.only(*ADAPTER_LOAD_FIELDS)
    name = adapter_name(body.get("name", "string", required=True))
    value = body.get("path", "string", required=True)
    path = resolve_path(root_dir, value, "path")
    with os_errors("path", value):
        if not (path / "adapter_config.json").is_file():
            raise bad(
                "path", f"{shown(value)} is not a PEFT adapter folder (no adapter_config.json)"
            )
    return name, path


def adapter_save_request(raw: bytes, root_dir: str, data_dir: Path) -> Path:
    """POST api/adapters/<name>/save: {"path"}: a new folder, or an adapter folder to replace.

    Saving writes <path>.tmp and moves an old copy to <path>.old: neither may be someone
    else's; a folder to replace may hold nothing but an adapter's files; and the engine's data
    directory is the engine's own.
    """
    body = Body(raw)
    body.only(*ADAPTER_SAVE_FIELDS)
    value = body.get("path", "string", required=True)
    path = new_folder(root_dir, data_dir, value, "save")
    if len(os.fsencode(path.name)) > NAME_MAX - len(".tmp"):
        raise bad("path", f"is too long (at most {NAME_MAX - 4} bytes for the folder's name)")
    with os_errors("path", value):
        _check_replaceable(path, value)
    return path


def _check_replaceable(path: Path, value: str) -> None:
    if path.exists() and not (path / "adapter_config.json").is_file():
        raise bad(
            "path", f"{shown(value)} exists and is not an adapter folder; it would be replaced"
        )
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in ADAPTER_FILES)
        if others:
            listed = ", ".join(shown(n, 40) for n in others[:3])
            raise bad("path", f"{shown(value)} holds other files ({listed}); they would be deleted")
    for sibling in (path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
        if sibling.exists() or sibling.is_symlink():
            raise bad("path", f"{shown(sibling.name)} exists next to it; saving would delete it")


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(path).absolute()


@contextmanager
def os_errors(field_name: str, value: str):
    """What the OS refuses about a path (too long, a symlink loop, no permission) as a 400."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        reason = getattr(e, "strerror", None) or str(e).split(" from ")[0]
        raise bad(field_name, f"{shown(value)} cannot be used ({reason})") from None


def adapter_export_request(raw: bytes, root_dir: str) -> tuple[str, Path | None]:
    """POST api/adapters/<name>/export: {"to": "gguf" | "vllm", "path"?} (a path under the root:
    a .gguf file or a folder for "gguf", a new folder or an adapter folder for "vllm")."""
    body = Body(raw)
    body.only(*ADAPTER_EXPORT_FIELDS)
    to = body.get("to", "string", required=True)
    if to not in ("gguf", "vllm"):
        raise bad("to", "must be 'gguf' (llama.cpp, Ollama, LM Studio) or 'vllm'")
    value = body.get("path", "string")
    if value is None:
        return to, None
    path = resolve_path(root_dir, value, "path", must_exist=False)
    if to == "gguf" and path.is_file() and path.suffix != ".gguf":
        raise bad("path", f"{shown(value)} exists and is not a .gguf file; it would be replaced")
    if to == "vllm":
        if path == Path(root_dir).resolve():
            raise bad("path", "give a folder below the root directory, not the root itself")
        if path.exists() and not (path / "adapter_config.json").is_file():
            raise bad(
                "path", f"{shown(value)} exists and is not an adapter folder; it would be replaced"
            )
    return to, path


JOB_EXPORT_FIELDS = ("path", "processes")


def job_export_request(raw: bytes, root_dir: str, data_dir: Path) -> tuple[Path | None, int | None]:
    """POST api/jobs/<id>/export: {"path"?: a new folder under the root (or an earlier export),
    outside the engine's data directory; "processes"?: how many the accelerate config runs}."""
    body = Body(raw)
    body.only(*JOB_EXPORT_FIELDS)
    processes = body.get("processes", "integer")
    if processes is not None and not 1 <= processes <= 4096:
        raise bad("processes", "must be an integer in [1, 4096]")
    value = body.get("path", "string")
    if value is None:
        return None, processes
    return new_folder(root_dir, data_dir, value, "export"), processes


def new_folder(root_dir: str, data_dir: Path, value: str, verb: str) -> Path:
    """`path` for a folder that a request writes: below the root (not the root itself) and
    outside the engine's data directory, which is the engine's own."""
    path = resolve_path(root_dir, value, "path", must_exist=False)
    if path == Path(root_dir).resolve():
        raise bad("path", "give a folder below the root directory, not the root itself")
    data = _resolved(data_dir)
    if path == data or data in path.parents:
        raise bad("path", f"{shown(value)} is in the engine's data directory; {verb} elsewhere")
    return path


def resolve_path(root_dir: str, value: str, field_name: str, *, must_exist: bool = True) -> Path:
    """`value` (relative to the root, or absolute inside it) as a real path under the root.

    '..' is refused outright; symlinks are resolved before the check, so a link that points
    outside the root is refused too. Paths the OS cannot take (too long, not encodable, a
    symlink loop) are a 400 as well.
    """
    if not value or "\0" in value:
        raise bad(field_name, "must be a path under the server's root directory")
    try:
        encoded = os.fsencode(value)
    except UnicodeError:
        raise bad(field_name, "is not a valid path (not encodable)") from None
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise bad(field_name, f"is too long (at most {PATH_MAX} bytes, {NAME_MAX} per name)")
    if ".." in PurePath(value).parts:
        raise bad(field_name, "'..' is not allowed; give a path under the server's root directory")
    root = Path(root_dir).resolve()
    with os_errors(field_name, value):
        path = (root / value).resolve()
        if path != root and root not in path.parents:
            raise bad(field_name, f"{shown(value)} is outside the server's root directory")
        exists = path.exists()
    if must_exist and not exists:
        raise bad(field_name, f"{shown(value)}: no such file or folder under the root directory")
    return path


@contextmanager
def field_errors(prefix: str = ""):
    """The engine's config checks ("field: message" ValueErrors) as 400s naming the field."""
    try:
        yield
    except ValueError as e:
        message = f"{prefix}{e}"
        raise ApiError(400, message, field_of(message)) from None
