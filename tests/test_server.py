"""The server extension on a real jupyter_server: REST routes, streaming, WebSocket, security."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import warnings

import pytest
import torch
from conftest import make_adapter
from jupyter_server.auth import Authorizer
from jupyter_server.utils import JupyterServerAuthWarning
from tornado.httpclient import HTTPClientError
from tornado.web import RequestHandler
from traitlets import TraitError

from fineinfer_jupyter.engine import config as engine_config
from fineinfer_jupyter.engine import engine as engine_module
from fineinfer_jupyter.engine import threads
from fineinfer_jupyter.engine.runner import Runner
from fineinfer_jupyter.server import app as server_app
from fineinfer_jupyter.server import openai_api, routes

pytest_plugins = ["pytest_jupyter.jupyter_server", "server_fixtures"]
pytestmark = pytest.mark.timeout(120)

RECORDS = [
    {"prompt": "Color of moonveil?", "completion": "Silver blue."},
    {"prompt": "Where grows glimmerroot?", "completion": "In caves."},
]
FAST = {"r": 4, "lora_alpha": 8, "batch_size": 2, "max_length": 64, "learning_rate": 1e-2}
CHAT = {"role": "user", "content": "Hi"}
ROUTES = [  # every route, with a body that would be accepted
    ("GET", "fineinfer/api/openapi.json", None),
    ("GET", "fineinfer/api/status", None),
    ("GET", "fineinfer/api/metrics", None),
    ("POST", "fineinfer/api/generate", {"prompt": "Hi", "max_new_tokens": 2}),
    ("GET", "fineinfer/api/jobs", None),
    ("POST", "fineinfer/api/jobs", {"adapter": "herb", "records": RECORDS}),
    ("GET", "fineinfer/api/jobs/job-1", None),
    ("POST", "fineinfer/api/jobs/job-1/stop", None),
    ("POST", "fineinfer/api/jobs/job-1/export", {"path": "job-1", "processes": 1}),
    ("GET", "fineinfer/api/adapters", None),
    ("POST", "fineinfer/api/adapters", {"name": "alpha", "path": "alpha"}),
    ("GET", "fineinfer/api/adapters/alpha", None),
    ("DELETE", "fineinfer/api/adapters/alpha", None),
    ("POST", "fineinfer/api/adapters/alpha/save", {"path": "copy"}),
    ("POST", "fineinfer/api/adapters/alpha/export", {"to": "gguf"}),
    ("GET", "fineinfer/v1/models", None),
    ("GET", "fineinfer/v1/health", None),
    ("GET", "fineinfer/health", None),
    ("POST", "fineinfer/v1/chat/completions", {"model": "base", "messages": [CHAT]}),
    ("POST", "fineinfer/v1/completions", {"model": "base", "prompt": "Hi"}),
]


def error(status_type, message, field=None):
    return {"error": {"message": message, "type": status_type, "field": field}}


# -- configuration and lifecycle ---------------------------------------------------------------


def test_traits_agree_with_the_engine_and_all_have_help():
    assert server_app.POLICIES == engine_config.POLICIES
    assert server_app.FineInferApp().engine_config()["slo"] == {"ttft": None, "tpot": None}
    traits = server_app.FineInferApp.class_traits(config=True)
    own = {n for n, t in traits.items() if t.this_class is server_app.FineInferApp}
    assert {"model", "device", "dtype", "data_dir", "policy", "ttft", "tpot", "max_queue"} <= own
    assert {"max_new_tokens_cap", "load_at_start", "threads"} <= own
    assert all(traits[n].help for n in own)
    assert set(server_app.FineInferApp(policy="exclusive").engine_config()) <= {
        f for f in engine_config.EngineConfig.__dataclass_fields__
    }
    assert server_app.FineInferApp(threads=3).engine_config()["threads"] == 3
    with pytest.raises(TraitError, match="threads must be >= 1"):
        server_app.FineInferApp(threads=0)


def test_every_handler_is_authenticated_when_unauthenticated_access_is_off(
    jp_configurable_serverapp, jp_server_config
):
    jp_server_config.ServerApp.allow_unauthenticated_access = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", JupyterServerAuthWarning)
        app = jp_configurable_serverapp(config=jp_server_config)
        handlers = {rule.target for rule in app.web_app.default_router.rules[0].target.rules}
        assert {routes.EventsHandler, openai_api.ModelsHandler} <= handlers

        class Undecorated(RequestHandler):  # proves the check would catch one
            def get(self):
                pass

        with pytest.raises(JupyterServerAuthWarning):
            app.web_app.add_handlers(".*$", [("/undecorated", Undecorated)])


@pytest.mark.parametrize("traits", [dict(policy="exclusive", max_queue=3, ttft=2.0, tpot=0.25)])
async def test_traits_configure_the_engine_and_kernels_learn_url_and_token(
    ready_api, jp_http_port, jp_base_url, token
):
    engine = ready_api.app.host.engine
    assert (engine.config.policy, engine.config.max_queue) == ("exclusive", 3)
    assert (engine.slo.ttft, engine.slo.tpot) == (2.0, 0.25)
    assert os.environ["FINEINFER_SERVER_URL"] == f"http://127.0.0.1:{jp_http_port}{jp_base_url}"
    assert os.environ["FINEINFER_TOKEN"] == token


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()  # a new thread's default: the server's engine sets it
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "traits, intra_op, source",
    [({"threads": 1}, 1, "setting"), ({}, threads.usable_cores(), "default")],
)
async def test_status_shows_the_thread_choice(keep_torch_threads, ready_api, intra_op, source):
    code, status = await ready_api.get("status")
    waiting = threads.set_wait_policy()
    assert code == 200
    chosen = status["threads"]
    chosen.pop("others_busy", None)  # the load other programs put on the machine just now
    follows = source == "default" and threads.LoadFollower.for_this_machine(1) is not None
    assert chosen.pop("follows_load") is follows
    if follows:  # fewer threads while the machine is busy: never more, never none
        assert 1 <= chosen["intra_op"] <= intra_op
        intra_op = chosen["intra_op"]
    assert chosen == {
        "intra_op": intra_op,
        "source": source,
        "wait_policy": waiting["policy"],
        "note": waiting["note"],
    }


async def test_stop_extension_shuts_the_engine_down(ready_api):
    app = ready_api.app
    engine = app.host.engine
    await app.stop_extension()
    assert engine.state == "stopped"
    await app.stop_extension()  # twice is fine (SIGTERM, then the server's cleanup)


@pytest.fixture
def gated_load(monkeypatch):
    """The model load waits for gate.set() (after reporting progress "test gate")."""
    gate, real = threading.Event(), engine_module.load_model

    def load(*args, progress, **kwargs):
        progress("test gate")
        assert gate.wait(30)
        return real(*args, progress=progress, **kwargs)

    monkeypatch.setattr(engine_module, "load_model", load)
    yield gate
    gate.set()


async def test_status_reports_loading_with_progress_and_model_routes_answer_503(gated_load, api):
    status = await api.until("status", lambda s: s["progress"] == "test gate")
    assert (status["state"], status["error"], status["model"]) == ("loading", None, None)
    assert status["version"] == "0.1.0"
    loading = error("model_loading", "model is loading: test gate")
    for method, path, body in ROUTES[3:]:  # all but openapi.json, status and metrics
        code, answer = await api.call(method, path, body)
        if path.startswith("fineinfer/v1"):
            loading["error"].update(param=None, code="model_loading")
        assert (code, answer) == (503, loading), path
    response = await api.fetch("fineinfer", "api", "jobs", raise_error=False)
    assert response.headers["Retry-After"] == "1"
    code, metrics = await api.get("metrics")
    assert (code, metrics["state"]) == (200, "loading")
    gated_load.set()
    assert (await api.ready())["model"]["name"] == "tiny"


@pytest.fixture
def failing_load(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("no such model folder: /nowhere")

    monkeypatch.setattr(engine_module, "load_model", fail)


async def test_a_model_that_fails_to_load_is_reported(failing_load, api):
    status = await api.until("status", lambda s: s["state"] != "loading")
    assert (status["state"], status["error"]) == (
        "error",
        "OSError: no such model folder: /nowhere",
    )
    code, answer = await api.post("generate", {"prompt": "Hi"})
    message = "model failed to load: OSError: no such model folder: /nowhere"
    assert (code, answer) == (503, error("model_loading", message))


@pytest.mark.parametrize("traits", [dict(load_at_start=False)])
async def test_without_load_at_start_the_first_request_loads_the_model(api):
    assert api.app.host.engine is None and api.app.host._creating is None
    code, status = await api.get("status")
    assert code == 200 and status["state"] in ("loading", "ready")
    assert (await api.ready())["state"] == "ready"


# -- security -----------------------------------------------------------------------------------


@pytest.mark.parametrize("traits", [dict(load_at_start=False)])
async def test_every_route_refuses_requests_without_the_token(api, jp_ws_fetch):
    for headers in ({"Authorization": ""}, {"Authorization": "token wrong"}):
        for method, path, body in ROUTES:
            code, answer = await api.call(method, path, body, headers=headers)
            assert code == 403, (path, headers)
            assert answer["error"]["type"] == "forbidden"
        with pytest.raises(HTTPClientError) as refused:
            await jp_ws_fetch("fineinfer", "api", "events", headers=headers, follow_redirects=False)
        assert refused.value.code == 403
    code, _ = await api.call(
        "GET", "fineinfer/v1/models", headers={"Authorization": "Bearer wrong"}
    )
    assert code == 403
    assert api.app.host.engine is None and api.app.host._creating is None  # nothing loaded


class RecordingAuthorizer(Authorizer):
    """Allows all but fineinfer's "adapters" resource; records every fineinfer question."""

    asked: list[tuple[str, str]] = []

    def is_authorized(self, handler, user, action, resource):
        if resource.startswith("fineinfer_jupyter"):
            self.asked.append((action, resource))
        return resource != "fineinfer_jupyter:adapters"


