"""Batch completions on the wire: the split request, its answers, the merged stream.

A batch completion (``prompt`` a list of several prompts) fans out into one request per
prompt, each routed, retried and booked on its own by
:class:`~kvrouter.gateway.forward.RequestForwarder`. This module holds what the pieces
of one batch look like (:class:`Batch`, :class:`PromptAnswer`, :class:`OpenStream`),
the running of its prompts at once (:func:`gather_or_cancel`) and the I/O of a streamed
batch (:class:`BatchStream`); the merging of bytes is pure and lives in
:mod:`kvrouter.gateway.fanout`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from multidict import CIMultiDict

from kvrouter.errors import UpstreamError, describe_error
from kvrouter.gateway.fanout import SseRewriter, UsageSum, first_event_id, usage_chunk
from kvrouter.gateway.http_errors import map_error, sse_error_event
from kvrouter.gateway.overrides import RoutingOverrides
from kvrouter.gateway.prompts import ParsedBody, PreparedPrompt
from kvrouter.gateway.proxy import UpstreamResponse
from kvrouter.gateway.registry import WorkerState
from kvrouter.lifecycle import cancel_and_wait

__all__ = [
    "SHUTDOWN_CANCEL",
    "SSE_HEADERS",
    "Batch",
    "BatchStream",
    "OpenPrompt",
    "OpenStream",
    "PromptAnswer",
    "end_cut_stream",
    "gather_or_cancel",
    "json_response",
    "sub_headers",
]

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# The cancel message that ends a request when the shutdown grace is over.
SHUTDOWN_CANCEL = "kvrouter: shutdown grace over"


def shutdown_frames() -> bytes:
    """The SSE frames that end a stream the gateway's shutdown cuts short."""
    return sse_error_event("the router is shutting down; the request was cut short", status=503)


