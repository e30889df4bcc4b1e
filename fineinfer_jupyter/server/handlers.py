"""The base of every fineinfer HTTP handler: JSON replies, JSON errors, streamed answers."""

from __future__ import annotations

from collections.abc import Callable
from http.client import responses

from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, stream_request_body

from .errors import ApiError, dumps, error_body
from .host import EngineHost, EventQueue


@stream_request_body
class FineInferHandler(ExtensionHandlerMixin, APIHandler):
    """Bodies are read as they arrive and kept only up to `max_request_bytes`: a larger one is a
    413 (at once when Content-Length announces it), never a buffer of its full size."""

    openai = False  # error bodies also carry OpenAI's "param" and "code"
    _cancel: Callable[[], object] | None = None  # cancels the request being streamed
    _gone = False  # the client closed the connection
    _received = 0  # body bytes that arrived

    @property
    def host(self) -> EngineHost:
        return self.extensionapp.host

    @property
    def max_body(self) -> int:
        return self.extensionapp.max_request_bytes

    async def prepare(self):
        self._chunks: list[bytes] = []
        await super().prepare()
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise self._too_large()

    def data_received(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received <= self.max_body:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    @property
    def body(self) -> bytes:
        if self._received > self.max_body:
            raise self._too_large()
        return b"".join(self._chunks)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"body: larger than this server takes ({self.max_body} bytes)", "body")

    def reply(self, value, status: int = 200) -> None:
        self.set_status(status)
        self.finish(dumps(value))

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        field = None
        if isinstance(exc, ApiError):
            message, field = exc.message, exc.field
        elif isinstance(exc, HTTPError):
            message = exc.log_message or responses.get(status_code, "error")
            if exc.args:
                message = message % exc.args
        else:  # a bug, not the client's fault; the traceback is in the server log
            message = f"internal error ({type(exc).__name__}); see the server log"
        if status_code in (429, 503):
            self.set_header("Retry-After", "1")
        message = self.host.redact(message)
        self.finish(dumps(error_body(status_code, message, field, openai=self.openai)))

    async def stream(self, engine, stream_id: str | list[str], events: EventQueue, render, *,
                     live=True):  # fmt: skip
        """Write each batch of a request's events as `render(event)` text, flushing each batch
        (with `live`, the headers go out at once, before the first token). `stream_id` may list
        several requests (an OpenAI answer's choices), whose events `events` merges.

        A client that goes away (on_connection_close, or a write that fails) cancels the
        requests in the engine, and so does any other way out before the final events.
        """
        ids = [stream_id] if isinstance(stream_id, str) else stream_id
        self._cancel = lambda: [engine.cancel(i) for i in ids]
        done = False
        try:
            if self._gone:  # went away while the request was being queued
                raise StreamClosedError()
            if live:
                await self.flush()
            async for batch in events.batches():
                done = events.open == 0
                if batch[-1]["type"] == "error":
                    batch[-1] = {**batch[-1], "message": self.host.redact(batch[-1]["message"])}
                chunk = "".join(render(e) for e in batch)
                if chunk:
                    self.write(chunk)
                    await self.flush()
        except StreamClosedError:
            pass
        finally:
            self._cancel = None
            if not done:
                for i in ids:
                    engine.cancel(i)

    def on_connection_close(self) -> None:
        self._gone = True
        if self._cancel is not None:
            self._cancel()
        super().on_connection_close()