@pytest.fixture
def recording_authorizer(jp_server_config):
    jp_server_config.ServerApp.authorizer_class = RecordingAuthorizer
    RecordingAuthorizer.asked = []
    return RecordingAuthorizer


async def test_routes_are_authorized_with_their_resource_and_action(
    recording_authorizer, ready_api, jp_ws_fetch
):
    recording_authorizer.asked.clear()
    for method, path, body in ROUTES:
        await ready_api.call(method, path, body)
    socket = await jp_ws_fetch("fineinfer", "api", "events")
    socket.close()
    r = "fineinfer_jupyter:"
    assert recording_authorizer.asked == [
        ("read", r + "status"),
        ("read", r + "status"),
        ("read", r + "metrics"),
        ("execute", r + "generate"),
        ("read", r + "jobs"),
        ("execute", r + "jobs"),
        ("read", r + "jobs"),
        ("execute", r + "jobs"),
        ("write", r + "jobs"),
        ("read", r + "adapters"),
        ("write", r + "adapters"),
        ("read", r + "adapters"),
        ("write", r + "adapters"),
        ("write", r + "adapters"),
        ("write", r + "adapters"),
        ("read", r + "openai"),
        ("read", r + "openai"),  # v1/health
        ("read", r + "openai"),  # health
        ("execute", r + "openai"),
        ("execute", r + "openai"),
        ("read", r + "events"),
    ]
    code, answer = await ready_api.get("adapters")
    assert code == 403 and answer["error"]["type"] == "forbidden"