async def end_cut_stream(response: web.StreamResponse) -> web.StreamResponse:
    """Send :func:`shutdown_frames` and end ``response`` (best effort); the cancel
    that asked for it is handled."""
    with contextlib.suppress(Exception):
        await response.write(shutdown_frames())
        await response.write_eof()
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return response


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch completion split into one request per prompt."""

    subs: list[ParsedBody]
    prompts: list[PreparedPrompt]
    ids: list[str]
    headers: list[Mapping[str, str]]
    overrides: RoutingOverrides

    @property
    def n(self) -> int:
        """Choices per prompt (the body's ``n``, the same for every prompt)."""
        return self.prompts[0].num_sequences


@dataclass(slots=True)
class PromptAnswer:
    """A worker's whole answer to one prompt of a batch."""

    status: int
    body: bytes
    worker_id: int


@dataclass(slots=True)
class OpenStream:
    """One prompt of a streamed batch, open up to its first chunk (or its error answer).

    ``close`` ends the booking and the connection; later calls do nothing.
    """

    state: WorkerState
    status: int
    first: bytes  # the first chunk; the whole answer when status is not 200
    chunks: AsyncIterator[bytes] | None
    upstream: UpstreamResponse | None
    done: Callable[[], None]
    closed: bool = False

    def close(self, clean: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.upstream is not None:
            if clean:
                self.upstream.release()
            else:
                self.upstream.close()
            self.upstream = None
        self.done()


# Open prompt ``index`` of the batch up to its first chunk, with its retries; the
# callback runs once a worker has accepted it (answered 200).
OpenPrompt = Callable[[int, Callable[[int], Awaitable[None]]], Awaitable[OpenStream]]


# What a prompt's task of a streamed batch reports to the merging loop.
_ACCEPTED, _OPENED, _CHUNK, _END, _BROKEN, _FAILED = range(6)


class BatchStream:
    """A streamed batch completion: one stream per prompt, merged into one.

    Every prompt is routed and opened at once, each with its own retries, by a task that
    then copies its stream into one queue. The merged stream starts when every worker
    has accepted its prompt (answered 200) and the first of them has sent its first
    chunk. So its time to first token is the fastest prompt's, not the slowest's, while
    a prompt the workers refuse (which they do before any prefill) still fails the whole
    batch with the worker's answer, as vLLM does for a batch it cannot serve. A prompt
    that fails after the stream has started ends it with an SSE error event.
    """

    def __init__(
        self,
        request: web.Request,
        batch: Batch,
        open_prompt: OpenPrompt,
        broken_stream: Callable[[WorkerState, UpstreamError, int], bytes],
        on_disconnect: Callable[[], None],
    ) -> None:
        self._request = request
        self._batch = batch
        self._open_prompt = open_prompt
        self._broken_stream = broken_stream
        self._on_disconnect = on_disconnect
        size = len(batch.subs)
        self._streams: list[OpenStream | None] = [None] * size
        self._clean = [False] * size
        self._workers = [-1] * size  # the worker that accepted each prompt (-1: none yet)
        self._queue: asyncio.Queue[tuple[int, int, Any]] = asyncio.Queue(maxsize=6 * size)
        self._response: web.StreamResponse | None = None
        self._usage = UsageSum()
        self._rewriters: list[SseRewriter] = []
        self._batch_id: str | None = None
        self._closing = False

    async def run(self) -> web.StreamResponse:
        tasks = [asyncio.create_task(self._follow(i)) for i in range(len(self._streams))]
        try:
            return await self._merge()
        except ConnectionResetError:
            # The client went away; once the response has started nobody is listening.
            self._on_disconnect()
            if self._response is None:
                raise
            return self._response
        except asyncio.CancelledError as exc:
            if self._response is None or SHUTDOWN_CANCEL not in exc.args:
                raise
            return await end_cut_stream(self._response)
        finally:
            # Every booking ends here, before anything is awaited: a client gone away
            # cancels this handler again at its next await, which must not skip it.
            # A prompt opened later is closed by its own task (see _follow).
            self._closing = True
            for stream, clean in zip(self._streams, self._clean, strict=True):
                if stream is not None:
                    stream.close(clean)
            await cancel_and_wait(*tasks)

    async def _follow(self, index: int) -> None:
        put = self._queue.put

        async def accepted(worker_id: int) -> None:
            self._workers[index] = worker_id
            await put((index, _ACCEPTED, None))

        try:
            stream = await self._open_prompt(index, accepted)
        except Exception as exc:  # a RouterError, mapped to a status like any other
            await put((index, _FAILED, exc))
            return
        self._streams[index] = stream  # closed by run(), whatever happens next
        if self._closing:  # run() has already closed the others and is not listening
            stream.close(False)
            return
        await put((index, _OPENED, stream))
        if stream.chunks is None:
            return
        try:
            async for chunk in stream.chunks:
                await put((index, _CHUNK, chunk))
        except UpstreamError as exc:
            await put((index, _BROKEN, exc))
            return
        except Exception as exc:  # never leave the merging loop waiting for this one
            await put(
                (index, _BROKEN, UpstreamError(f"worker stream failed: {describe_error(exc)}"))
            )
            return
        await put((index, _END, None))

    async def _merge(self) -> web.StreamResponse:
        size = len(self._streams)
        first: list[int] = []  # prompts with a first chunk before the start, in order
        backlog: list[tuple[int, int, Any]] = []  # their later items, until the start
        ended = 0
        while ended < size:
            index, kind, item = await self._queue.get()
            if kind == _ACCEPTED:
                pass  # the task noted the worker in _workers; check the start below
            elif kind == _FAILED:
                if self._response is None:
                    raise item
                mapping = map_error(item)
                message = f"prompt {index} failed: {item}"
                return await self._end(sse_error_event(message, mapping.error_type, mapping.status))
            elif kind == _OPENED and item.status != 200:
                if self._response is None:
                    return json_response(item.first, item.status, [item.state.worker_id])
                return await self._end(_refused(index, item))
            elif self._response is not None:
                ended += await self._emit(index, kind, item)
                if kind == _BROKEN:
                    return self._response
            elif kind == _OPENED:
                first.append(index)
            else:
                backlog.append((index, kind, item))
            if self._response is None and first and -1 not in self._workers:
                response = await self._start(first)
                for held in backlog:
                    ended += await self._emit(*held)
                    if held[1] == _BROKEN:
                        return response
                backlog.clear()
        return await self._finish()

    async def _start(self, first: list[int]) -> web.StreamResponse:
        """Answer 200 and send the first chunks that are in."""
        opened = [stream for i in first if (stream := self._streams[i]) is not None]
        self._batch_id = first_event_id(opened[0].first)
        n = self._batch.n
        self._rewriters = [
            SseRewriter(i * n, self._batch_id, self._usage) for i in range(len(self._streams))
        ]
        workers = ",".join(str(w) for w in self._workers)
        response = web.StreamResponse(
            status=200, headers={**SSE_HEADERS, "x-kvrouter-worker": workers}
        )
        self._response = response
        await response.prepare(self._request)
        feeds = (
            self._rewriters[i].feed(stream.first) for i, stream in zip(first, opened, strict=True)
        )
        await response.write(b"".join(feeds))
        return response

    async def _emit(self, index: int, kind: int, item: Any) -> int:
        """Pass one item of a started stream on; 1 when that prompt's stream ended."""
        response = self._response
        assert response is not None
        rewriter = self._rewriters[index]
        if kind == _OPENED:
            await response.write(rewriter.feed(item.first))
        elif kind == _CHUNK:
            out = rewriter.feed(item)
            if out:
                await response.write(out)
        elif kind == _END:
            self._clean[index] = True
            await response.write(rewriter.flush())
            return 1
        elif kind == _BROKEN:
            stream = self._streams[index]
            assert stream is not None
            await response.write(self._broken_stream(stream.state, item, index))
            await response.write_eof()
            return 1
        return 0

    async def _end(self, frames: bytes) -> web.StreamResponse:
        response = self._response
        assert response is not None
        await response.write(frames)
        await response.write_eof()
        return response

    async def _finish(self) -> web.StreamResponse:
        if self._usage.seen:
            template = next(
                (r.last_usage_chunk for r in self._rewriters if r.last_usage_chunk), None
            )
            usage = usage_chunk(template, self._usage, self._batch_id)
            return await self._end(usage + b"data: [DONE]\n\n")
        return await self._end(b"data: [DONE]\n\n")


def _refused(index: int, stream: OpenStream) -> bytes:
    """The SSE frames that end a started batch stream when a worker refused a prompt."""
    text = stream.first[:300].decode("utf-8", errors="replace")
    message = f"prompt {index} refused by worker {stream.state.worker_id}: {text}"
    error_type = "invalid_request_error" if 400 <= stream.status < 500 else "upstream_error"
    return sse_error_event(message, error_type, stream.status)


def sub_headers(headers: Mapping[str, str], index: int) -> Mapping[str, str]:
    """A prompt's request headers: a client's x-request-id gets the prompt's index, so
    the workers see distinct ids."""
    request_id = headers.get("x-request-id")
    if request_id is None:
        return headers
    out = CIMultiDict(headers)
    out["x-request-id"] = f"{request_id}-{index}"
    return out


def json_response(body: bytes, status: int, workers: Iterable[int]) -> web.Response:
    return web.Response(
        body=body,
        status=status,
        headers={
            "Content-Type": "application/json",
            "x-kvrouter-worker": ",".join(str(w) for w in workers),
        },
    )


async def gather_or_cancel(aws: Iterable[Awaitable[_T]]) -> list[_T]:
    """All results, in order; on the first failure (or a cancel) the rest are cancelled,
    so a batch fails as a whole and leaves no prompt running."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        await cancel_and_wait(*tasks)
        raise
