"""Fixtures for the server tests: a real jupyter_server running fineinfer on the tiny model.

Load with `pytest_plugins = ["pytest_jupyter.jupyter_server", "server_fixtures"]`.
`@pytest.mark.parametrize("traits", [{"policy": "exclusive", ...}])` sets FineInferApp traits
for one test (the model is "tiny" and the data directory a fresh temporary one unless set).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from tornado.httpclient import HTTPResponse
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from traitlets.config import Config

READY_TIMEOUT = 30.0


@pytest.fixture
def traits() -> dict:
    return {}


@pytest.fixture
def jp_server_config(traits, tmp_path):
    return Config(
        {
            "ServerApp": {
                "jpserver_extensions": {
                    "fineinfer_jupyter": True,
                    "jupyter_server_terminals": False,
                }
            },
            "FineInferApp": {"model": "tiny", "data_dir": str(tmp_path / "fineinfer"), **traits},
        }
    )


@pytest.fixture
def fineinfer(jp_serverapp, jp_asyncio_loop, monkeypatch):
    """The FineInferApp of a started server (started as jupyter_server starts extensions, once
    the port is bound); its engine is shut down at the end."""
    for name in ("FINEINFER_SERVER_URL", "FINEINFER_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    manager = jp_serverapp.extension_manager
    jp_asyncio_loop.run_until_complete(manager.start_all_extensions())
    app = manager.extension_points["fineinfer_jupyter"].app
    yield app
    jp_asyncio_loop.run_until_complete(asyncio.wait_for(manager.stop_all_extensions(), 60))


async def post_streamed(
    client: SimpleAsyncHTTPClient, url: str, token: str, body: dict, *, timeout: float
) -> tuple[HTTPResponse, list[bytes]]:
    """POST `body` as JSON with the token and collect the response body as the chunks it
    arrived in; errors (a status, a timeout: 599) are returned in the response, not raised."""
    chunks: list[bytes] = []
    response = await client.fetch(
        url,
        method="POST",
        body=json.dumps(body),
        headers={"Authorization": f"token {token}"},
        streaming_callback=chunks.append,
        request_timeout=timeout,
        raise_error=False,
    )
    return response, chunks


class Api:
    """JSON calls to the server's fineinfer routes; errors are returned, not raised."""

    def __init__(self, jp_fetch, app, *, url: str, token: str):
        self.fetch, self.app = jp_fetch, app
        self.url, self.token = url, token  # the server's URL (base_url included) and token
        self.client = SimpleAsyncHTTPClient(force_instance=True, max_clients=64)

    async def stream(self, path: str, body: dict, *, timeout=60.0) -> tuple[int, list[bytes]]:
        """POST and collect the body as the chunks it arrived in (up to 64 at once)."""
        response, chunks = await post_streamed(
            self.client, f"{self.url}{path}", self.token, body, timeout=timeout
        )
        return response.code, chunks

    async def call(self, method: str, path: str, body=None, *, headers=None, **kwargs):
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        if body is None and method in ("POST", "PUT"):
            body = b""
        response: HTTPResponse = await self.fetch(
            *path.split("/"),
            method=method,
            body=body,
            headers=headers,
            raise_error=False,
            **kwargs,
        )
        return response.code, decode(response)

    @staticmethod
    def ndjson(chunks: list[bytes]) -> list[dict]:
        return [json.loads(line) for line in b"".join(chunks).decode().splitlines() if line]

    async def get(self, path, **kwargs):
        return await self.call("GET", f"fineinfer/api/{path}", **kwargs)

    async def post(self, path, body=None, **kwargs):
        return await self.call("POST", f"fineinfer/api/{path}", body, **kwargs)

    async def delete(self, path, **kwargs):
        return await self.call("DELETE", f"fineinfer/api/{path}", **kwargs)

    async def until(self, path, predicate, timeout=READY_TIMEOUT):
        """GET `path` until predicate(json) holds (polling; bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            code, body = await self.get(path)
            if code == 200 and predicate(body):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{path}: condition not met in {timeout} s; last: {code} {body}"
                )
            await asyncio.sleep(0.05)

    async def ready(self):
        return await self.until("status", lambda s: s["state"] == "ready")

    async def generate(self, body: dict, **kwargs) -> list[dict]:
        """The NDJSON events of one generate call (and asserts a 200)."""
        code, events = await self.post("generate", body, **kwargs)
        assert code == 200, events
        return events


def decode(response: HTTPResponse):
    text = response.body.decode() if response.body else ""
    if response.headers.get("Content-Type", "").startswith("application/x-ndjson"):
        return [json.loads(line) for line in text.splitlines() if line]
    return json.loads(text) if text else None


@pytest.fixture
def server_url(jp_http_port, jp_base_url) -> str:
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}"


@pytest.fixture
def token(jp_serverapp) -> str:
    return jp_serverapp.identity_provider.token


@pytest.fixture
def api(jp_fetch, fineinfer, server_url, token) -> Api:
    api = Api(jp_fetch, fineinfer, url=server_url, token=token)
    yield api
    api.client.close()


@pytest.fixture
def ready_api(api, jp_asyncio_loop) -> Api:
    """`api` once the model is ready."""
    jp_asyncio_loop.run_until_complete(api.ready())
    return api
