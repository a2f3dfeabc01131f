"""The one table from kvrouter's errors to HTTP statuses and OpenAI error bodies.

Every error the gateway answers with has OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": 400}}

and ``AllWorkersBusy`` / ``NoWorkerAvailable`` add a ``Retry-After`` header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvrouter import protocol
from kvrouter.errors import (
    AllWorkersBusy,
    ConfigError,
    InvalidRequest,
    NoWorkerAvailable,
    RequestError,
    RequestTooLarge,
    RouterError,
    UpstreamError,
    UpstreamTimeout,
)

__all__ = [
    "ERROR_TABLE",
    "ErrorMapping",
    "NotFound",
    "error_body",
    "map_error",
    "responses_error_event",
    "sse_error_event",
]


class NotFound(RequestError):
    """An unknown route or worker (HTTP 404)."""

    status = 404


@dataclass(frozen=True, slots=True)
class ErrorMapping:
    """How one error class is answered."""

    status: int
    error_type: str
    retry_after: bool = False


# Most specific first: the first class an error is an instance of wins.
ERROR_TABLE: tuple[tuple[type[BaseException], ErrorMapping], ...] = (
    (NotFound, ErrorMapping(404, "not_found_error")),
    (RequestTooLarge, ErrorMapping(413, "invalid_request_error")),
    (InvalidRequest, ErrorMapping(400, "invalid_request_error")),
    (RequestError, ErrorMapping(400, "invalid_request_error")),
    (ConfigError, ErrorMapping(400, "invalid_request_error")),
    (AllWorkersBusy, ErrorMapping(503, "service_unavailable", retry_after=True)),
    (NoWorkerAvailable, ErrorMapping(503, "service_unavailable", retry_after=True)),
    (UpstreamTimeout, ErrorMapping(504, "upstream_timeout")),
    (UpstreamError, ErrorMapping(502, "upstream_error")),
    (RouterError, ErrorMapping(500, "internal_error")),
)

_INTERNAL = ErrorMapping(500, "internal_error")


def map_error(exc: BaseException) -> ErrorMapping:
    """The :class:`ErrorMapping` of ``exc`` (500 only for errors that are our bug)."""
    for cls, mapping in ERROR_TABLE:
        if isinstance(exc, cls):
            return mapping
    return _INTERNAL


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> bytes:
    """An OpenAI error JSON body (``code`` is the HTTP status)."""
    return protocol.error_body(message, error_type, status, param)


def retry_after_header(exc: BaseException, default_s: float) -> str:
    """The ``Retry-After`` value (whole seconds, at least 1) for a capacity error."""
    seconds = exc.retry_after_s if isinstance(exc, AllWorkersBusy) else default_s
    return str(max(1, math.ceil(seconds)))


def sse_error_event(message: str, error_type: str = "upstream_error", status: int = 502) -> bytes:
    """The SSE frames that end a stream broken after its first byte: an error, then DONE."""
    return b"data: " + error_body(message, error_type, status) + b"\n\ndata: [DONE]\n\n"


def responses_error_event(message: str, status: int = 502) -> bytes:
    """The same for a Responses API stream: its ``error`` event (that API has no DONE)."""
    data = protocol.encode(
        {"type": "error", "code": str(status), "message": message, "param": None}
    )
    return b"event: error\ndata: " + data + b"\n\n"
