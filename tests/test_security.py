"""Hostile input and limits at the edge: every refusal is a 4xx with a JSON body naming the field,
nothing answers 5xx, and the engine keeps answering. Real jupyter_server, tiny model."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from types import SimpleNamespace

import pytest
from conftest import make_adapter

from fineinfer_jupyter.engine.config import (
    SamplingParams,
    Slo,
    TrainParams,
    check_adapter_name,
)
from fineinfer_jupyter.server import validate
from fineinfer_jupyter.server.errors import ApiError
from fineinfer_jupyter.server.host import EngineHost

pytest_plugins = ["pytest_jupyter.jupyter_server", "server_fixtures"]
pytestmark = pytest.mark.timeout(180)

BAD = "invalid_request_error"
RECORDS = [{"prompt": "Color of moonveil?", "completion": "Silver blue."}]
CHAT = [{"role": "user", "content": "Hi"}]
FAST = {"r": 4, "lora_alpha": 8, "batch_size": 1, "max_length": 64}


def error(kind, message, field=None, *, openai=False):
    body = {"message": message, "type": kind, "field": field}
    if openai:
        body.update(param=field, code=kind)
    return {"error": body}


def invalid(field, message, **kwargs):
    return error(BAD, f"{field}: {message}", field, **kwargs)


NAME_RULE = (
    "is not a valid adapter name (a letter, then up to 63 letters, digits, '_' or '-'; no '__')"
)
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
NESTED_33 = {"prompt": "a", "adapter": None}
for _ in range(33):
    NESTED_33 = {"x": NESTED_33}


def hostile_cases(root: str) -> list[tuple[str, str, object, int, dict]]:
    """(method, route, body, status, JSON answer): each reached a 500 (or ran) before R1."""
    g, chat, comp = (
        "fineinfer/api/generate",
        "fineinfer/v1/chat/completions",
        "fineinfer/v1/completions",
    )
    jobs, adapters = "fineinfer/api/jobs", "fineinfer/api/adapters"
    long_path = "a" * 5000
    deep_json = invalid("body", "nests deeper than 32 levels")
    surrogate = "is not valid Unicode (it holds a lone surrogate such as \\ud800)"
    too_long = "is too long (at most 4095 bytes, 255 per name)"
    temp = "must be 0 (greedy) or in [0.01, 100]"
    seed = "must be null or an integer in [-2**63, 2**64 - 1]"
    role = "must be one of system, user, assistant, tool"
    return [
        # JSON nested beyond the parser's recursion limit, and beyond 32 levels
        ("POST", g, DEEP, 400, deep_json),
        ("POST", chat, b'{"model": "base", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400,
         invalid("body", "nests deeper than 32 levels", openai=True)),
        ("POST", g, NESTED_33, 400, deep_json),
        # wrong types inside messages, both routes
        ("POST", g, {"messages": [{"role": ["user"], "content": "hi"}]}, 400,
         invalid("messages[0].role", role)),
        ("POST", g, {"messages": [{"role": "user", "content": 5}]}, 400,
         invalid("messages[0].content", "must be a string")),
        ("POST", chat, {"model": "base", "messages": [{"role": ["user"], "content": "hi"}]}, 400,
         invalid("messages[0].role", role, openai=True)),
        ("POST", chat, {"model": "base", "messages": [{"role": {"a": 1}, "content": "hi"}]}, 400,
         invalid("messages[0].role", role, openai=True)),
        ("POST", chat, {"model": "base", "messages": [{"role": "user", "content": 5}]}, 400,
         invalid("messages[0].content", "must be a string", openai=True)),
        ("POST", chat, {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": {}}]}]},
         400, invalid("messages[0].content[0].text", "must be a string", openai=True)),
        ("POST", chat, {"model": "base", "messages": CHAT, "stream_options": {"include_usage": [1]}}, 400,
         invalid("stream_options.include_usage", "must be a boolean", openai=True)),
        ("POST", chat, {"model": "base", "messages": CHAT, "stop": [1]}, 400,
         invalid("stop", "must be a string or a list of non-empty strings", openai=True)),
        # numbers at the edges of what torch takes
        ("POST", g, {"prompt": "a", "seed": 2**70}, 400, invalid("seed", seed)),
        ("POST", comp, {"model": "base", "prompt": "a", "seed": 2**70}, 400,
         invalid("seed", seed, openai=True)),
        ("POST", g, {"prompt": "a", "seed": -(2**63) - 1}, 400, invalid("seed", seed)),
        ("POST", g, {"prompt": "a", "temperature": 1e-300}, 400, invalid("temperature", temp)),
        ("POST", g, {"prompt": "a", "temperature": 5e-324}, 400, invalid("temperature", temp)),
        ("POST", g, {"prompt": "a", "repetition_penalty": 1e-300}, 400,
         invalid("repetition_penalty", "must be in [0.01, 10]")),
        ("POST", g, {"prompt": "a", "max_new_tokens": 2**63 - 1}, 400,
         invalid("max_new_tokens", "must be <= 2048")),
        ("POST", g, {"prompt": "a", "ttft": 1e308}, 400, invalid("ttft", "must be > 0 and <= 1e+06 seconds")),
        ("POST", g, {"prompt": "a", "tpot": 2**1000}, 400, invalid("tpot", "must be > 0 and <= 1e+06 seconds")),
        ("POST", g, {"prompt": "a", "ttft": 10**400}, 400, invalid("ttft", "must be a finite number")),
        ("POST", g, b'{"prompt": "a", "tpot": 1e999}', 400, invalid("tpot", "must be a finite number")),
        # strings nothing can encode, names with a final newline
        ("POST", g, b'{"prompt": "a\\ud800"}', 400, invalid("prompt", surrogate)),
        ("POST", g, b'{"prompt": "a", "stop": ["\\udc80"]}', 400, invalid("stop[0]", surrogate)),
        ("POST", jobs, {"adapter": "herb\n", "records": RECORDS}, 400,
         invalid("adapter", f"'herb\\n' {NAME_RULE}")),
        ("POST", adapters, {"name": "herb\n", "path": "alpha"}, 400,
         invalid("name", f"'herb\\n' {NAME_RULE}")),
        ("GET", "fineinfer/api/adapters/herb\n", None, 400, invalid("adapter", f"'herb\\n' {NAME_RULE}")),
        ("POST", jobs, {"adapter": "model", "records": RECORDS}, 400,
         invalid("adapter", "'model' is a reserved name")),
        ("POST", jobs, {"adapter": "herb__at3", "records": RECORDS}, 400,
         invalid("adapter", f"'herb__at3' {NAME_RULE}")),
        # what is echoed is cut short; a chat of more messages than the context has tokens
        ("POST", chat, {"model": "m" * 100_000, "messages": CHAT}, 404,
         error("not_found", f"model: no model named '{'m' * 75}...' (known: base, tiny)", "model",
               openai=True)),
        ("POST", g, {"prompt": "a", "k" * 100_000: 1}, 400,
         invalid("k" * 64, f"unknown field; known: {', '.join(sorted(validate.GENERATE_FIELDS))}")),
        ("GET", "fineinfer/api/jobs/" + "j" * 5000, None, 404,
         error("not_found", f"job: no job '{'j' * 75}...'", "job")),
        ("POST", g, {"prompt": "a", "adapter": "a" * 5000}, 400,
         invalid("adapter", f"'{'a' * 75}...' {NAME_RULE}")),
        ("POST", jobs, {"adapter": "herb", "records": RECORDS, "params": {f"p{i}": 1 for i in range(500)}},
         400, invalid("params", "unknown parameter(s) 'p0', 'p1', 'p10', ...; known: " + ", ".join(
             sorted(f.name for f in fields(TrainParams))))),
        ("POST", g, {"messages": CHAT * 1025}, 400,
         invalid("messages", "are 1025; at most 1024 fit in the model's context")),
        # paths too long, not encodable, looping
        ("POST", jobs, {"adapter": "herb", "data": long_path}, 400, invalid("data", too_long)),
        ("POST", jobs, {"adapter": "herb", "data": "a/" * 3000}, 400, invalid("data", too_long)),
        ("POST", jobs, {"adapter": "herb", "data": "x\ud800.jsonl"}, 400, invalid("data", surrogate)),
        ("POST", jobs, {"adapter": "herb", "data": "loop/x.jsonl"}, 400,
         invalid("data", "'loop/x.jsonl' cannot be used (Symlink loop)")),
        ("POST", adapters, {"name": "herb", "path": long_path}, 400, invalid("path", too_long)),
        ("POST", adapters, {"name": "herb", "path": "x\udfff"}, 400, invalid("path", surrogate)),
        ("POST", "fineinfer/api/adapters/herb/save", {"path": long_path}, 400, invalid("path", too_long)),
        ("POST", "fineinfer/api/adapters/herb/save", {"path": "s" * 253}, 400,
         invalid("path", "is too long (at most 251 bytes for the folder's name)")),
        ("POST", "fineinfer/api/adapters", {"name": "herb", "path": "loop"}, 400,
         invalid("path", "'loop' cannot be used (Symlink loop)")),
        # training parameters PEFT or torch cannot take
        ("POST", jobs, {"adapter": "herb", "records": RECORDS, "params": {"target_modules": "(a+)+$"}}, 400,
         invalid("params.target_modules", 'must be "all-linear" or a list of 1 to 64 module names '
                 '(such as "q_proj" or "self_attn.v_proj"; no patterns)')),
        ("POST", jobs, {"adapter": "herb", "records": RECORDS, "params": {"max_length": 2**20}}, 400,
         invalid("params.max_length", "must be <= 1024 (the model's context)")),
        ("POST", jobs, {"adapter": "herb", "records": RECORDS, "params": {"seed": 2**70}}, 400,
         invalid("params.seed", "must be an integer in [-2**63, 2**64 - 1]")),
        ("POST", jobs, {"adapter": "herb", "records": RECORDS, "params": {"max_steps": 2**63}}, 400,
         invalid("params.max_steps", "must be null or an integer in [1, 1000000000]")),
        ("POST", jobs, {"adapter": "herb", "records": RECORDS, "params": {"lora_alpha": 1e308}}, 400,
         invalid("params.lora_alpha", "must be in (0, 65536]")),
        ("POST", jobs, {"adapter": "herb", "records": RECORDS, "params": {"warmup_steps": 2**70}}, 400,
         invalid("params.warmup_steps", "must be an integer in [0, 1000000000]")),
    ]  # fmt: skip


async def test_hostile_requests_get_a_4xx_naming_the_field_and_the_engine_still_answers(
    ready_api, jp_root_dir
):
    (jp_root_dir / "loop").symlink_to(jp_root_dir / "loop")
    make_adapter(jp_root_dir / "alpha", seed=1)
    for method, route, body, status, expected in hostile_cases(str(jp_root_dir)):
        code, answer = await ready_api.call(method, route, body)
        assert (code, answer) == (status, expected), (route, body if len(str(body)) < 300 else "")
    # edges that are fine: the largest seed torch takes, a top_k beyond the vocabulary
    # (ignore_eos: a sampled end-of-text token would end the answer early, 1 run in ~100)
    for extra in ({"seed": 2**64 - 1, "temperature": 1.0}, {"top_k": 2**70, "temperature": 1.0}):
        body = {"prompt": "a", "max_new_tokens": 3, "ignore_eos": True, **extra}
        events = await ready_api.generate(body)
        assert events[-1]["usage"]["prompt_tokens"] == 1
        assert events[-1]["usage"]["completion_tokens"] == 3
    code, jobs = await ready_api.get("jobs")
    assert (code, jobs) == (200, {"jobs": []})  # none of them started a job
    events = await ready_api.generate({"messages": CHAT, "max_new_tokens": 4})
    assert events[-1]["type"] == "done"


# -- limits -------------------------------------------------------------------------------------

LIMITS = dict(
    max_request_bytes=4096,
    max_prompt_chars=40,
    max_stop_strings=2,
    max_stop_chars=5,
    max_data_bytes=300,
    max_jobs=1,
    max_adapters=2,
)


@pytest.mark.parametrize("traits", [LIMITS])
async def test_each_limit_is_a_clear_4xx_and_prompts_are_refused_before_tokenizing(
    ready_api, jp_root_dir, monkeypatch
):
    api = ready_api
    engine = api.app.host.engine
    assert (engine.config.max_jobs, engine.config.max_prompt_chars) == (1, 40)
    tokenized = []
    tokenizer = engine.core.loaded.tokenizer
    monkeypatch.setattr(tokenizer, "__call__", lambda *a, **k: tokenized.append(a) or None)
    monkeypatch.setattr(
        tokenizer, "apply_chat_template", lambda *a, **k: tokenized.append(a) or None
    )
    assert await api.post("generate", {"prompt": "x" * 41}) == (
        400,
        invalid("prompt", "is 41 characters; at most 40 are accepted"),
    )
    messages = [{"role": "system", "content": "x" * 30}, {"role": "user", "content": "y" * 11}]
    assert await api.post("generate", {"messages": messages}) == (
        400,
        invalid("messages", "is 41 characters; at most 40 are accepted"),
    )
    chat = {"model": "tiny", "messages": messages}
    assert await api.call("POST", "fineinfer/v1/chat/completions", chat) == (
        400,
        invalid("messages", "is 41 characters; at most 40 are accepted", openai=True),
    )
    assert tokenized == []
    monkeypatch.undo()

    assert await api.post("generate", {"prompt": "a", "stop": ["a", "b", "c"]}) == (
        400,
        invalid("stop", "at most 2 stop strings"),
    )
    assert await api.post("generate", {"prompt": "a", "stop": "abcdef"}) == (
        400,
        invalid("stop", "a stop string is 6 characters; at most 5"),
    )
    events = await api.generate({"prompt": "x" * 40, "stop": ["ab", "abcde"], "max_new_tokens": 2})
    assert events[-1]["type"] == "done"

    too_large = error(
        "request_too_large", "body: larger than this server takes (4096 bytes)", "body"
    )
    big = {"prompt": "x" * 5000}
    assert await api.post("generate", big) == (413, too_large)
    code, answer = await api.call("POST", "fineinfer/v1/completions", {"model": "x", **big})
    assert (code, answer["error"]["code"]) == (413, "request_too_large")
    assert await chunked_post(api, "fineinfer/api/generate", json.dumps(big).encode()) == (
        413,
        too_large,
    )

    (jp_root_dir / "big.jsonl").write_text(json.dumps({"text": "x" * 400}) + "\n")
    (jp_root_dir / "notes.xml").write_text("<a/>\n")
    assert await api.post("jobs", {"adapter": "herb", "data": "big.jsonl"}) == (
        400,
        error(BAD, "big.jsonl: 413 bytes; at most 300 are read", "data"),
    )
    kinds = "a .jsonl, .txt, .json, .csv or .parquet file or a save_to_disk folder"
    assert await api.post("jobs", {"adapter": "herb", "data": "notes.xml"}) == (
        400,
        invalid("data", f"'notes.xml': expected {kinds}"),
    )

    make_adapter(jp_root_dir / "alpha", seed=1)
    for name in ("a1", "a2"):
        assert (await api.post("adapters", {"name": name, "path": "alpha"}))[0] == 201
    full = "2 adapters are loaded, the most this engine takes; delete one first"
    assert await api.post("adapters", {"name": "a3", "path": "alpha"}) == (
        409,
        error("conflict", f"name: {full}", "name"),
    )
    assert await api.post("jobs", {"adapter": "herb", "records": RECORDS}) == (
        409,
        error("conflict", f"adapter: {full}", "adapter"),
    )
    assert (await api.delete("adapters/a2"))[0] == 204
    params = {**FAST, "max_steps": 10_000}
    code, job = await api.post("jobs", {"adapter": "herb", "records": RECORDS, "params": params})
    assert code == 201
    assert await api.post("jobs", {"adapter": "a1", "records": RECORDS}) == (
        409,
        error(
            "conflict",
            "1 jobs are queued or running, the most this engine takes; "
            "wait for one to end or cancel one",
        ),
    )
    assert await api.post("adapters", {"name": "a2", "path": "alpha"}) == (
        409,
        error("conflict", f"name: {full}", "name"),  # the queued or running job's adapter counts
    )
    assert (await api.post(f"jobs/{job['id']}/cancel"))[0] == 200
    code, job = await api.post("jobs", {"adapter": "b1", "records": RECORDS, "params": FAST})
    assert code == 201  # room again: the cancelled job's adapter went away


async def chunked_post(api, path: str, body: bytes) -> tuple[int, dict]:
    """POST with Transfer-Encoding: chunked (no Content-Length announces the size)."""
    from tornado.httpclient import HTTPRequest

    async def producer(write):
        for i in range(0, len(body), 1000):
            await write(body[i : i + 1000])

    request = HTTPRequest(
        f"{api.url}{path}",
        method="POST",
        headers={"Authorization": f"token {api.token}"},
        body_producer=producer,
    )
    response = await api.client.fetch(request, raise_error=False)
    return response.code, json.loads(response.body)


# -- what reaches error bodies -------------------------------------------------------------------


async def test_error_bodies_carry_no_traceback_or_server_paths(ready_api, jp_root_dir, monkeypatch):
    api = ready_api
    (jp_root_dir / "notes").mkdir()
    (jp_root_dir / "notes" / "bin.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n')
    code, answer = await api.post("jobs", {"adapter": "herb", "data": "notes/bin.jsonl"})
    message = answer["error"]["message"]
    assert (code, answer["error"]["field"]) == (400, "data")
    assert message.startswith("notes/bin.jsonl: cannot read ('utf-8' codec can't decode"), message
    assert str(jp_root_dir) not in message

    engine = api.app.host.engine
    data_dir = str(engine.config.data_dir)

    def fail(*args, **kwargs):
        raise ValueError(f"path: {data_dir}/adapters/x and {jp_root_dir}/y exist")

    monkeypatch.setattr(engine, "save_adapter", fail)
    make_adapter(jp_root_dir / "alpha", seed=1)
    assert (await api.post("adapters", {"name": "alpha", "path": "alpha"}))[0] == 201
    assert await api.post("adapters/alpha/save", {"path": "copy"}) == (
        400,
        invalid("path", "<data_dir>/adapters/x and y exist"),
    )

    def crash(*args, **kwargs):
        raise KeyError(f"{data_dir}/secret")

    monkeypatch.setattr(engine, "list_adapters", crash)
    assert await api.get("adapters") == (
        500,
        error("server_error", "internal error (KeyError); see the server log"),
    )


async def test_saving_never_replaces_what_is_not_an_adapter(ready_api, jp_root_dir):
    api = ready_api
    make_adapter(jp_root_dir / "alpha", seed=1)
    assert (await api.post("adapters", {"name": "alpha", "path": "alpha"}))[0] == 201
    run = jp_root_dir / "run"
    make_adapter(run, seed=2)
    (run / "checkpoint-50").mkdir()
    (jp_root_dir / "out.old").mkdir()
    (jp_root_dir / "out.old" / "keep.txt").write_text("mine")
    for path, message in [
        ("run", "'run' holds other files ('checkpoint-50'); they would be deleted"),
        ("out", "'out.old' exists next to it; saving would delete it"),
    ]:
        assert await api.post("adapters/alpha/save", {"path": path}) == (
            400,
            invalid("path", message),
        )
    assert (run / "checkpoint-50").is_dir() and (jp_root_dir / "out.old" / "keep.txt").is_file()
    code, saved = await api.post("adapters/alpha/save", {"path": "copy"})
    assert (code, saved["saved_to"]) == (200, str(jp_root_dir / "copy"))


def test_save_paths_in_the_engine_data_directory_are_refused(tmp_path):
    root, data = tmp_path, tmp_path / ".local" / "fineinfer"
    (data / "adapters" / "herb").mkdir(parents=True)
    for value in (".local/fineinfer", ".local/fineinfer/adapters/herb", str(data / "new")):
        with pytest.raises(ApiError) as refused:
            validate.adapter_save_request(json.dumps({"path": value}).encode(), str(root), data)
        assert refused.value.message.endswith("is in the engine's data directory; save elsewhere")
    assert validate.adapter_save_request(b'{"path": "out"}', str(root), data) == root / "out"


# -- the validation rules themselves ------------------------------------------------------------


def test_adapter_names_match_whole_and_never_name_a_module():
    assert check_adapter_name("herb-2_b") == "herb-2_b"
    for name in ("herb\n", "\nherb", "herb\r", "a" * 65, "2herb", "herb__at3", "", "he rb"):
        with pytest.raises(ValueError, match="is not a valid adapter name"):
            check_adapter_name(name)
    for name in ("model", "layers", "q_proj", "lora_A", "LORA_B", "base_layer", "weight", "base"):
        with pytest.raises(ValueError, match="is a reserved name"):
            check_adapter_name(name)


def test_target_modules_are_all_linear_or_plain_module_names():
    assert TrainParams(target_modules=["q_proj", "self_attn.v_proj"]).target_modules == [
        "q_proj",
        "self_attn.v_proj",
    ]
    for bad in ("(a+)+$", ".*", "q_proj", [], ["q_proj", "(a|b)"], ["x"] * 65, ["a" * 129], [1]):
        with pytest.raises(ValueError, match="^target_modules: "):
            TrainParams(target_modules=bad)


def test_sampling_and_latency_edges():
    assert SamplingParams(temperature=0.01, seed=-(2**63)).seed == -(2**63)
    assert SamplingParams(seed=2**64 - 1, top_k=2**70).top_k == 2**70
    for kwargs, field in [
        ({"temperature": 0.009}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": 2**64}, "seed"),
        ({"repetition_penalty": 0.001}, "repetition_penalty"),
        ({"max_new_tokens": True}, "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            SamplingParams(**kwargs)
    assert Slo(ttft=1e6, tpot=5e-324).ttft == 1e6
    for value in (1e6 + 1, 10**400, float("inf"), 0):
        with pytest.raises(ValueError, match="^ttft: must be > 0 and <= 1e"):
            Slo(ttft=value)


def test_redact_shows_root_paths_relative_and_the_data_directory_by_name():
    host = EngineHost({"policy": "deferred"}, root_dir="/home/u", log=logging.getLogger())
    host.engine = SimpleNamespace(config=SimpleNamespace(data_dir="/home/u/.local/fineinfer"))
    try:
        for message, shown in [
            ("/home/u/notes/x.jsonl: cannot read", "notes/x.jsonl: cannot read"),
            ("/home/u/.local/fineinfer/jobs/job-1 is full", "<data_dir>/jobs/job-1 is full"),
            ("'/home/u' and /home/user2/x", "'<root>' and /home/user2/x"),
        ]:
            assert host.redact(message) == shown
    finally:
        host.pool.shutdown()
