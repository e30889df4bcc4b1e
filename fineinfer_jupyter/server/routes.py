"""REST, streaming and WebSocket routes under <base_url>/fineinfer/api/ (docs/api.md)."""

from __future__ import annotations

import time
from pathlib import Path

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import url_path_join
from tornado import web, websocket

from . import validate
from .errors import ApiError, dumps, error_body, shown
from .handlers import FineInferHandler
from .host import EventQueue

API = "fineinfer/api"
RESOURCE = "fineinfer_jupyter"
SLOW_READER_TIMEOUT = 30.0  # seconds an events socket may leave a message unread before closing


class StatusHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:status"

    @web.authenticated
    @authorized
    def get(self):
        self.reply(self.host.status())


class MetricsHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:metrics"

    @web.authenticated
    @authorized
    def get(self):
        engine = self.host.engine or self.host.require()  # 503 while the engine is created
        self.reply(engine.metrics_snapshot())


class GenerateHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:generate"

    @web.authenticated
    @authorized(action="execute")
    async def post(self):
        """NDJSON: one {"type": "delta"} object per piece of text, then "done" or "error"."""
        req = validate.generate_request(self.body)
        engine = self.host.require()
        events = EventQueue()
        stream = await self.host.generate(engine, req, events.put)
        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-cache")
        await self.stream(engine, stream.id, events, lambda e: dumps(e) + "\n")
        self.finish(set_content_type="application/x-ndjson")


class JobsHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:jobs"

    @web.authenticated
    @authorized
    async def get(self):
        engine = self.host.require()
        self.reply({"jobs": await self.host.run(engine.jobs)})

    @web.authenticated
    @authorized(action="execute")
    async def post(self):
        engine = self.host.require()
        req = validate.job_request(self.body, self.host.root_dir)
        params = validate.train_params(req.params)
        with validate.params_errors():
            job = await self.host.run(
                engine.tune,
                req.adapter,
                req.data,
                params,
                columns=req.columns,
                data_field=req.data_field,
            )
        self.set_header("Location", url_path_join(self.base_url, API, "jobs", job["id"]))
        self.reply(job, 201)


class JobHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:jobs"

    @web.authenticated
    @authorized
    async def get(self, job_id: str):
        engine = self.host.require()
        self.reply(await self.host.run(engine.job, validate.job_id(job_id)))


class JobActionHandler(FineInferHandler):
    """POST jobs/<id>/stop | resume | cancel. A job in the wrong state for it: 409."""

    auth_resource = f"{RESOURCE}:jobs"

    @web.authenticated
    @authorized(action="execute")
    async def post(self, job_id: str, action: str):
        engine = self.host.require()
        methods = {
            "stop": engine.stop_job,
            "resume": engine.resume_job,
            "cancel": engine.cancel_job,
        }
        if action not in methods:
            raise ApiError(404, f"no job action {shown(action)}; use stop, resume or cancel")
        self.reply(await self.host.run(methods[action], validate.job_id(job_id), conflict=True))


class JobExportHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:jobs"

    @web.authenticated
    @authorized
    async def post(self, job_id: str):
        """Write the job as a folder that accelerate or torchrun trains again (train.py, its
        tokenized data, an accelerate config, a README), to {"path"} under the root or, without
        one, under the data directory."""
        engine = self.host.require()
        job_id = validate.job_id(job_id)
        path, processes = validate.job_export_request(
            self.body, self.host.root_dir, engine.config.data_dir
        )
        self.reply(await self.host.run(engine.export_job, job_id, path, processes=processes))


class AdaptersHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:adapters"

    @web.authenticated
    @authorized
    async def get(self):
        engine = self.host.require()
        self.reply({"adapters": await self.host.run(engine.list_adapters)})

    @web.authenticated
    @authorized
    async def post(self):
        """Load a saved PEFT adapter folder (under the root directory) under a new name."""
        engine = self.host.require()
        name, path = validate.adapter_load_request(self.body, self.host.root_dir)
        adapter = await self.host.run(engine.load_adapter, name, path)
        self.set_header("Location", url_path_join(self.base_url, API, "adapters", name))
        self.reply(adapter, 201)


class AdapterHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:adapters"

    @web.authenticated
    @authorized
    async def get(self, name: str):
        validate.adapter_name(name, "adapter")
        engine = self.host.require()
        adapters = await self.host.run(engine.list_adapters)
        adapter = next((a for a in adapters if a["name"] == name), None)
        if adapter is None:
            raise ApiError(404, f"adapter: no adapter named {name!r}", "adapter")
        self.reply(adapter)

    @web.authenticated
    @authorized
    async def delete(self, name: str):
        """Unload it, and remove its saved copy in the data directory. Under training: 409."""
        engine = self.host.require()
        validate.adapter_name(name)
        await self.host.run(engine.delete_adapter, name, conflict=True)
        self.set_status(204)
        self.finish()


class AdapterSaveHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:adapters"

    @web.authenticated
    @authorized
    async def post(self, name: str):
        """Write the adapter in PEFT's format to {"path"}: a new folder under the root."""
        engine = self.host.require()
        path = validate.adapter_save_request(self.body, self.host.root_dir, engine.config.data_dir)
        self.reply(await self.host.run(engine.save_adapter, name, path))


class AdapterExportHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:adapters"

    @web.authenticated
    @authorized
    async def post(self, name: str):
        """Export for llama.cpp and Ollama ({"to": "gguf"}) or vLLM ({"to": "vllm"}), to
        {"path"} under the root or, without one, under the data directory."""
        engine = self.host.require()
        validate.adapter_name(name)
        to, path = validate.adapter_export_request(self.body, self.host.root_dir)
        self.reply(await self.host.run(engine.export_adapter, name, to, path))


class AdapterEvalHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:adapters"

    @web.authenticated
    @authorized(action="execute")
    async def post(self, name: str):
        """Held-out loss and perplexity, exact-match and contains rates of greedy answers, of
        the adapter and the models in "compare", side by side (engine/evaluate.py)."""
        engine = self.host.require()
        validate.adapter_name(name)
        req = validate.eval_request(self.body, self.host.root_dir)
        self.reply(
            await self.host.run(
                engine.evaluate,
                name,
                req.data,
                columns=req.columns,
                compare=req.compare,
                limit=req.limit,
                max_new_tokens=req.max_new_tokens,
                data_field=req.data_field,
            )
        )


class EngineRestartHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:engine"

    @web.authenticated
    @authorized(action="execute")
    async def post(self):
        """Shut the engine down and load the model again, without restarting the server (after
        it failed). Running jobs are interrupted (resumable); requests in flight get an error."""
        self.reply(await self.host.restart())


class OpenAPIHandler(FineInferHandler):
    """The OpenAPI 3.1 document of these routes and the OpenAI-compatible ones."""

    auth_resource = f"{RESOURCE}:status"

    @web.authenticated
    @authorized
    def get(self):
        self.set_header("Content-Type", "application/json")
        self.finish(openapi_document())


def openapi_document() -> bytes:
    """docs/openapi.json: packaged next to this file in a wheel, read from docs/ in a checkout."""
    here = Path(__file__).parent
    for path in (here / "openapi.json", here.parents[1] / "docs" / "openapi.json"):
        if path.is_file():
            return path.read_bytes()
    raise ApiError(404, "the OpenAPI document is not installed")


class EventsHandler(
    WebSocketMixin, ExtensionHandlerMixin, JupyterHandler, websocket.WebSocketHandler
):
    """WebSocket: {"type": "metrics"} about twice a second, {"type": "jobs"} as they come.

    WebSocketMixin: an unauthenticated upgrade is a 403 (not a redirect to the login page), the
    Origin must match the Host (or the server's allow_origin), and the server pings
    (`ws_ping_interval` in tornado_settings, 30 s by default) and closes a socket whose pongs
    stop. A reader that falls behind gets the newest message of each kind, not a backlog.
    """

    auth_resource = f"{RESOURCE}:events"
    _writing = None  # the last write's future: done once the OS has the bytes
    _since = 0.0  # when the socket last caught up
    dropped = 0  # stale messages replaced by newer ones before they were sent

    async def pre_get(self):
        user = self.current_user
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, user, "read", self.auth_resource)
        )
        if not allowed:
            raise web.HTTPError(403)

    @ws_authenticated
    async def get(self, *args, **kwargs):
        await self.pre_get()
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            self.set_status(400)  # (tornado's own answer is plain text)
            self.set_header("Content-Type", "application/json")
            message = "events is a WebSocket: connect with an Upgrade: websocket request"
            self.finish(dumps(error_body(400, message)))
            return
        res = super().get(*args, **kwargs)
        if res is not None:
            await res

    @property
    def host(self):
        return self.extensionapp.host

    def open(self, *args, **kwargs):
        self._latest: dict[str, str] = {}
        self._since = time.monotonic()
        super().open(*args, **kwargs)  # starts the pings
        self.host.subscribe(self)

    def on_message(self, message):
        pass  # nothing to say to the server: the socket only listens

    def on_close(self):
        if self.ping_callback is not None:
            self.ping_callback.stop()
        self.host.unsubscribe(self)

    def send(self, kind: str, text: str) -> None:
        """Queue `text` as the newest message of its kind; write when the last write is out."""
        if kind in self._latest:
            self.dropped += 1
        self._latest[kind] = text
        now = time.monotonic()
        if self._writing is not None and not self._writing.done():
            if now - self._since > SLOW_READER_TIMEOUT:
                self.log.warning("fineinfer: closing an events socket that stopped reading")
                self.host.unsubscribe(self)
                self.close(1008, "not reading")
            return
        self._since = now
        try:
            for message in self._latest.values():
                self._writing = self.write_message(message)
        except websocket.WebSocketClosedError:
            self.host.unsubscribe(self)
        self._latest.clear()


def handlers() -> list[tuple[str, type]]:
    name = r"([^/]+)"
    routes = [
        ("status", StatusHandler),
        ("metrics", MetricsHandler),
        ("generate", GenerateHandler),
        ("jobs", JobsHandler),
        (f"jobs/{name}", JobHandler),
        (f"jobs/{name}/export", JobExportHandler),  # before the actions: the same pattern
        (f"jobs/{name}/{name}", JobActionHandler),
        ("adapters", AdaptersHandler),
        (f"adapters/{name}", AdapterHandler),
        (f"adapters/{name}/save", AdapterSaveHandler),
        (f"adapters/{name}/export", AdapterExportHandler),
        (f"adapters/{name}/eval", AdapterEvalHandler),
        ("events", EventsHandler),
        ("engine/restart", EngineRestartHandler),
        ("openapi.json", OpenAPIHandler),
    ]
    return [(url_path_join("/", API, path), handler) for path, handler in routes]
