"""REST, streaming and WebSocket routes under <base_url>/fineinfer/api/ (docs/api.md)."""

from __future__ import annotations

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import url_path_join
from tornado import web, websocket

from . import validate
from .errors import ApiError, dumps
from .handlers import FineInferHandler
from .host import EventQueue

API = "fineinfer/api"
RESOURCE = "fineinfer_jupyter"


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
        req = validate.generate_request(self.request.body)
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
        req = validate.job_request(self.request.body, self.host.root_dir)
        params = validate.train_params(req.params)
        job = await self.host.run(
            engine.tune, req.adapter, req.data, params, data_field=req.data_field
        )
        self.set_header("Location", url_path_join(self.base_url, API, "jobs", job["id"]))
        self.reply(job, 201)


class JobHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:jobs"

    @web.authenticated
    @authorized
    async def get(self, job_id: str):
        engine = self.host.require()
        self.reply(await self.host.run(engine.job, job_id))


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
            raise ApiError(404, f"no job action {action!r}; use stop, resume or cancel")
        self.reply(await self.host.run(methods[action], job_id, conflict=True))


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
        name, path = validate.adapter_load_request(self.request.body, self.host.root_dir)
        adapter = await self.host.run(engine.load_adapter, name, path)
        self.set_header("Location", url_path_join(self.base_url, API, "adapters", name))
        self.reply(adapter, 201)


class AdapterHandler(FineInferHandler):
    auth_resource = f"{RESOURCE}:adapters"

    @web.authenticated
    @authorized
    async def get(self, name: str):
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
        path = validate.adapter_save_request(self.request.body, self.host.root_dir)
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
        to, path = validate.adapter_export_request(self.request.body, self.host.root_dir)
        self.reply(await self.host.run(engine.export_adapter, name, to, path))


class EventsHandler(ExtensionHandlerMixin, JupyterHandler, websocket.WebSocketHandler):
    """WebSocket: {"type": "metrics"} about twice a second, {"type": "jobs"} as they come."""

    auth_resource = f"{RESOURCE}:events"

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
        res = super().get(*args, **kwargs)
        if res is not None:
            await res

    @property
    def host(self):
        return self.extensionapp.host

    def open(self):
        self.host.subscribe(self)

    def on_message(self, message):
        pass  # nothing to say to the server: the socket only listens

    def on_close(self):
        self.host.unsubscribe(self)

    def send(self, text: str) -> None:
        try:
            self.write_message(text)
        except websocket.WebSocketClosedError:
            self.host.unsubscribe(self)


def handlers() -> list[tuple[str, type]]:
    name = r"([^/]+)"
    routes = [
        ("status", StatusHandler),
        ("metrics", MetricsHandler),
        ("generate", GenerateHandler),
        ("jobs", JobsHandler),
        (f"jobs/{name}", JobHandler),
        (f"jobs/{name}/{name}", JobActionHandler),
        ("adapters", AdaptersHandler),
        (f"adapters/{name}", AdapterHandler),
        (f"adapters/{name}/save", AdapterSaveHandler),
        (f"adapters/{name}/export", AdapterExportHandler),
        ("events", EventsHandler),
    ]
    return [(url_path_join("/", API, path), handler) for path, handler in routes]
