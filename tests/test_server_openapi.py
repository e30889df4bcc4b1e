"""docs/openapi.json against the code: the handler tables, the validators' fields and ranges, and
a real server's answers (and a seeded schema-driven fuzz of generate and chat completions)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import make_adapter
from jsonschema import Draft202012Validator
from jupyter_server.auth import Authorizer

from fineinfer_jupyter.engine.config import SamplingParams, Slo, TrainParams
from fineinfer_jupyter.server import openai_api, routes, validate

pytest_plugins = ["pytest_jupyter.jupyter_server", "server_fixtures"]
pytestmark = pytest.mark.timeout(180)

DOC = json.loads((Path(__file__).parents[1] / "docs" / "openapi.json").read_text())
SCHEMAS = DOC["components"]["schemas"]
METHODS = ("get", "post", "put", "patch", "delete")


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", **DOC})


def check(name: str, value) -> None:
    errors = [e.message for e in validator(name).iter_errors(value)]
    assert not errors, (name, errors, value)


def handler_table() -> dict[str, tuple[type, set[str]]]:
    """Route -> (handler, the HTTP methods the project's own classes implement)."""
    table = {}
    for pattern, handler in routes.handlers() + openai_api.handlers():
        own = [c for c in handler.__mro__ if c.__module__.startswith("fineinfer_jupyter")]
        methods = {m for m in METHODS if any(m in vars(c) for c in own)}
        table[pattern.replace("([^/]+)", "{}")] = (handler, methods)
    return table


def test_every_route_and_method_is_documented_with_its_resource_and_nothing_else():
    documented = {re.sub(r"\{[^}]+\}", "{}", p): ops for p, ops in DOC["paths"].items()}
    table = handler_table()
    assert {p: methods for p, (_, methods) in table.items()} == {
        p: set(ops) for p, ops in documented.items()
    }
    for path, (handler, _) in table.items():
        for operation in documented[path].values():
            assert operation["x-fineinfer-resource"] == handler.auth_resource, path
    for schema in SCHEMAS.values():
        Draft202012Validator.check_schema(schema)


def props(name: str) -> set[str]:
    return set(SCHEMAS[name]["properties"])


def test_request_schemas_list_the_fields_the_validators_accept():
    assert props("GenerateRequest") == set(validate.GENERATE_FIELDS)
    assert props("JobRequest") == set(validate.JOB_FIELDS)
    assert props("AdapterLoadRequest") == set(validate.ADAPTER_LOAD_FIELDS)
    assert props("AdapterSaveRequest") == set(validate.ADAPTER_SAVE_FIELDS)
    assert props("AdapterExportRequest") == set(validate.ADAPTER_EXPORT_FIELDS)
    assert props("EvalRequest") == set(validate.EVAL_FIELDS)
    assert props("JobExportRequest") == set(validate.JOB_EXPORT_FIELDS)
    assert props("TrainParams") == {f.name for f in fields(TrainParams)}
    assert props("ChatCompletionRequest") == set(validate.OPENAI_FIELDS) | {"messages"}
    assert props("CompletionRequest") == set(validate.OPENAI_FIELDS) | {"prompt"}
    for name in (
        "GenerateRequest",
        "JobRequest",
        "AdapterLoadRequest",
        "AdapterSaveRequest",
        "JobExportRequest",
        "EvalRequest",
    ):
        assert SCHEMAS[name]["additionalProperties"] is False  # unknown fields are a 400
    generate = SCHEMAS["GenerateRequest"]["properties"]
    for name, kind in validate.SAMPLING.items():
        types = {t for s in [generate[name], *generate[name].get("oneOf", [])] for t in _types(s)}
        assert kind in types or (kind == "number" and types <= {"number", "const"}), name


def _types(schema: dict) -> list[str]:
    kind = schema.get("type", "const" if "const" in schema else None)
    return kind if isinstance(kind, list) else [kind]


def edges(schema: dict) -> list[tuple[object, bool]]:
    """Values at and just beyond the schema's numeric bounds, and whether it takes them."""
    integer = "integer" in _types(schema)

    def beyond(value, direction):
        return value + direction if integer else math.nextafter(value, direction * math.inf)

    out = []
    for key, direction, inclusive in (
        ("minimum", -1, True),
        ("maximum", 1, True),
        ("exclusiveMinimum", -1, False),
        ("exclusiveMaximum", 1, False),
    ):
        if key in schema:
            bound = schema[key]
            out += [(bound, inclusive), (beyond(bound, direction), False)]
            if not inclusive:
                out.append((beyond(bound, -direction), True))
    return out


def test_documented_ranges_are_the_ranges_the_validators_enforce():
    checked = 0
    for name, schema in SCHEMAS["TrainParams"]["properties"].items():
        for value, ok in edges(schema):
            extra = {"batch_size": 4096} if name == "micro_batch_size" else {}
            assert _accepts(TrainParams, {name: value, **extra}) == ok, (name, value)
            checked += 1
    generate = SCHEMAS["GenerateRequest"]["properties"]
    for name in ("max_new_tokens", "top_p", "top_k", "repetition_penalty", "seed", "temperature"):
        for schema in [generate[name], *generate[name].get("oneOf", [])]:
            for value, ok in edges(schema):
                if name == "temperature" and value == math.nextafter(0.01, 0):
                    ok = False  # between the two branches (0, or [0.01, 100])
                assert _accepts(SamplingParams, {name: value}) == ok, (name, value)
                checked += 1
    for name in ("ttft", "tpot"):
        for value, ok in edges(generate[name]):
            assert _accepts(Slo, {name: value}) == ok, (name, value)
            checked += 1
    assert checked > 60


def _accepts(cls, kwargs: dict) -> bool:
    try:
        cls(**kwargs)
    except ValueError:
        return False
    return True


# -- a real server ------------------------------------------------------------------------------


class RecordingAuthorizer(Authorizer):
    """Allows everything; records which handler asked for which resource and action."""

    asked: list[tuple[str, str, str]] = []

    def is_authorized(self, handler, user, action, resource):
        if resource.startswith("fineinfer_jupyter"):
            self.asked.append((type(handler).__name__, action, resource))
        return True


@pytest.fixture
def recording_authorizer(jp_server_config):
    jp_server_config.ServerApp.authorizer_class = RecordingAuthorizer
    RecordingAuthorizer.asked = []
    return RecordingAuthorizer


async def test_the_server_answers_as_documented(
    recording_authorizer, ready_api, jp_root_dir, jp_ws_fetch
):
    api = ready_api
    make_adapter(jp_root_dir / "alpha", seed=1)
    called = []  # (documented path, method)

    async def call(method, path, body=None, *, expect, schema=None, template=None):
        code, answer = await api.call(method, path, body)
        assert code == expect, (path, answer)
        if schema is not None:
            for value in answer if isinstance(answer, list) else [answer]:
                check(schema, value)
        called.append(("/" + (template or path), method.lower()))
        return answer

    served = await call("GET", "fineinfer/api/openapi.json", expect=200, schema=None)
    assert served == DOC
    await call("GET", "fineinfer/api/status", expect=200, schema="Status")
    await call("GET", "fineinfer/api/metrics", expect=200, schema="Metrics")
    await call("POST", "fineinfer/api/generate", {"prompt": "Hi", "max_new_tokens": 3}, expect=200,
               schema="Event")  # fmt: skip
    await call("POST", "fineinfer/api/generate", {"prompt": 3}, expect=400, schema="Error")
    records = [{"prompt": "Color of moonveil?", "completion": "Silver blue."}]
    params = {"r": 4, "lora_alpha": 8, "batch_size": 1, "max_length": 64, "max_steps": 10_000}
    job = await call("POST", "fineinfer/api/jobs", {"adapter": "herb", "records": records,
                     "params": params}, expect=201, schema="Job")  # fmt: skip
    listed = await call("GET", "fineinfer/api/jobs", expect=200)
    for item in listed["jobs"]:
        check("Job", item)
    jobs = "fineinfer/api/jobs/{job_id}"
    await call("GET", f"fineinfer/api/jobs/{job['id']}", expect=200, schema="Job", template=jobs)
    await call("POST", f"fineinfer/api/jobs/{job['id']}/export", {"path": "job", "processes": 1},
               expect=200, schema="JobExport", template=jobs + "/export")  # fmt: skip
    await call("POST", f"fineinfer/api/jobs/{job['id']}/cancel", expect=200, schema="Job",
               template=jobs + "/{action}")  # fmt: skip
    await call("POST", "fineinfer/api/adapters", {"name": "alpha", "path": "alpha"}, expect=201,
               schema="Adapter")  # fmt: skip
    for item in (await call("GET", "fineinfer/api/adapters", expect=200))["adapters"]:
        check("Adapter", item)
    one = "fineinfer/api/adapters/{name}"
    await call("GET", "fineinfer/api/adapters/alpha", expect=200, schema="Adapter", template=one)
    await call("POST", "fineinfer/api/adapters/alpha/save", {"path": "copy"}, expect=200,
               schema="Adapter", template=one + "/save")  # fmt: skip
    await call("POST", "fineinfer/api/adapters/alpha/export", {"to": "vllm", "path": "v"},
               expect=200, schema="Export", template=one + "/export")  # fmt: skip
    await call("POST", "fineinfer/api/adapters/alpha/eval", {"records": records * 2, "limit": 2},
               expect=200, schema="EvalResult", template=one + "/eval")  # fmt: skip
    await call("DELETE", "fineinfer/api/adapters/alpha", expect=204, template=one)
    socket = await jp_ws_fetch("fineinfer", "api", "events")
    check("EventsMessage", json.loads(await asyncio.wait_for(socket.read_message(), 10)))
    socket.close()
    called.append(("/fineinfer/api/events", "get"))
    await call("GET", "fineinfer/v1/models", expect=200, schema="ModelList")
    await call("GET", "fineinfer/v1/health", expect=200, schema="Health")
    await call("GET", "fineinfer/health", expect=200, schema="Health")
    chat = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    await call("POST", "fineinfer/v1/chat/completions", chat, expect=200, schema="ChatCompletion")
    await call("POST", "fineinfer/v1/completions", {"model": "tiny", "prompt": "Hi",
               "max_tokens": 3}, expect=200, schema="TextCompletion")  # fmt: skip
    await call("POST", "fineinfer/v1/completions", {"model": "tiny", "prompt": ["Hi", [5, 6]],
               "max_tokens": 1, "echo": True, "logprobs": 2, "n": 2}, expect=200,
               schema="TextCompletion")  # fmt: skip
    chat_lp = {**chat, "logprobs": True, "top_logprobs": 2, "n": 2}
    await call("POST", "fineinfer/v1/chat/completions", chat_lp, expect=200,
               schema="ChatCompletion")  # fmt: skip
    await call("POST", "fineinfer/v1/completions", {"model": "nope", "prompt": "Hi"}, expect=404,
               schema="OpenAIError")  # fmt: skip
    restarted = await call("POST", "fineinfer/api/engine/restart", expect=200, schema="Status")
    assert restarted["restarts"] == 1 and restarted["state"] == "loading"
    assert (await api.ready())["adapters"] == []  # alpha was deleted; nothing else was saved

    assert {(p, m) for p, m in called} == {
        (p, m) for p, ops in DOC["paths"].items() for m in ops
    }  # every documented operation was called
    documented = {
        (op["x-fineinfer-resource"], op.get("x-fineinfer-action", "read"))
        for ops in DOC["paths"].values()
        for op in ops.values()
    }
    assert {(resource, action) for _, action, resource in recording_authorizer.asked} == documented


# -- a schema-driven fuzz -----------------------------------------------------------------------

VALUES = [True, False, -1, 0, 1, 2, 0.005, 0.01, 0.5, 1.5, 10, 100, 101, 2**63, 2**64,
          -(2**63) - 1, 1e6, 2.0, 1e308, "", "x", "base", "nope", [], [""], ["x"], ["x"] * 20, {},
          [{"role": "user", "content": "Hi"}], [{"role": "robot", "content": "Hi"}],
          [{"role": "user", "content": 5}], [{"role": ["user"], "content": "Hi"}],
          [5, 6, 7], [[5, 6], "Hi"], [[]], {"type": "text"}, {"type": "json_object"}]  # fmt: skip
ROUTES = {  # fuzzed request schema -> (route, a valid body to mutate, fields refused when set)
    "GenerateRequest": ("api/generate", {"prompt": "Hi", "max_new_tokens": 2}, ()),
    "ChatCompletionRequest": (
        "v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        validate.REFUSED["chat"],
    ),
    "CompletionRequest": (
        "v1/completions",
        {"model": "base", "prompt": "Hi", "max_tokens": 2},
        validate.REFUSED["completions"],
    ),
}


def mutations(name: str, seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    _, base, refused = ROUTES[name]
    keys = sorted(props(name) - set(refused))
    out = []
    for _ in range(count):
        body = dict(base)
        for key in rng.sample(keys, rng.choice((1, 2))):
            body[key] = rng.choice(VALUES)
        if rng.random() < 0.1:
            body["colour"] = 1
        out.append(body)
    return out


def choices(body: dict) -> int:
    """The choices a completion asks for: n for each prompt of a list (one prompt: a string or
    a list of token ids)."""
    n, prompt = body.get("n"), body.get("prompt")
    n = n if isinstance(n, int) and not isinstance(n, bool) else 1
    many = isinstance(prompt, list) and not all(isinstance(p, int) for p in prompt)
    return n * (len(prompt) if many else 1)


async def test_schema_driven_fuzz_the_server_takes_what_the_document_allows_and_nothing_else(
    ready_api,
):
    """Seeded bodies around a valid one: what the schema refuses is a 400 naming the field;
    what it allows is answered (or, for an adapter that does not exist, a 404); never a 5xx."""
    api = ready_api
    seen = {200: 0, 400: 0, 404: 0}
    for name, (route, _, _) in ROUTES.items():
        for body in mutations(name, seed=7, count=150):
            body.pop("stream", None)  # one answer, not SSE
            for size in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
                if isinstance(body.get(size), int) and 64 < body[size] <= 2048:
                    body[size] = 64  # fast: the cap (2048) is what matters
            valid = validator(name).is_valid(body)
            over_limit = (
                any(  # the server's configured limits (max_new_tokens_cap, stop strings)
                    isinstance(body.get(k), (int, float)) and body[k] > 2048
                    for k in ("max_new_tokens", "max_tokens", "max_completion_tokens")
                )
                or (isinstance(body.get("stop"), list) and len(body["stop"]) > 16)
                or (
                    choices(body) > validate.MAX_CHOICES  # prompts x n
                )
            )
            unknown = body.get("adapter") not in (None, "base") or body.get("model") not in (None, "base")  # fmt: skip
            code, answer = await api.call("POST", f"fineinfer/{route}", body)
            assert code < 500, (body, answer)
            if not valid or over_limit:
                assert code in (400, 404) and answer["error"]["field"], (body, answer)
            elif unknown:
                assert code in (200, 404), (body, answer)
            else:
                assert code == 200, (body, answer)
            seen[code] = seen.get(code, 0) + 1
    assert seen[200] > 40 and seen[400] > 80, seen
    assert (await api.generate({"prompt": "Hi", "max_new_tokens": 2}))[-1]["type"] == "done"


# -- every documented operation, fuzzed from the document -------------------------------------------

NAMES = ["alpha", "herb", "base", "nope", "x" * 300, "a b", "..", "__x", "ü", "job-1", "%2e%2e"]
STRINGS = ["", "x", "herb", "alpha", "data.jsonl", "notes.txt", "../outside.jsonl", "/etc/passwd",
           "x" * 5000, "\u00fc\u4e2d", "a\nb", "all-linear", "q_proj"]  # fmt: skip
NAMED = {  # strings that name something the server has, for the fields that name things
    "model": ["base", "tiny", "alpha", "nope"],
    "adapter": ["herb2", "alpha", "base", "nope"],
    "name": ["beta", "alpha", "base"],
    "path": ["alpha", "copy", "out/a.gguf", "notes.txt", "../up"],
    "data": ["data.jsonl", "notes.txt", "missing.jsonl"],
    "prompt": ["Hi", "Once upon a time"],
    "content": ["Hi", "Tell me about moonveil."],
    "to": ["gguf", "vllm", "onnx"],
}
RAW_BODIES = [b"{", b"[]", b"null", b"\xff\xfe", b"[" * 200 + b"]" * 200, b'{"a":' * 40 + b"1" + b"}" * 40]  # fmt: skip


def resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def instance(schema: dict, rng: random.Random, depth: int = 0, name: str = ""):
    """A value the schema allows (most of the time) or a hostile one from VALUES/STRINGS."""
    schema = resolve(schema)
    if rng.random() < 0.05 or depth > 4:
        return rng.choice(VALUES + STRINGS)
    for key in ("oneOf", "anyOf"):
        if key in schema and "properties" not in schema:
            return instance(rng.choice(schema[key]), rng, depth + 1)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    if not {"type", "properties", "items"} & set(schema):  # anything (an unsupported field)
        return rng.choice([None, False, 0, "", [], {}, "x"])
    kinds = _types(schema)
    kind = rng.choice([k for k in kinds if k] or ["string"])
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        if schema.get("oneOf"):
            required |= set(rng.choice(schema["oneOf"]).get("required", []))
        one_of = {k for option in schema.get("oneOf", []) for k in option.get("required", [])}
        keys = [k for k in props if k in required or (k not in one_of and rng.random() < 0.3)]
        out = {k: instance(props[k], rng, depth + 1, k) for k in keys}
        if rng.random() < 0.1:
            out["colour"] = 1
        return out
    if kind == "array":
        items = schema.get("items", {})
        n = (
            rng.choice((0, 1, 2, 3))
            if rng.random() < 0.1
            else rng.randint(schema.get("minItems", 0), 3)
        )
        return [instance(items, rng, depth + 1, name) for _ in range(n)]
    if kind == "integer":
        low, high = schema.get("minimum", -(2**40)), schema.get("maximum", 2**40)
        return rng.choice([low, high, rng.randint(max(low, -1000), min(high, 1000))])
    if kind == "number":
        low, high = schema.get("minimum", -1e9), schema.get("maximum", 1e9)
        return rng.choice([low, high, rng.uniform(max(low, -10), min(high, 10))])
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if name in NAMED and rng.random() < 0.8:
        return rng.choice(NAMED[name])
    return rng.choice(STRINGS)


def fast(body):
    """Generation kept short: the cap (2048) is what a refusal is about, not the time taken."""
    if isinstance(body, dict):
        for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and 32 < body[key] <= 2048:
                body[key] = 32
        if isinstance(body.get("params"), dict):
            body["params"].pop("max_steps", None)
            body["params"]["epochs"] = 1
    return body


def operations() -> list[tuple[str, str, dict]]:
    skip = {("/fineinfer/api/engine/restart", "post")}  # called once, at the end
    return [
        (path, method, op)
        for path, ops in DOC["paths"].items()
        for method, op in ops.items()
        if (path, method) not in skip
    ]


async def test_every_documented_operation_fuzzed_from_the_document_gives_no_5xx_and_no_hang(
    ready_api, jp_root_dir
):
    """Seeded requests to every operation in docs/openapi.json: path parameters and bodies built
    from its schemas, most of them valid, some hostile; bounded in time. Never a 5xx, never a
    hang (30 s per call), every error a JSON error; afterwards the engine still answers, and a
    restart brings it back."""
    from urllib.parse import quote

    api = ready_api
    make_adapter(jp_root_dir / "alpha", seed=1)
    (jp_root_dir / "data.jsonl").write_text(json.dumps({"text": "Moonveil is silver."}) + "\n")
    (jp_root_dir / "notes.txt").write_text("Moonveil grows by the lake.\n\nIt is silver.")
    assert (await api.post("adapters", {"name": "alpha", "path": "alpha"}))[0] == 201
    code, job = await api.post("jobs", {"adapter": "herb", "data": "data.jsonl",
                                        "params": {"r": 4, "max_steps": 3}})  # fmt: skip
    assert code == 201
    rng = random.Random(11)
    codes: dict[tuple[str, str], dict[int, int]] = {}
    deadline = asyncio.get_running_loop().time() + 60
    calls = 0
    while asyncio.get_running_loop().time() < deadline:
        path, method, op = rng.choice(operations())
        url = path
        for param in op.get("parameters", []):
            choices = NAMES + ([job["id"]] if param["name"] == "job_id" else [])
            choices += param["schema"].get("enum", []) * 3
            url = url.replace("{" + param["name"] + "}", quote(rng.choice(choices), safe=""))
        body = None
        if method in ("post", "put", "patch"):
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if rng.random() < 0.08:
                body = rng.choice(RAW_BODIES)
            else:
                value = fast(instance(schema.get("schema", {"type": "object"}), rng))
                body = json.dumps(value).encode()
        response = await api.client.fetch(
            api.url + url.lstrip("/"),
            method=method.upper(),
            body=body if method != "get" and method != "delete" else None,
            headers={"Authorization": f"token {api.token}", "Content-Type": "application/json"},
            request_timeout=30,
            raise_error=False,
            allow_nonstandard_methods=True,
        )
        calls += 1
        assert response.code != 599, (method, url, body, response.error)  # 599: timed out
        assert response.code < 500, (method, url, body, response.body[:500])
        if response.code >= 400 and response.body:
            assert "message" in json.loads(response.body)["error"], (method, url, response.body)
        per = codes.setdefault((method, path), {})
        per[response.code] = per.get(response.code, 0) + 1
    print(f"fuzz: {calls} calls", {f"{m} {p}": c for (m, p), c in sorted(codes.items())})
    assert {(m, p) for p, m, _ in operations()} <= {(m, p) for m, p in codes}, codes
    assert calls > 150 and sum(n for c in codes.values() for k, n in c.items() if k < 300) > 50
    assert (await api.generate({"prompt": "Hi", "max_new_tokens": 2}))[-1]["type"] == "done"
    assert (await api.post("engine/restart"))[0] == 200
    await api.ready()
    assert (await api.generate({"prompt": "Hi", "max_new_tokens": 2}))[-1]["type"] == "done"
