"""The events WebSocket (403 without a login, pings, bounded buffering) and XSRF for cookie logins,
on a real jupyter_server."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from http.cookies import SimpleCookie

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from fineinfer_jupyter.server import host as host_module
from fineinfer_jupyter.server import routes

pytest_plugins = ["pytest_jupyter.jupyter_server", "server_fixtures"]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def login_required(jp_server_config):
    """As JupyterLab runs by default from jupyter_server 3: no route is open without a login."""
    jp_server_config.ServerApp.allow_unauthenticated_access = False


@pytest.fixture
def fast_pings(jp_server_config):
    jp_server_config.ServerApp.tornado_settings = {"ws_ping_interval": 200}  # ms


def events_url(server_url: str) -> str:
    return server_url.replace("http://", "ws://") + "fineinfer/api/events"


async def upgrade(url: str, headers: dict) -> int:
    """The status an events upgrade gets (101 when it opens)."""
    try:
        socket_ = await websocket_connect(HTTPRequest(url, headers=headers))
    except HTTPClientError as e:
        return e.code
    socket_.close()
    return 101


async def login_cookie(api) -> str:
    """The login cookie jupyter_server sets on a token-authenticated request."""
    response = await api.client.fetch(
        f"{api.url}fineinfer/api/status", headers={"Authorization": f"token {api.token}"}
    )
    cookies = SimpleCookie()
    for header in response.headers.get_list("Set-Cookie"):
        cookies.load(header)
    login = "; ".join(f"{k}={v.value}" for k, v in cookies.items())
    assert login.startswith("username-")
    return login


async def test_an_events_upgrade_without_login_or_from_another_origin_is_a_403(
    login_required, api, server_url, token, jp_http_port
):
    url = events_url(server_url)
    host = f"127.0.0.1:{jp_http_port}"
    assert await upgrade(url, {}) == 403  # not a 302 to the login page
    assert await upgrade(url, {"Authorization": "token wrong"}) == 403
    login = await login_cookie(api)
    # a page on another site opening the socket with the browser's cookie
    evil = {"Cookie": login, "Origin": "http://evil.example", "Host": host}
    assert await upgrade(url, evil) == 403
    assert await upgrade(url, {**evil, "Origin": f"http://{host}"}) == 101
    # a token is proof enough (another site cannot know it): jupyter_server skips the origin check
    assert await upgrade(url, {"Authorization": f"token {token}", "Origin": evil["Origin"]}) == 101
    code, answer = await api.get("status", headers={"Authorization": ""})
    assert (code, answer["error"]["type"]) == (403, "forbidden")  # REST: 403 too, no redirect


async def test_the_server_pings_every_events_socket(fast_pings, api, jp_ws_fetch):
    pings = []
    socket_ = await jp_ws_fetch("fineinfer", "api", "events")
    socket_.on_ping = pings.append
    deadline = time.monotonic() + 10
    while len(pings) < 3 and time.monotonic() < deadline:
        await asyncio.wait_for(socket_.read_message(), 10)
    socket_.close()
    assert len(pings) >= 3


async def test_events_sockets_ping_every_30_s_unless_configured(api, jp_ws_fetch):
    socket_ = await jp_ws_fetch("fineinfer", "api", "events")
    await asyncio.wait_for(socket_.read_message(), 10)
    (handler,) = api.app.host.sockets
    assert (handler.ping_interval, handler.ping_timeout) == (30_000, 90_000)  # ms
    assert handler.ping_callback.is_running()
    socket_.close()


async def test_a_reader_that_stops_reading_costs_one_message_of_buffer_then_is_closed(
    ready_api, jp_http_port, jp_base_url, token, monkeypatch
):
    host = ready_api.app.host
    engine = host.engine
    snapshot, pad = engine.metrics_snapshot, "x" * (1 << 20)
    monkeypatch.setattr(engine, "metrics_snapshot", lambda: {**snapshot(), "pad": pad})
    monkeypatch.setattr(host_module, "EVENTS_INTERVAL", 0.05)  # 20 MB/s if it all queued up
    monkeypatch.setattr(routes, "SLOW_READER_TIMEOUT", 3.0)
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, ("127.0.0.1", jp_http_port))
    await loop.sock_sendall(
        client,
        (
            f"GET {jp_base_url}fineinfer/api/events HTTP/1.1\r\nHost: 127.0.0.1:{jp_http_port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: token {token}\r\n\r\n"
        ).encode(),
    )
    head = await asyncio.wait_for(loop.sock_recv(client, 12), 10)
    assert head == b"HTTP/1.1 101"
    while not host.sockets:
        await asyncio.sleep(0.01)
    (handler,) = host.sockets
    stream = handler.ws_connection.stream
    start, peak = time.monotonic(), 0
    while handler in host.sockets and time.monotonic() - start < 15:  # never read again
        peak = max(peak, len(stream._write_buffer))
        await asyncio.sleep(0.01)
    closed_after = time.monotonic() - start
    assert 3.0 <= closed_after < 5.0, closed_after
    assert handler.dropped >= 30  # stale snapshots replaced, not queued
    assert 0 < peak < 2 * len(pad) + 65536, peak  # one message in flight, at most two
    while True:  # the server ends the connection: what the kernels held, then EOF
        try:
            if not await asyncio.wait_for(loop.sock_recv(client, 1 << 16), 15):
                break
        except ConnectionResetError:
            break
    client.close()
    assert stream.closed()
    monkeypatch.undo()
    assert (await ready_api.get("status"))[0] == 200


async def test_cookie_logins_need_the_xsrf_token_for_anything_but_reading(ready_api):
    """jupyter_server's APIHandler: a token in the request is enough; a login cookie alone (what
    a browser sends, also from another site's page) must come with the _xsrf cookie's value in
    X-XSRFToken, which another site cannot read."""
    api = ready_api
    login = await login_cookie(api)

    async def call(method, path, body=None, **headers):
        response = await api.client.fetch(
            f"{api.url}fineinfer/{path}",
            method=method,
            body=None if body is None else json.dumps(body),
            headers=headers,
            raise_error=False,
        )
        return response.code, json.loads(response.body or "null")

    assert (await call("GET", "api/status", Cookie=login))[0] == 200
    body = {"prompt": "Hi", "max_new_tokens": 2}
    missing = {
        "error": {
            "message": "'_xsrf' argument missing from POST",
            "type": "forbidden",
            "field": None,
        }
    }
    assert await call("POST", "api/generate", body, Cookie=login) == (403, missing)
    wrong = {"Cookie": f"{login}; _xsrf=abc", "X-XSRFToken": "abd"}
    code, answer = await call("POST", "api/generate", body, **wrong)
    assert (code, answer["error"]["message"]) == (403, "XSRF cookie does not match POST argument")
    chat = {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}
    assert (await call("POST", "v1/chat/completions", chat, Cookie=login))[0] == 403
    assert (await call("DELETE", "api/adapters/herb", Cookie=login))[0] == 403
    right = {"Cookie": f"{login}; _xsrf=abc", "X-XSRFToken": "abc"}
    code, events = await call("POST", "api/generate", body, **right)
    assert code == 200
    evil = {**right, "Origin": "http://evil.example"}  # another site's page, cookies and all
    code, answer = await call("POST", "api/generate", body, **evil)
    assert (code, answer["error"]["type"]) == (404, "not_found")
    token_only = {"Authorization": f"token {api.token}"}
    assert (await call("POST", "api/generate", body, **token_only))[0] == 200