# -- generate -----------------------------------------------------------------------------------


async def test_generate_streams_text_in_several_chunks_before_the_final_stats(ready_api):
    code, chunks = await ready_api.stream(
        "fineinfer/api/generate",
        {"prompt": "Hello there", "max_new_tokens": 48, "ignore_eos": True},
    )
    assert code == 200
    lines = [[json.loads(x) for x in c.decode().splitlines()] for c in chunks]
    assert [e["type"] for e in lines[-1]][-1] == "done"
    assert all(e["type"] == "delta" for c in lines[:-1] for e in c)
    assert len([c for c in lines[:-1] if c]) >= 2  # text arrived before the answer was complete
    events = ready_api.ndjson(chunks)
    done = events[-1]
    assert (done["finish_reason"], done["usage"]) == (
        "length",
        {
            "prompt_tokens": 11,
            "completion_tokens": 48,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    )
    assert {"ttft", "tpot_mean", "tokens_per_s", "deferred", "total"} <= set(done["stats"])
    engine = ready_api.app.host.engine
    text = engine.core.loaded.tokenizer.decode(done["token_ids"], skip_special_tokens=True)
    assert "".join(e["text"] for e in events[:-1]) == text


async def test_generate_takes_chat_messages_and_an_adapter(ready_api, jp_root_dir):
    make_adapter(jp_root_dir / "alpha", seed=1)
    assert (await ready_api.post("adapters", {"name": "alpha", "path": "alpha"}))[0] == 201
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 12}
    base = (await ready_api.generate(chat))[-1]
    tuned = (await ready_api.generate({**chat, "adapter": "alpha"}))[-1]
    assert base["usage"]["completion_tokens"] == 12
    assert base["token_ids"] != tuned["token_ids"]
    assert (await ready_api.generate({**chat, "adapter": "base"}))[-1]["token_ids"] == base[
        "token_ids"
    ]


