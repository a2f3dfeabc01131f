"""Upstream HTTP mechanics: one shared client session, opening a request, streaming it.

Library exceptions are translated here, at the boundary, into
:class:`~kvrouter.errors.UpstreamError` / :class:`~kvrouter.errors.UpstreamTimeout`,
with ``retryable`` telling the gateway whether another worker may take the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp

from kvrouter.errors import UpstreamError, UpstreamTimeout, describe_error
from kvrouter.lifecycle import AsyncLifecycle

__all__ = ["UpstreamClient", "UpstreamFailure", "UpstreamResponse"]

# Statuses that mean "this worker cannot take it now": another worker may.
_RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}
)
# Request headers worth passing to the worker (authentication, tracing).
_FORWARDED_REQUEST_HEADERS = ("authorization", "x-request-id", "traceparent", "tracestate")


class UpstreamFailure(UpstreamError):
    """A worker failed before answering; ``retryable``: another worker may take it.

    ``worker_down`` says the worker itself looks unreachable (connection refused, reset
    or dropped), as opposed to merely saying no (a 5xx answer).
    """

    def __init__(self, message: str, *, retryable: bool, worker_down: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.worker_down = worker_down


@dataclass(slots=True)
class UpstreamResponse:
    """An open response from a worker; close or release it exactly once."""

    status: int
    headers: Mapping[str, str]
    raw: aiohttp.ClientResponse

    async def read(self) -> bytes:
        try:
            return await self.raw.read()
        except TimeoutError as exc:
            raise UpstreamTimeout("worker did not finish its answer in time") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamFailure(
                f"worker broke off its answer: {describe_error(exc)}",
                retryable=True,
                worker_down=True,
            ) from exc

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Chunks as they arrive (no re-framing: SSE events pass through untouched)."""
        try:
            async for chunk in self.raw.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout("worker did not finish its stream in time") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError(f"worker broke off the stream: {describe_error(exc)}") from exc

    def release(self) -> None:
        """Return the connection to the pool (the body was read to the end)."""
        self.raw.release()

    def close(self) -> None:
        """Drop the connection: the worker sees a disconnect and aborts the request."""
        self.raw.close()

    def passthrough_headers(self) -> dict[str, str]:
        return {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}


class UpstreamClient(AsyncLifecycle):
    """The gateway's one :class:`aiohttp.ClientSession`, pooled for its concurrency.

    Use as an async context manager or call :meth:`start` / :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        max_connections: int = 1024,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 300.0,
    ) -> None:
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout_s, sock_connect=connect_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                ttl_dns_cache=300,
                keepalive_timeout=30.0,
            )
            # No cookies, no automatic decompression: the gateway passes bodies through.
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient is not started")
        return self._session

    async def open(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        *,
        stream: bool | None = None,
    ) -> UpstreamResponse:
        """POST ``body`` as JSON to ``url``; return the open response.

        ``stream``: what a 200 must be, an event stream (``True``) or JSON (``False``);
        one that says it is something else (an HTML page from a proxy in front of the
        worker, an engine that ignored ``stream``) is a retryable failure, since passed
        on it would reach the client as a success nobody can parse. ``None``: any.

        Raises :class:`UpstreamFailure` (retryable) for connection errors and 5xx
        answers, :class:`~kvrouter.errors.UpstreamTimeout` when the worker does not
        answer in time. Other statuses (a worker's 4xx) come back to be passed on.
        """
        send_headers = {"Content-Type": "application/json"}
        if headers:
            for name in _FORWARDED_REQUEST_HEADERS:
                value = headers.get(name)
                if value is not None:
                    send_headers[name] = value
        # No ``timeout`` argument at all means the session's; aiohttp reads an explicit
        # None as "no timeout".
        timeout = self._timeout if timeout_s is None else aiohttp.ClientTimeout(total=timeout_s)
        try:
            raw = await self.session.post(url, data=body, headers=send_headers, timeout=timeout)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"worker {url} did not answer in time") from exc
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            raise UpstreamFailure(
                f"cannot reach worker {url}: {describe_error(exc)}",
                retryable=True,
                worker_down=True,
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(
                f"worker {url} failed: {describe_error(exc)}", retryable=True, worker_down=False
            ) from exc
        if raw.status in _RETRYABLE_STATUSES:
            text = await _read_snippet(raw)
            raw.release()
            # It answered, so it is up: another worker may take this request, but this
            # one stays in rotation (unless it fails answer after answer).
            raise UpstreamFailure(
                f"worker {url} answered {raw.status}: {text}", retryable=True, worker_down=False
            )
        if stream is not None and raw.status == 200 and "Content-Type" in raw.headers:
            _check_media_type(raw, url, stream)
        return UpstreamResponse(raw.status, raw.headers, raw)

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        """A short GET (health, models, metrics); raises UpstreamError on failure."""
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError as exc:
            raise UpstreamTimeout(f"GET {url} timed out after {timeout_s} s") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError(f"GET {url} failed: {describe_error(exc)}") from exc


async def _read_snippet(raw: aiohttp.ClientResponse, limit: int = 300) -> str:
    try:
        async with asyncio.timeout(2.0):
            data = await raw.read()
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        return "<no body>"
    return data[:limit].decode("utf-8", errors="replace")


def _check_media_type(raw: aiohttp.ClientResponse, url: str, stream: bool) -> None:
    media = raw.content_type
    if stream:
        ok, wanted = media == "text/event-stream", "an event stream"
    else:
        ok, wanted = media == "application/json" or media.endswith("+json"), "JSON"
    if not ok:
        raw.close()
        raise UpstreamFailure(
            f"worker {url} answered 200 with {media}, not {wanted}",
            retryable=True,
            worker_down=False,
        )
