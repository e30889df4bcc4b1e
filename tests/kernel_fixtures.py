"""Helpers for the kernel and notebook tests: a real jupyter_server with the extension and the
tiny model, a real ipykernel that knows it, and a fake HTTP server for the client's unit tests."""

from __future__ import annotations

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from fineinfer_jupyter.kernel import FineInferClient
from fineinfer_jupyter.launch import JupyterProcess

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SMALL = [
    {"prompt": "Color of moonveil?", "completion": "Silver blue."},
    {"prompt": "Where grows glimmerroot?", "completion": "In caves."},
    {"prompt": "When does vesperine bloom?", "completion": "At dusk."},
    {"prompt": "Is ashbloom safe?", "completion": "No, it burns."},
]


@pytest.fixture(scope="session")
def server_root(tmp_path_factory):
    """The server's root: the demo notebook, its data, and a small data set."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(NOTEBOOKS / "data", root / "data")
    shutil.copy(NOTEBOOKS / "demo.ipynb", root / "demo.ipynb")
    lines = "".join(json.dumps(r) + "\n" for r in SMALL)
    (root / "data" / "small.jsonl").write_text(lines)
    return root


@pytest.fixture(scope="session")
def fineinfer_server(server_root, tmp_path_factory):
    """A real jupyter_server with the extension on the tiny model, in a subprocess."""
    base = tmp_path_factory.mktemp("jupyter_server")
    with JupyterProcess(server_root, model="tiny", base=base) as server:
        try:
            server.wait_ready(120)
        except RuntimeError as e:  # exited, failed to load, or too slow
            pytest.fail(str(e))
        yield server


@pytest.fixture(scope="session")
def client(fineinfer_server):
    """The test's own client of that server (not the kernel's)."""
    return FineInferClient(fineinfer_server.url, fineinfer_server.token)


@pytest.fixture(scope="session")
def kernel(fineinfer_server, server_root):
    """One ipykernel for the magic tests, started in the server root with the server's env."""
    k = Kernel({**os.environ, **fineinfer_server.env}, cwd=server_root)
    k.run("%load_ext fineinfer_jupyter")
    yield k
    k.shutdown()


@pytest.fixture
def new_kernel():
    """Start extra kernels: new_kernel(env, cwd); all are shut down after the test."""
    started = []

    def start(env: dict, cwd) -> Kernel:
        started.append(Kernel(env, cwd))
        return started[-1]

    yield start
    for k in started:
        k.shutdown()


class Kernel:
    def __init__(self, env: dict, cwd):
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env, cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60) -> Run:
        """Execute `code`; every iopub message of the request, until the kernel is idle."""
        messages: list[dict] = []
        reply = self.kc.execute_interactive(
            code, output_hook=messages.append, timeout=timeout, allow_stdin=False
        )
        run = Run(messages)
        assert reply["content"]["status"] == "ok", run.stderr + str(reply["content"])
        return run

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


class Run:
    """The iopub messages one execution produced."""

    def __init__(self, messages: list[dict]):
        self.messages = messages

    def of(self, *types: str) -> list[dict]:
        return [m["content"] for m in self.messages if m["msg_type"] in types]

    def _stream(self, name: str) -> str:
        return "".join(c["text"] for c in self.of("stream") if c["name"] == name)

    @property
    def stdout(self) -> str:
        return self._stream("stdout")

    @property
    def stderr(self) -> str:
        return self._stream("stderr")

    @property
    def errors(self) -> list[dict]:
        return self.of("error")

    def widget_updates(self, key: str) -> list:
        """Values of `key` sent in widget state updates (comm messages)."""
        out = []
        for c in self.of("comm_msg"):
            state = c.get("data", {}).get("state", {})
            if c.get("data", {}).get("method") == "update" and key in state:
                out.append(state[key])
        return out


class FakeServer:
    """A stdlib HTTP server answering /fineinfer/api/<path> from `routes`.

    routes[(method, path)] is (status, json_body), or a callable(handler) that writes the reply.
    Every request is recorded as (method, path, headers, json_body).
    """

    def __init__(self):
        self.routes: dict = {}
        self.requests: list = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                path = self.path.split("/fineinfer/api/", 1)[-1]
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests.append(
                    (self.command, path, dict(self.headers), json.loads(raw) if raw else None)
                )
                route = fake.routes.get((self.command, path))
                if route is None:
                    return self.reply(404, b"<html>not found</html>", "text/html")
                if callable(route):
                    return route(self)
                status, body = route
                self.reply(status, json.dumps(body).encode())

            def reply(self, status, data: bytes, kind="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    server = FakeServer()
    yield server
    server.close()
