"""The one mapping from kvrouter errors to HTTP statuses and OpenAI error bodies."""

from __future__ import annotations

import json

import pytest

from kvrouter.errors import (
    AllWorkersBusy,
    ConfigError,
    DecodeError,
    InvalidRequest,
    NoWorkerAvailable,
    RequestTooLarge,
    UpstreamError,
    UpstreamTimeout,
)
from kvrouter.gateway.http_errors import (
    NotFound,
    error_body,
    map_error,
    retry_after_header,
    sse_error_event,
)
from kvrouter.gateway.proxy import UpstreamFailure


@pytest.mark.parametrize(
    ("exc", "status", "error_type", "retry_after"),
    [
        (InvalidRequest("x"), 400, "invalid_request_error", False),
        (ConfigError("x"), 400, "invalid_request_error", False),
        (RequestTooLarge("x"), 413, "invalid_request_error", False),
        (NotFound("x"), 404, "not_found_error", False),
        (AllWorkersBusy("x", retry_after_s=2.5), 503, "service_unavailable", True),
        (NoWorkerAvailable("x"), 503, "service_unavailable", True),
        (UpstreamError("x"), 502, "upstream_error", False),
        (UpstreamFailure("x", retryable=True, worker_down=True), 502, "upstream_error", False),
        (UpstreamTimeout("x"), 504, "upstream_timeout", False),
        (DecodeError("x"), 500, "internal_error", False),
        (KeyError("x"), 500, "internal_error", False),
    ],
)
def test_mapping_table(exc: BaseException, status: int, error_type: str, retry_after: bool) -> None:
    mapping = map_error(exc)
    assert (mapping.status, mapping.error_type, mapping.retry_after) == (
        status,
        error_type,
        retry_after,
    )


def test_error_body_is_openai_shaped() -> None:
    body = json.loads(error_body("bad field", "invalid_request_error", 400))
    assert body == {
        "error": {
            "message": "bad field",
            "type": "invalid_request_error",
            "param": None,
            "code": 400,
        }
    }


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert retry_after_header(AllWorkersBusy("busy", retry_after_s=2.2), 1.0) == "3"
    assert retry_after_header(AllWorkersBusy("busy", retry_after_s=0.1), 1.0) == "1"
    assert retry_after_header(NoWorkerAvailable("none"), 4.0) == "4"


def test_sse_error_event_ends_the_stream() -> None:
    frames = sse_error_event("worker died", status=502).decode().split("\n\n")
    assert frames[-1] == ""
    assert frames[-2] == "data: [DONE]"
    error = json.loads(frames[0].removeprefix("data: "))
    assert error["error"]["message"] == "worker died"
    assert error["error"]["code"] == 502
