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
# Names the rank of a multi-rank (data-parallel) vLLM or SGLang server that must serve.
DP_RANK_HEADER = "X-data-parallel-rank"


class UpstreamFailure(UpstreamError):
    """A worker failed before answering; ``retryable``: another worker may take it.

    ``worker_down`` says the worker itself looks unreachable (connection refused, reset
    or dropped), as opposed to merely saying no (a 5xx answer).
    """

    def __init__(self, message: str, *, retryable: bool, worker_down: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.worker_down = worker_down


class _StreamTimeout(Exception):
    """Set on a stalled stream's reader by its :class:`_StreamWatch`."""


class _StreamWatch:
    """The time limits of one streamed answer, on one timer per stream.

    The first chunk must come before ``deadline`` (loop time); after it, the wait for
    each next chunk may last ``idle_s``. A wait that runs out ends the read with
    :class:`_StreamTimeout`. The stream's reader notes when each wait starts (a clock
    read and three attribute writes a chunk); the timer fires at most once per idle
    period and re-arms itself, so a long stream costs no timer work per chunk. While
    the reader is not waiting (its client is slow to take what came) the worker is not
    idle and nothing expires.
    """

    __slots__ = ("_content", "_handle", "_loop", "deadline", "first", "idle_s", "since", "waiting")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        content: aiohttp.StreamReader,
        deadline: float,
        idle_s: float | None,
    ) -> None:
        self._loop = loop
        self._content = content
        self.deadline = deadline
        self.idle_s = idle_s
        self.first = True  # no chunk yet: the deadline applies
        self.since = loop.time()  # when the current wait began
        self.waiting = False
        self._handle: asyncio.TimerHandle | None = loop.call_at(deadline, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if self.first:
            due = self.deadline
        elif self.idle_s is None:
            self._handle = None  # past the first chunk, no limit
            return
        elif self.waiting:
            due = self.since + self.idle_s
        else:
            due = now + self.idle_s  # busy with its client: the worker is not idle
        if now >= due:
            self._handle = None
            if self.first:
                why = "worker sent no data before the request timeout"
            else:
                why = f"worker sent nothing for {self.idle_s:g} s"
            self._content.set_exception(_StreamTimeout(why))
            return
        self._handle = self._loop.call_at(due, self._check)

    def started(self) -> None:
        """The first chunk came: from now on the idle limit applies."""
        self.first = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.idle_s is not None:
            self._handle = self._loop.call_at(self._loop.time() + self.idle_s, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


@dataclass(slots=True)
class UpstreamResponse:
    """An open response from a worker; close or release it exactly once.

    ``deadline`` (loop time) and ``idle_s`` limit a streamed answer (see
    :meth:`iter_chunks`); ``None`` leaves the session's timeout in charge.
    """

    status: int
    headers: Mapping[str, str]
    raw: aiohttp.ClientResponse
    deadline: float | None = None
    idle_s: float | None = None
    _watch: _StreamWatch | None = None

    async def read(self) -> bytes:
        """The whole body; the connection then goes back to the pool, or is dropped
        when the read fails (or is cancelled)."""
        try:
            try:
                async with asyncio.timeout_at(self.deadline):  # None: the session's limit
                    data = await self.raw.read()
            except TimeoutError as exc:
                raise UpstreamTimeout("worker did not finish its answer in time") from exc
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise UpstreamFailure(
                    f"worker broke off its answer: {_broken_reason(exc)}",
                    retryable=True,
                    worker_down=True,
                ) from exc
        except BaseException:
            self.close()
            raise
        self.release()
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Chunks as they arrive (no re-framing: SSE events pass through untouched).

        With a ``deadline``, the first chunk must come before it and each next one
        within ``idle_s`` of the wait for it starting: a stream may run as long as its
        worker keeps sending. A limit that runs out raises
        :class:`~kvrouter.errors.UpstreamTimeout`.
        """
        content = self.raw.content
        watch = None
        if self.deadline is not None:
            loop = asyncio.get_running_loop()
            watch = self._watch = _StreamWatch(loop, content, self.deadline, self.idle_s)
        try:
            while True:
                if watch is None:
                    chunk = await content.readany()
                else:
                    watch.since = loop.time()
                    watch.waiting = True
                    chunk = await content.readany()
                    watch.waiting = False
                    if watch.first and chunk:
                        watch.started()
                if not chunk:
                    return
                yield chunk
        except _StreamTimeout as exc:
            raise UpstreamTimeout(str(exc)) from None
        except TimeoutError as exc:
            raise UpstreamTimeout("worker did not finish its stream in time") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamFailure(
                f"worker broke off the stream: {_broken_reason(exc)}",
                retryable=False,
                worker_down=True,
            ) from exc
        finally:
            if watch is not None:
                watch.cancel()

    def release(self) -> None:
        """Return the connection to the pool (the body was read to the end)."""
        self._stop_watch()
        self.raw.release()

    def close(self) -> None:
        """Drop the connection: the worker sees a disconnect and aborts the request."""
        self._stop_watch()
        self.raw.close()

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

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
        stream_idle_timeout_s: float | None = 300.0,
        worker_api_key: str | None = None,
        forward_authorization: bool = True,
    ) -> None:
        """``worker_api_key``: sent as ``Authorization: Bearer`` on every request to a
        worker. ``forward_authorization``: pass the client's ``Authorization`` header on
        (when the workers check the clients' keys themselves); never done with a
        ``worker_api_key``."""
        self._max_connections = max_connections
        self._default_headers = (
            {"Authorization": f"Bearer {worker_api_key}"} if worker_api_key else None
        )
        self._forwarded = tuple(
            name
            for name in _FORWARDED_REQUEST_HEADERS
            if name != "authorization" or (forward_authorization and not worker_api_key)
        )
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout_s, sock_connect=connect_timeout_s
        )
        # A stream's limits are its own (UpstreamResponse.iter_chunks): it may last as
        # long as the worker keeps sending.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        self._request_timeout_s = request_timeout_s
        self._stream_idle_timeout_s = stream_idle_timeout_s
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
                headers=self._default_headers,
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
        dp_rank: int | None = None,
    ) -> UpstreamResponse:
        """POST ``body`` as JSON to ``url``; return the open response.

        ``stream``: what a 200 must be, an event stream (``True``) or JSON (``False``);
        one that says it is something else (an HTML page from a proxy in front of the
        worker, an engine that ignored ``stream``) is a retryable failure, since passed
        on it would reach the client as a success nobody can parse. ``None``: any.

        Raises :class:`UpstreamFailure` (retryable) for connection errors and 5xx
        answers, :class:`~kvrouter.errors.UpstreamTimeout` when the worker does not
        answer in time. Other statuses (a worker's 4xx) come back to be passed on.
        ``dp_rank``: the data-parallel rank of the server that must take the request.
        """
        send_headers = self._send_headers(headers)
        if dp_rank is not None:
            send_headers[DP_RANK_HEADER] = str(dp_rank)
        deadline: float | None = None
        if stream and timeout_s is None:
            # The answer must start within the request timeout; what follows is limited
            # by the idle timeout alone (iter_chunks).
            deadline = asyncio.get_running_loop().time() + self._request_timeout_s
            timeout = self._stream_timeout
        else:
            # No ``timeout`` argument at all means the session's; aiohttp reads an
            # explicit None as "no timeout".
            timeout = self._timeout if timeout_s is None else aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with asyncio.timeout_at(deadline):  # None: the session's limit alone
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
        return UpstreamResponse(raw.status, raw.headers, raw, deadline, self._stream_idle_timeout_s)

    def _send_headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """The headers of a request to a worker: JSON, and what is passed on of the
        client's (``headers``)."""
        send_headers = {"Content-Type": "application/json"}
        if headers:
            for name in self._forwarded:
                value = headers.get(name)
                if value is not None:
                    send_headers[name] = value
        return send_headers

    async def get(
        self, url: str, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        """A short GET (health, models, metrics); raises UpstreamError on failure.
        ``headers``: the client's, to pass on as ``open`` does."""
        status, body, _ = await self.get_typed(url, timeout_s, headers)
        return status, body

    async def get_typed(
        self, url: str, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes, str]:
        """:meth:`get`, with the answer's content type (a stored response may come back
        as an event stream)."""
        try:
            async with self.session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                headers=self._send_headers(headers) if headers is not None else None,
            ) as resp:
                return resp.status, await resp.read(), resp.content_type
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


def _broken_reason(exc: BaseException) -> str:
    """Why an answer broke off, in words: aiohttp's payload errors read like an HTTP
    status ("400, message='Not enough data...'") that no one sent."""
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection closed before the answer was complete"
    return describe_error(exc)
