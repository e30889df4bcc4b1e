"""The OpenAI-compatible API with the official client, and the server under concurrent load."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest

from fineinfer_jupyter.engine.walk import TrainingPass

pytest_plugins = ["pytest_jupyter.jupyter_server", "server_fixtures"]
pytestmark = pytest.mark.timeout(180)

RECORDS = [
    {"prompt": "Color of moonveil?", "completion": "Silver blue."},
    {"prompt": "Where grows glimmerroot?", "completion": "In caves."},
]
CHAT = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def client(ready_api, jp_asyncio_loop):
    """The official async client, pointed at the server with its token as the API key."""
    client = openai.AsyncOpenAI(
        base_url=f"{ready_api.url}fineinfer/v1", api_key=ready_api.token, max_retries=0, timeout=60
    )
    yield client
    jp_asyncio_loop.run_until_complete(client.close())


async def test_the_openai_client_lists_models_and_streams_and_completes_chats(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["base", "tiny"]  # the alias, then the name
    assert models.data[0].owned_by == "fineinfer"

    stream = await client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=16, temperature=0, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)

    whole = await client.chat.completions.create(
        model="base", messages=CHAT, max_tokens=16, temperature=0
    )
    assert whole.object == "chat.completion" and whole.model == "base"
    assert whole.choices[0].message.role == "assistant"
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (
        streamed,
        "length",
    )
    assert whole.usage.completion_tokens == 16
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 16


async def test_the_openai_client_gets_text_completions_and_usage_while_streaming(client):
    whole = await client.completions.create(
        model="tiny", prompt="Once", max_tokens=8, temperature=0
    )
    assert whole.object == "text_completion"
    assert (whole.choices[0].finish_reason, whole.usage.prompt_tokens) == ("length", 4)
    stream = await client.completions.create(
        model="tiny",
        prompt="Once",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


async def test_openai_errors_have_openai_shape_and_the_client_raises_them(client, ready_api):
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="nope", messages=CHAT)
    assert missing.value.body["param"] == "model"
    assert missing.value.body["message"] == "model: no model named 'nope' (known: base, tiny)"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="tiny", messages=CHAT, response_format={"type": "json_object"}
        )

    def refused(field, message, status=400, kind="invalid_request_error"):
        body = {"message": f"{field}: {message}", "type": kind, "field": field}
        return status, {"error": {**body, "param": field, "code": kind}}

    chat = "fineinfer/v1/chat/completions"
    for body, expected in [
        ({"messages": CHAT}, refused("model", "is required")),
        ({"model": "tiny"}, refused("messages", "is required")),
        (
            {"model": "tiny", "messages": CHAT, "tools": [{"type": "function"}]},
            refused("tools", "is not supported by this server"),
        ),
        (
            {"model": "tiny", "messages": CHAT, "max_tokens": 0},
            refused("max_tokens", "must be an integer >= 1 (0 only with echo: score the prompt)"),
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            refused("messages[0].content", "only text parts are supported"),
        ),
    ]:
        assert await ready_api.call("POST", chat, body) == expected, body
    code, answer = await ready_api.call(
        "POST", "fineinfer/v1/completions", {"model": "tiny", "prompt": ["a", 5]}
    )
    assert (code, answer["error"]["param"]) == (400, "prompt[1]")
    # Jupyter's own "token" scheme works as well as "Bearer"
    code, listed = await ready_api.call("GET", "fineinfer/v1/models")
    assert (code, listed["object"]) == (200, "list")


async def test_twenty_concurrent_streams_give_the_tokens_the_engine_gives_in_process(ready_api):
    prompts = [f"Request {i}: " + "x" * (i % 7) for i in range(20)]
    bodies = [
        {"prompt": p, "max_new_tokens": 12 + i % 5, "ignore_eos": True}
        for i, p in enumerate(prompts)
    ]
    answers = await asyncio.gather(*[ready_api.stream("fineinfer/api/generate", b) for b in bodies])
    assert [code for code, _ in answers] == [200] * 20
    finals = [ready_api.ndjson(chunks)[-1] for _, chunks in answers]
    assert [f["finish_reason"] for f in finals] == ["length"] * 20

    engine = ready_api.app.host.engine

    def in_process():
        streams = [engine.generate(**b) for b in bodies]
        return [s.result().token_ids for s in streams]

    expected = await asyncio.get_running_loop().run_in_executor(None, in_process)
    assert [f["token_ids"] for f in finals] == expected
    code, metrics = await ready_api.get("metrics")
    assert max(s["rows"] for s in metrics["timeline"] if s["kind"] == "decode") > 1  # batched


async def test_a_job_trains_to_the_end_while_requests_are_served_then_its_adapter_is_a_model(
    ready_api, client, monkeypatch
):
    api = ready_api
    unit = TrainingPass._unit  # a micro-step of at least 24 ms: the job lasts over a second
    monkeypatch.setattr(TrainingPass, "_unit", lambda *a: (time.sleep(0.004), unit(*a))[1])
    params = {"r": 4, "lora_alpha": 8, "batch_size": 2, "max_length": 64, "max_steps": 30}
    code, job = await api.post("jobs", {"adapter": "herb", "records": RECORDS, "params": params})
    assert code == 201
    served_while_training = 0
    deadline = time.monotonic() + 150
    while True:
        events = await api.generate({"prompt": "Hi", "max_new_tokens": 4, "ttft": 0.2, "tpot": 0.2})
        assert events[-1]["type"] == "done"
        code, job = await api.get(f"jobs/{job['id']}")
        if job["state"] not in ("queued", "running"):
            break
        served_while_training += job["state"] == "running"
        assert time.monotonic() < deadline, job
    assert (job["state"], job["step"], job["error"]) == ("done", 30, None)
    assert served_while_training >= 1
    models = await client.models.list()
    assert [m.id for m in models.data] == ["base", "tiny", "herb"]
    assert models.data[2].parent == "tiny"
    answer = await client.chat.completions.create(model="herb", messages=CHAT, max_tokens=4)
    assert answer.model == "herb" and answer.usage.completion_tokens <= 4
    code, metrics = await api.get("metrics")
    kinds = [s["kind"] for s in metrics["timeline"]]
    assert "train" in kinds and "decode" in kinds
    json.dumps(metrics, allow_nan=False)
