"""The one error tree of kvrouter.

::

    RouterError
     ├── ConfigError                 bad settings, unknown names (also a ValueError)
     ├── NoWorkerAvailable           no candidate worker: none registered, or all busy
     │    └── AllWorkersBusy         every worker is over a busy threshold (HTTP 503 + Retry-After)
     ├── RequestError                the client's request is wrong (HTTP 4xx)
     │    ├── InvalidRequest         400: malformed JSON, bad field, unknown model
     │    └── RequestTooLarge        413: body or prompt over a configured limit
     ├── UpstreamError               a worker failed or could not be reached (HTTP 502)
     │    └── UpstreamTimeout        504
     └── EventStreamError            a KV event stream went wrong
          ├── DecodeError            a malformed message or event (counted, logged, skipped)
          └── SequenceGap            events were lost and could not be replayed

Library exceptions are translated at the boundary and chained (``raise ... from exc``).
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error kvrouter raises on purpose."""


class ConfigError(RouterError, ValueError):
    """A setting is wrong or names something that does not exist."""


class NoWorkerAvailable(RouterError):
    """No worker can take the request."""


class AllWorkersBusy(NoWorkerAvailable):
    """Every candidate worker is over a busy threshold; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestError(RouterError):
    """The client's request is wrong; ``status`` is the HTTP status to answer with."""

    status = 400


class InvalidRequest(RequestError):
    status = 400


class RequestTooLarge(RequestError):
    status = 413


class UpstreamError(RouterError):
    """A worker failed or could not be reached."""


class UpstreamTimeout(UpstreamError):
    """A worker did not answer in time."""


class EventStreamError(RouterError):
    """A KV event stream went wrong."""


class DecodeError(EventStreamError):
    """A malformed KV event message; the message names what is wrong, ``kind`` what the
    error counters count it as (``"event"``, or ``"block_size_mismatch"``)."""

    def __init__(self, message: str, kind: str = "event") -> None:
        super().__init__(message)
        self.kind = kind


class SequenceGap(EventStreamError):
    """Events were lost between ``expected`` and ``received`` and could not be replayed."""

    def __init__(self, message: str, expected: int, received: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.received = received


def describe_error(exc: BaseException) -> str:
    """The one-line message a user sees for ``exc``.

    >>> describe_error(FileNotFoundError(2, "No such file or directory", "t.jsonl"))
    't.jsonl: No such file or directory'
    """
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__