@pytest.mark.parametrize("traits", [dict(max_new_tokens_cap=64)])
async def test_generate_refuses_bad_input_naming_the_field(ready_api):
    bad = "invalid_request_error"
    cases = [
        (b"{oops", 400, bad, "body"),
        ("[1]", 400, bad, "body"),
        ({}, 400, bad, "prompt"),
        ({"prompt": "a", "messages": []}, 400, bad, "prompt"),
        ({"prompt": ""}, 400, bad, "prompt"),
        ({"prompt": 3}, 400, bad, "prompt"),
        ({"prompt": "a", "colour": 1}, 400, bad, "colour"),
        ({"prompt": "a", "temperature": -1}, 400, bad, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, 400, bad, "temperature"),
        ({"prompt": "a", "max_new_tokens": 65}, 400, bad, "max_new_tokens"),
        ({"prompt": "a", "stop": [""]}, 400, bad, "stop"),
        ({"prompt": "a", "ttft": 0}, 400, bad, "ttft"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, bad, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, 400, bad, "messages[0].content"),
        ({"prompt": "a", "adapter": "nope"}, 404, "not_found", "adapter"),
    ]
    for body, status, kind, field in cases:
        code, answer = await ready_api.post("generate", body)
        assert (code, answer["error"]["type"], answer["error"]["field"]) == (status, kind, field)
        assert answer["error"]["message"].startswith(f"{field}: "), answer
    code, answer = await ready_api.post("generate", {"prompt": "a", "max_new_tokens": 65})
    assert answer == error(bad, "max_new_tokens: must be <= 64", "max_new_tokens")
    code, answer = await ready_api.call("DELETE", "fineinfer/api/generate")
    assert code == 405 and answer["error"]["type"] == "method_not_allowed"


@pytest.mark.parametrize("traits", [dict(policy="exclusive", max_queue=1)])
async def test_a_full_queue_answers_429_and_a_waiting_request_runs_once_training_ends(ready_api):
    api = ready_api
    code, job = await api.post(
        "jobs", {"adapter": "herb", "records": RECORDS, "params": {**FAST, "max_steps": 10_000}}
    )
    assert code == 201
    waiting = asyncio.ensure_future(
        api.stream("fineinfer/api/generate", {"prompt": "Hi", "max_new_tokens": 4})
    )
    await api.until("status", lambda s: s["requests"]["waiting"] == 1)
    code, answer = await api.post("generate", {"prompt": "Hi"})
    assert (code, answer) == (
        429,
        error("queue_full", "queue full: 1 requests are waiting"),
    )
    assert (await api.post(f"jobs/{job['id']}/cancel"))[0] == 200
    code, chunks = await asyncio.wait_for(waiting, 60)
    assert code == 200 and ready_api.ndjson(chunks)[-1]["type"] == "done"


