"""The one place that turns engine exceptions into HTTP errors, and values into strict JSON."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

from tornado.web import HTTPError

TYPES = {
    400: "invalid_request_error",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    429: "queue_full",
    503: "model_loading",
}
FIELD = re.compile(r"^([A-Za-z_][\w.\[\]-]*): ")


class ApiError(HTTPError):
    """An error the client can act on: status, message and the request field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(status, log_message=message.replace("%", "%%"))
        self.message, self.field = message, field


def shown(value: str, limit: int = 80) -> str:
    """repr(value), cut short (as engine.config.shown, without importing the engine)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def error_type(status: int) -> str:
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, field: str | None = None, *, openai=False) -> dict:
    error = {"message": message, "type": error_type(status), "field": field}
    if openai:  # what OpenAI's clients read
        error.update(param=field, code=error["type"])
    return {"error": error}


def field_of(message: str) -> str | None:
    """The engine's ValueErrors read "field: message"; the field is the text before ': '."""
    m = FIELD.match(message)
    return m.group(1) if m else None


def from_exception(
    exc: BaseException, *, conflict: bool = False, data_field: str = "data"
) -> ApiError | None:
    """Map an engine exception to an ApiError (None: not the client's fault, answer 500).

    `conflict`: a plain ValueError means the target is in the wrong state (a job that is not
    running, an adapter under training) rather than bad input, so answer 409, not 400.
    """
    from ..engine import EngineNotReady, LimitReached, NameTaken, QueueFull, UnknownName
    from ..engine.data import DataError

    if isinstance(exc, ApiError):
        return exc
    message = str(exc)
    if isinstance(exc, UnknownName):
        return ApiError(404, message, field_of(message))
    if isinstance(exc, (NameTaken, LimitReached)):
        return ApiError(409, message, field_of(message))
    if isinstance(exc, QueueFull):
        return ApiError(429, message)
    if isinstance(exc, EngineNotReady):
        return ApiError(503, message)
    if isinstance(exc, DataError):
        return ApiError(400, message, data_field)
    if isinstance(exc, ValueError):
        return ApiError(409 if conflict else 400, message, field_of(message))
    return None


@contextmanager
def engine_errors(*, conflict: bool = False, data_field: str = "data") -> Iterator[None]:
    """Re-raise what the engine raises inside the block as ApiErrors (see from_exception)."""
    try:
        yield
    except Exception as e:
        error = from_exception(e, conflict=conflict, data_field=data_field)
        if error is None or error is e:
            raise
        raise error from e


def strict(value):
    """`value` with every NaN or infinity replaced by None (browsers cannot parse them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value) -> str:
    return json.dumps(strict(value), allow_nan=False, separators=(",", ":"))
