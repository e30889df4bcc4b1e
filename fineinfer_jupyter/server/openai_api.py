"""OpenAI-compatible routes under <base_url>/fineinfer/v1/: models, chat/completions, completions.

`model` names the base model ("base" or its name, as /models lists it) or an adapter. Clients
authenticate with `Authorization: Bearer <server token>` (Jupyter accepts it like `token ...`),
so the official client works with `api_key=<token>`.
"""

from __future__ import annotations

import time

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from . import validate
from .errors import ApiError, dumps, error_body, shown
from .handlers import FineInferHandler
from .host import EventQueue

FINISH = {"stop": "stop", "eos": "stop", "length": "length", "context": "length"}


class OpenAIHandler(FineInferHandler):
    openai = True
    auth_resource = "fineinfer_jupyter:openai"

    def models(self, engine) -> tuple[str, list[str]]:
        status = engine.status()
        return status["model"]["name"], status["adapters"]

    def adapter_for(self, engine, model: str) -> str | None:
        base, adapters = self.models(engine)
        if model in ("base", base):
            return None
        if model in adapters:
            return model
        known = ", ".join(["base", base, *adapters])
        raise ApiError(404, f"model: no model named {shown(model)} (known: {known})", "model")


class ModelsHandler(OpenAIHandler):
    @web.authenticated
    @authorized
    def get(self):
        engine = self.host.require()
        base, adapters = self.models(engine)
        created = int(self.host.started)
        card = {"object": "model", "created": created, "owned_by": "fineinfer", "root": base}
        models = [{"id": base, **card, "parent": None}]
        models += [{"id": name, **card, "parent": base} for name in adapters]
        self.reply({"object": "list", "data": models})


class CompletionsHandler(OpenAIHandler):
    chat = False

    @web.authenticated
    @authorized(action="execute")
    async def post(self):
        req = validate.openai_request(self.body, chat=self.chat)
        engine = self.host.require()
        req.adapter = self.adapter_for(engine, req.model)
        events = EventQueue()
        stream = await self.host.generate(engine, req, events.put)
        answer = Answer(self.chat, stream.id, req.model, include_usage=req.include_usage)
        if req.stream:
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            await self.stream(engine, stream.id, events, answer.sse)
            self.finish(set_content_type="text/event-stream")
            return
        await self.stream(engine, stream.id, events, answer.collect, live=False)
        if self._gone:
            return
        if answer.error is not None:
            raise ApiError(500, answer.error)
        self.reply(answer.whole())


class ChatCompletionsHandler(CompletionsHandler):
    chat = True


class Answer:
    """OpenAI's shapes for one request: SSE chunks while streaming, or the whole answer."""

    def __init__(self, chat: bool, request_id: str, model: str, *, include_usage: bool):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.texts: list[str] = []
        self.final: dict | None = None
        self.error: str | None = None
        self.sent_role = False

    def collect(self, event: dict) -> str:
        if event["type"] == "delta":
            self.texts.append(event["text"])
        elif event["type"] == "done":
            self.final = event
        else:
            self.error = event["message"]
        return ""

    def whole(self) -> dict:
        text, finish = "".join(self.texts), FINISH.get(self.final["finish_reason"], "stop")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{**choice, "logprobs": None, "finish_reason": finish}],
            "usage": usage(self.final),
        }

    def sse(self, event: dict) -> str:
        if event["type"] == "delta":
            chunks = [self.chunk(event["text"], None)]
        elif event["type"] == "done":
            chunks = [self.chunk(None, FINISH.get(event["finish_reason"], "stop"))]
            if self.include_usage:
                chunks.append({**self.chunk(None, None), "choices": [], "usage": usage(event)})
        else:
            chunks = [error_body(500, event["message"], openai=True)]
        lines = [f"data: {dumps(c)}\n\n" for c in chunks]
        return "".join(lines) + ("data: [DONE]\n\n" if event["type"] != "delta" else "")

    def chunk(self, text: str | None, finish: str | None) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if not self.sent_role:
                delta, self.sent_role = {"role": "assistant", **delta}, True
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        out = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{**choice, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            out["usage"] = None
        return out


def usage(final: dict) -> dict:
    u = final["usage"]
    total = u["prompt_tokens"] + u["completion_tokens"]
    return {**u, "total_tokens": total}


def handlers() -> list[tuple[str, type]]:
    routes = [
        ("models", ModelsHandler),
        ("chat/completions", ChatCompletionsHandler),
        ("completions", CompletionsHandler),
    ]
    return [(url_path_join("/fineinfer/v1", path), handler) for path, handler in routes]