async def test_a_client_that_disconnects_mid_stream_cancels_its_request(
    ready_api, monkeypatch, jp_http_port, jp_base_url, token
):
    decode = Runner.decode
    monkeypatch.setattr(Runner, "decode", lambda self, *a: (time.sleep(0.02), decode(self, *a))[1])
    body = json.dumps({"prompt": "Hi", "max_new_tokens": 1000, "ignore_eos": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", jp_http_port)
    writer.write(
        f"POST {jp_base_url}fineinfer/api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: token {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while b'"delta"' not in received:
        received += await asyncio.wait_for(reader.read(4096), 30)
    assert received.startswith(b"HTTP/1.1 200")
    writer.close()
    metrics = await ready_api.until("metrics", lambda m: m["requests"]["cancelled"] == 1)
    assert (metrics["requests"]["finished"], metrics["requests"]["running"]) == (0, 0)


# -- metrics and events -------------------------------------------------------------------------


async def test_metrics_are_one_strict_json_snapshot(ready_api, monkeypatch):
    code, metrics = await ready_api.get("metrics")
    assert code == 200
    assert {"time", "state", "iteration", "requests", "inference", "training", "series"} <= set(
        metrics
    )
    engine = ready_api.app.host.engine
    snapshot = engine.metrics_snapshot
    monkeypatch.setattr(
        engine,
        "metrics_snapshot",
        lambda: {**snapshot(), "slack": {"min": float("-inf")}, "loss": [float("nan"), 1.5]},
    )
    response = await ready_api.fetch("fineinfer", "api", "metrics")
    strict = json.loads(response.body, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert (strict["slack"], strict["loss"]) == ({"min": None}, [None, 1.5])


async def test_events_websocket_pushes_metrics_and_jobs_about_twice_a_second(
    ready_api, jp_ws_fetch
):
    code, job = await ready_api.post(
        "jobs", {"adapter": "herb", "records": RECORDS, "params": {**FAST, "max_steps": 2}}
    )
    socket = await jp_ws_fetch("fineinfer", "api", "events")
    seen: dict[str, list] = {"metrics": [], "jobs": []}
    start = time.monotonic()
    while len(seen["metrics"]) < 4 or not seen["jobs"]:
        message = json.loads(await asyncio.wait_for(socket.read_message(), 10))
        seen[message["type"]].append((time.monotonic(), message["data"]))
    socket.close()
    assert time.monotonic() - start < 15
    assert seen["metrics"][-1][1]["state"] == "ready"
    assert [j["id"] for j in seen["jobs"][-1][1]] == [job["id"]]
    times = [t for t, _ in seen["metrics"]]
    assert times[-1] - times[0] >= 3 * 0.4  # paced, not flooding
    await ready_api.until(f"jobs/{job['id']}", lambda j: j["state"] == "done")


# -- jobs ---------------------------------------------------------------------------------------


async def test_jobs_start_list_stop_resume_cancel_with_exact_errors(ready_api):
    api = ready_api
    params = {**FAST, "max_steps": 10_000}
    code, job = await api.post("jobs", {"adapter": "herb", "records": RECORDS, "params": params})
    assert code == 201 and (job["id"], job["adapter"]) == ("job-1", "herb")
    assert job["state"] in ("queued", "running") and job["params"]["max_steps"] == 10_000
    second = {"adapter": "x", "records": RECORDS, "params": params}
    response = await api.fetch("fineinfer", "api", "jobs", method="POST", body=json.dumps(second))
    assert response.headers["Location"].endswith("/fineinfer/api/jobs/job-2")
    code, listed = await api.get("jobs")
    assert [j["id"] for j in listed["jobs"]] == ["job-1", "job-2"]
    assert (await api.get("jobs/job-1"))[1]["adapter"] == "herb"
    await api.until("jobs/job-1", lambda j: j["state"] == "running")
    assert await api.delete("adapters/herb") == (
        409,
        error("conflict", "name: adapter 'herb' is being trained; stop its job first", "name"),
    )
    code, again = await api.post("jobs", {"adapter": "herb", "records": RECORDS})
    assert (code, again["error"]["type"], again["error"]["field"]) == (409, "conflict", "adapter")

    code, stopped = await api.post("jobs/job-1/stop")
    assert (code, stopped["state"]) == (200, "stopped")
    code, answer = await api.post("jobs/job-1/stop")
    assert (code, answer) == (
        409,
        error("conflict", "job: job-1 is stopped, not running or queued", "job"),
    )
    code, resumed = await api.post("jobs/job-1/resume")
    assert (code, resumed["state"]) == (200, "queued")
    code, answer = await api.post("jobs/job-1/resume")
    assert (code, answer["error"]["type"]) == (409, "conflict")
    for job_id in ("job-1", "job-2"):
        code, cancelled = await api.post(f"jobs/{job_id}/cancel")
        assert (code, cancelled["state"]) == (200, "cancelled")
    code, answer = await api.post("jobs/job-1/cancel")
    assert (code, answer["error"]["type"]) == (409, "conflict")

    assert await api.get("jobs/job-9") == (404, error("not_found", "job: no job 'job-9'", "job"))
    assert (await api.post("jobs/job-9/stop"))[0] == 404
    code, answer = await api.post("jobs/job-1/restart")
    assert (code, answer) == (
        404,
        error("not_found", "no job action 'restart'; use stop, resume or cancel"),
    )


async def test_job_data_comes_from_a_file_under_the_root_and_nowhere_else(
    ready_api, jp_root_dir, tmp_path
):
    api = ready_api
    lines = "".join(json.dumps(r) + "\n" for r in RECORDS)
    (jp_root_dir / "notes").mkdir()
    (jp_root_dir / "notes" / "herbs.jsonl").write_text(lines)
    (tmp_path / "secret.jsonl").write_text(lines)
    (jp_root_dir / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    (jp_root_dir / "broken.jsonl").write_text(lines + "{oops\n")
    params = {**FAST, "max_steps": 1}

    code, job = await api.post(
        "jobs", {"adapter": "herb", "data": "notes/herbs.jsonl", "params": params}
    )
    assert (code, job["examples"]) == (201, 2)
    inside = str(jp_root_dir / "notes" / "herbs.jsonl")
    assert (await api.post("jobs", {"adapter": "herb2", "data": inside, "params": params}))[
        0
    ] == 201

    def refused(message, field="data"):
        return 400, error("invalid_request_error", f"{field}: {message}", field)

    outside = str(tmp_path / "secret.jsonl")
    cases = [
        (
            "../secret.jsonl",
            refused("'..' is not allowed; give a path under the server's root directory"),
        ),
        (
            "notes/../link.jsonl",
            refused("'..' is not allowed; give a path under the server's root directory"),
        ),
        (outside, refused(f"{outside!r} is outside the server's root directory")),
        ("link.jsonl", refused("'link.jsonl' is outside the server's root directory")),
        (
            "missing.jsonl",
            refused("'missing.jsonl': no such file or folder under the root directory"),
        ),
        ("notes", refused("'notes' is a folder but not a datasets save_to_disk one")),
    ]
    for path, expected in cases:
        assert await api.post("jobs", {"adapter": "x", "data": path}) == expected, path
    code, answer = await api.post("jobs", {"adapter": "x", "data": "broken.jsonl"})
    assert (code, answer["error"]["field"]) == (400, "data")
    assert "broken.jsonl line 3: not valid JSON" in answer["error"]["message"]

    bad = "invalid_request_error"
    cases = [
        ({"adapter": "x"}, "data"),
        ({"adapter": "x", "records": RECORDS, "data": "notes/herbs.jsonl"}, "data"),
        ({"records": RECORDS}, "adapter"),
        ({"adapter": "bad name", "records": RECORDS}, "adapter"),
        ({"adapter": "train", "records": RECORDS}, "adapter"),
        ({"adapter": "x", "records": [{"question": "?"}]}, "records"),
        (
            {"adapter": "x", "records": RECORDS, "params": {"learning_rate": -1}},
            "params.learning_rate",
        ),
        ({"adapter": "x", "records": RECORDS, "params": {"colour": 1}}, "params"),
        ({"adapter": "x", "records": RECORDS, "params": []}, "params"),
    ]
    for body, field in cases:
        code, answer = await api.post("jobs", body)
        assert (code, answer["error"]["type"], answer["error"]["field"]) == (400, bad, field), body
    assert [j["adapter"] for j in (await api.get("jobs"))[1]["jobs"]] == ["herb", "herb2"]


# -- adapters -----------------------------------------------------------------------------------


async def test_adapters_load_save_list_and_delete_with_exact_errors(
    ready_api, jp_root_dir, tmp_path
):
    api = ready_api
    make_adapter(jp_root_dir / "alpha", seed=1)
    make_adapter(tmp_path / "outside", seed=2)
    (jp_root_dir / "notes").mkdir()
    (jp_root_dir / "notes" / "keep.txt").write_text("mine")

    code, alpha = await api.post("adapters", {"name": "alpha", "path": "alpha"})
    assert (code, alpha) == (
        201,
        {
            "name": "alpha",
            "path": str(jp_root_dir / "alpha"),
            "r": 4,
            "training": False,
            "step": None,
            "job": None,
        },
    )
    assert await api.get("adapters") == (200, {"adapters": [alpha]})
    assert await api.get("adapters/alpha") == (200, alpha)
    assert await api.get("adapters/beta") == (
        404,
        error("not_found", "adapter: no adapter named 'beta'", "adapter"),
    )
    assert await api.post("adapters", {"name": "alpha", "path": "alpha"}) == (
        409,
        error("conflict", "name: an adapter named 'alpha' exists already", "name"),
    )

    def refused(message, field="path"):
        return 400, error("invalid_request_error", f"{field}: {message}", field)

    outside = str(tmp_path / "outside")
    for body, expected in [
        (
            {"name": "beta", "path": outside},
            refused(f"{outside!r} is outside the server's root directory"),
        ),
        (
            {"name": "beta", "path": "notes"},
            refused("'notes' is not a PEFT adapter folder (no adapter_config.json)"),
        ),
        ({"name": "bad name", "path": "alpha"}, (400, "name")),
        ({"name": "base", "path": "alpha"}, (400, "name")),
        ({"path": "alpha"}, (400, "name")),
    ]:
        code, answer = await api.post("adapters", body)
        if isinstance(expected[1], str):
            assert (code, answer["error"]["field"]) == expected, body
        else:
            assert (code, answer) == expected, body

    code, saved = await api.post("adapters/alpha/save", {"path": "saved/alpha"})
    assert (code, saved["saved_to"]) == (200, str(jp_root_dir / "saved" / "alpha"))
    assert (jp_root_dir / "saved" / "alpha" / "adapter_config.json").is_file()
    assert (await api.post("adapters/alpha/save", {"path": "saved/alpha"}))[0] == 200  # replaced
    assert await api.post("adapters/alpha/save", {"path": "notes"}) == refused(
        "'notes' exists and is not an adapter folder; it would be replaced"
    )
    assert await api.post("adapters/alpha/save", {"path": "."}) == refused(
        "give a folder below the root directory, not the root itself"
    )
    assert (await api.post("adapters/alpha/save", {"path": str(tmp_path / "x")}))[0] == 400
    assert (await api.post("adapters/beta/save", {"path": "b"}))[0] == 404
    assert (jp_root_dir / "notes" / "keep.txt").read_text() == "mine"

    code, answer = await api.delete("adapters/alpha")
    assert (code, answer) == (204, None)
    assert (jp_root_dir / "alpha" / "adapter_config.json").is_file()  # the user's folder stays
    assert (await api.delete("adapters/alpha"))[0] == 404
    assert await api.delete("adapters/base") == (
        400,
        error("invalid_request_error", "name: 'base' is a reserved name", "name"),
    )
    assert await api.get("adapters") == (200, {"adapters": []})


async def test_a_request_that_fails_in_the_engine_ends_with_an_error(ready_api, monkeypatch):
    def boom(self, batch, also=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(Runner, "decode", boom)
    events = await ready_api.generate({"prompt": "Hi", "max_new_tokens": 8})
    assert events[-1] == {"type": "error", "id": events[-1]["id"], "message": "RuntimeError: boom"}
    # Greedy: OpenAI's default temperature 1.0 may sample the end of text as the first token, and
    # a request that ends at its first token never reaches decode (the flake of stop 39's CI).
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    code, chunks = await ready_api.stream("fineinfer/v1/chat/completions", {**chat, "stream": True})
    lines = b"".join(chunks).decode().split("\n\n")
    assert code == 200 and lines[-3:] == [
        'data: {"error":{"message":"RuntimeError: boom","type":"server_error","field":null,'
        '"param":null,"code":"server_error"}}',
        "data: [DONE]",
        "",
    ]
    code, answer = await ready_api.call("POST", "fineinfer/v1/chat/completions", chat)
    assert (code, answer["error"]["message"]) == (500, "RuntimeError: boom")
