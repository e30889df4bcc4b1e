"""OpenAI-compatible routes under <base_url>/fineinfer/v1/: models, chat/completions, completions.

`model` names the base model ("base" or its name, as /models lists it) or an adapter. Clients
authenticate with `Authorization: Bearer <server token>` (Jupyter accepts it like `token ...`),
so the official client works with `api_key=<token>`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from . import validate
from .errors import ApiError, dumps, error_body, shown
from .handlers import FineInferHandler
from .host import EventQueue

SEED_MAX = 2**64 - 1  # engine.config.SEED_MAX

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
        models = [{"id": "base", **card, "parent": None}, {"id": base, **card, "parent": None}]
        models += [{"id": name, **card, "parent": base} for name in adapters]  # no snapshots
        self.reply({"object": "list", "data": models})


class HealthHandler(OpenAIHandler):
    """GET health: 200 {"status": "ok"} once the model is ready, else the 503 other routes
    give (as llama.cpp's server answers /health; vLLM's answers 200 with no body)."""

    @web.authenticated
    @authorized
    def get(self):
        self.host.require()
        self.reply({"status": "ok"})


class CompletionsHandler(OpenAIHandler):
    chat = False

    @web.authenticated
    @authorized(action="execute")
    async def post(self):
        req = validate.openai_request(self.body, chat=self.chat)
        engine = self.host.require()
        req.adapter = self.adapter_for(engine, req.model)
        choices = [(p, j) for p in req.prompts for j in range(req.n)]  # OpenAI's order
        events = EventQueue(len(choices))
        ids = []
        try:
            for index, (prompt, j) in enumerate(choices):
                one = replace(req, prompt=prompt, sampling=choice_sampling(req.sampling, j))
                tagged = partial(tag, events.put, index)
                ids.append((await self.host.generate(engine, one, tagged)).id)
        except BaseException as e:  # one prompt refused (too long, ...): none of them runs
            for request_id in ids:
                engine.cancel(request_id)
            if isinstance(e, ApiError) and e.field == "prompt" and len(req.prompts) > 1:
                where = f"prompt[{index // req.n}]"  # which prompt of the list
                raise ApiError(e.status_code, where + e.message[6:], where) from None
            raise
        answer = Answer(self.chat, ids[0], req, choices)
        if req.stream:
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            await self.stream(engine, ids, events, answer.sse)
            self.finish(set_content_type="text/event-stream")
            return
        await self.stream(engine, ids, events, answer.collect, live=False)
        if self._gone:
            return
        if answer.error is not None:
            raise ApiError(500, answer.error)
        self.reply(answer.whole())


class ChatCompletionsHandler(CompletionsHandler):
    chat = True


def tag(put, index: int, event: dict) -> None:
    put({**event, "index": index})


def choice_sampling(sampling: dict, j: int) -> dict:
    """The j-th choice of a prompt: a seed of its own (seed + j), so n choices differ."""
    seed = sampling.get("seed")
    if seed is None or j == 0:
        return sampling
    return {**sampling, "seed": seed + j if seed + j <= SEED_MAX else seed - j}


class Choice:
    """One choice of an answer: its text, logprobs and end, as its events come in."""

    def __init__(self, index: int, prompt):
        self.index = index
        self.prompt_text = prompt if isinstance(prompt, str) else None  # (ids: from the engine)
        self.texts: list[str] = []
        self.entries: list[dict] = []  # logprobs of the tokens given out so far
        self.offset = 0  # characters of text already given out (for text_offset)
        self.sampled = 0  # entries of sampled tokens that came with deltas
        self.final: dict | None = None
        self.sent_role = False


class Answer:
    """OpenAI's shapes for one request: SSE chunks while streaming, or the whole answer."""

    def __init__(self, chat: bool, request_id: str, req, choices: list):
        self.chat, self.model, self.include_usage = chat, req.model, req.include_usage
        self.n = req.n
        self.logprobs = req.sampling.get("logprobs")
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.choices = [Choice(i, prompt) for i, (prompt, _) in enumerate(choices)]
        self.error: str | None = None

    def collect(self, event: dict) -> str:
        choice = self.choices[event["index"]]
        if event["type"] == "delta":
            text, entries = self.take(choice, event)
            choice.texts.append(text)
            choice.entries += entries
        elif event["type"] == "done":
            choice.final = event
            choice.entries += self.rest(choice, event)
        else:
            self.error = event["message"]
        return ""

    def take(self, choice: Choice, event: dict) -> tuple[str, list[dict]]:
        """The text and logprob entries a delta event adds (the echoed prompt first)."""
        text, entries = event["text"], event.get("logprobs", [])
        choice.sampled += len(entries)
        if "prompt_logprobs" in event:  # the prompt, echoed: before any token
            if choice.prompt_text is None:
                choice.prompt_text = event["prompt_text"]
            text = choice.prompt_text + text
            if self.logprobs is not None:
                entries = event["prompt_logprobs"] + entries
        return text, entries

    def rest(self, choice: Choice, event: dict) -> list[dict]:
        """Logprob entries of tokens whose text never streamed (held back, cut at a stop)."""
        return event.get("logprobs", [])[choice.sampled :] if self.logprobs is not None else []

    def whole(self) -> dict:
        out = []
        for c in self.choices:
            text, finish = "".join(c.texts), FINISH.get(c.final["finish_reason"], "stop")
            if self.chat:
                choice = {"index": c.index, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": c.index, "text": text}
            logprobs = self.shape(c, c.entries) if self.logprobs is not None else None
            out.append({**choice, "logprobs": logprobs, "finish_reason": finish})
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": out,
            "usage": self.usage(),
        }

    def shape(self, choice: Choice, entries: list[dict]) -> dict:
        """Entries in OpenAI's shape: chat's content list, or the legacy four lists."""
        if self.chat:
            return {"content": [chat_entry(e, top=True) for e in entries]}
        offsets = []
        for e in entries:
            offsets.append(choice.offset)
            choice.offset += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                None if e["logprob"] is None else {a["token"]: a["logprob"] for a in e["top"]}
                for e in entries
            ],
            "text_offset": offsets,
        }

    def usage(self) -> dict:
        finals = [c.final for c in self.choices if c.final is not None]
        prompts = finals[:: self.n]  # a prompt counts once, whatever its n
        out = {
            "prompt_tokens": sum(f["usage"]["prompt_tokens"] for f in prompts),
            "completion_tokens": sum(f["usage"]["completion_tokens"] for f in finals),
        }
        out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
        cached = sum(f["usage"]["prompt_tokens_details"]["cached_tokens"] for f in prompts)
        out["prompt_tokens_details"] = {"cached_tokens": cached}  # prefix cache (design.md S1)
        return out

    def sse(self, event: dict) -> str:
        if self.error is not None:  # the stream ended at a choice's error
            return ""
        choice = self.choices[event["index"]]
        if event["type"] == "delta":
            text, entries = self.take(choice, event)
            chunks = [self.chunk(choice, text, None, entries)] if text or entries else []
        elif event["type"] == "done":
            choice.final = event
            finish = FINISH.get(event["finish_reason"], "stop")
            chunks = [self.chunk(choice, None, finish, self.rest(choice, event))]
            if self.include_usage and all(c.final is not None for c in self.choices):
                chunks.append({**self.chunk(choice, None, None, []), "choices": [],
                               "usage": self.usage()})  # fmt: skip
        else:
            self.error = event["message"]
            chunks = [error_body(500, event["message"], openai=True)]
        lines = [f"data: {dumps(c)}\n\n" for c in chunks]
        last = event["type"] != "delta" and all(c.final for c in self.choices)
        return "".join(lines) + ("data: [DONE]\n\n" if last or event["type"] == "error" else "")

    def chunk(self, choice: Choice, text: str | None, finish: str | None, entries) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if not choice.sent_role:
                delta, choice.sent_role = {"role": "assistant", **delta}, True
            body = {"index": choice.index, "delta": delta}
        else:
            body = {"index": choice.index, "text": text or ""}
        logprobs = None
        if self.logprobs is not None and entries:
            logprobs = self.shape(choice, entries)
        out = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{**body, "logprobs": logprobs, "finish_reason": finish}],
        }
        if self.include_usage:
            out["usage"] = None
        return out


def chat_entry(e: dict, *, top: bool) -> dict:
    out = {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode())}
    if top:
        out["top_logprobs"] = [chat_entry(a, top=False) for a in e["top"]]
    return out


def handlers() -> list[tuple[str, type]]:
    routes = [
        ("models", ModelsHandler),
        ("chat/completions", ChatCompletionsHandler),
        ("completions", CompletionsHandler),
        ("health", HealthHandler),
    ]
    return [(url_path_join("/fineinfer/v1", path), handler) for path, handler in routes] + [
        ("/fineinfer/health", HealthHandler)  # where a probe of <base_url without /v1>/health goes
    ]
