"""The request path: limits -> tokenize (off the loop) -> hash once -> route -> proxy.

::

    read body (size limit) ─> parse ─> overrides ─> tokenize + hash (thread if large)
        ─> route (pure, on the loop) ─> open upstream ──fails before 1st byte──> retry
                                              │                   on another worker
                                     first byte: on_first_token           (bounded)
                                              │
              end / error / disconnect / timeout: on_finish  (always, try/finally)

A retry skips the workers that already failed this request (``exclude``) without
taking them out of rotation: a worker that answers 5xx is alive, merely unable to take
this one now. Only a connection failure (refused, reset, dropped) takes a worker out,
until a health check passes. A timeout before the first byte is retried once.

After the first byte has gone to the client, a failure cannot be retried: a stream
ends with an SSE error event in OpenAI's shape and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import msgspec
from aiohttp import web

from kvrouter.clock import Clock, monotonic
from kvrouter.errors import (
    InvalidRequest,
    NoWorkerAvailable,
    RequestTooLarge,
    UpstreamError,
    UpstreamTimeout,
)
from kvrouter.events.model import WorkerKey
from kvrouter.gateway.config import GatewayConfig
from kvrouter.gateway.core import RouteResult, RoutingCore
from kvrouter.gateway.http_errors import sse_error_event
from kvrouter.gateway.overrides import RoutingOverrides, parse_overrides
from kvrouter.gateway.prompts import Kind, ParsedBody, PreparedPrompt, parse_body
from kvrouter.gateway.proxy import UpstreamClient, UpstreamFailure, UpstreamResponse
from kvrouter.gateway.registry import WorkerRegistry, WorkerState
from kvrouter.gateway.stats import DecisionRecord, GatewayCounters

__all__ = ["PromptPreparer", "RequestForwarder", "read_body"]

log = logging.getLogger(__name__)
decision_log = logging.getLogger("kvrouter.decisions")

_PATHS: dict[Kind, str] = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_encoder = msgspec.json.Encoder()

# (parsed body, kind) -> prepared prompt; tokenizes and hashes off the event loop.
PromptPreparer = Callable[[ParsedBody, Kind], Awaitable[PreparedPrompt]]


async def read_body(request: web.Request, max_body_bytes: int) -> bytes:
    """The request body, refusing anything over ``max_body_bytes`` before reading it."""
    length = request.content_length
    if length is not None and length > max_body_bytes:
        raise RequestTooLarge(f"the body has {length} bytes, over the limit of {max_body_bytes}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestTooLarge(f"the body is over the limit of {max_body_bytes} bytes") from exc


@dataclass(slots=True)
class _Attempt:
    """One try of a request on one worker."""

    state: WorkerState
    route: RouteResult


class RequestForwarder:
    """Routes and proxies completion requests; see the module docstring."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        registry: WorkerRegistry,
        core: RoutingCore,
        upstream: UpstreamClient,
        counters: GatewayCounters,
        prepare: PromptPreparer,
        clock: Clock = monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = cfg
        self._registry = registry
        self._core = core
        self._upstream = upstream
        self._counters = counters
        self._prepare = prepare
        self._clock = clock
        self._rng = rng or random.Random()
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()

    # -- entry point ------------------------------------------------------------------
    async def handle(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        """Serve one ``/v1/completions`` or ``/v1/chat/completions`` request."""
        body = await read_body(request, self._cfg.max_body_bytes)
        parsed = parse_body(body, kind)
        overrides = parse_overrides(request.headers, parsed.kvrouter_field)
        prompt = await self._prepare(parsed, kind)
        # Our own ids: a client's x-request-id (forwarded as is) need not be unique, and
        # uuid4 costs a urandom syscall per request.
        request_id = f"{self._id_prefix}-{next(self._ids)}"
        if len(prompt.local_hashes) == 0:
            # Shorter than one block: nothing to match, so load alone decides.
            self._counters.num_short_prompts += 1
        return await self._forward(
            request, kind, parsed, prompt=prompt, overrides=overrides, request_id=request_id
        )

    # -- routing ----------------------------------------------------------------------
    def choose(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        exclude: frozenset[WorkerKey] = frozenset(),
    ) -> _Attempt:
        """Pick and book a worker in rotation (not in ``exclude``); record the decision."""
        if overrides.worker_id is not None:
            state = self._pinned_state(overrides)
            start = self._clock()
            # Direct routing still books the request, so the load view stays right.
            route = self._core.route(request_id, prompt, overrides, worker=state.key)
            self._record(request_id, route, self._clock() - start, pinned=True)
            return _Attempt(state, route)
        rotation = self._registry.rotation()
        if not rotation:
            raise NoWorkerAvailable("no worker is available")
        start = self._clock()
        route = self._core.route(request_id, prompt, overrides, exclude=exclude)
        chosen = rotation.get(route.worker)
        if chosen is None:  # the core's worker set lagged behind the rotation
            self._core.on_finish(request_id)
            raise NoWorkerAvailable(f"worker {route.worker.worker_id} is out of rotation")
        self._record(request_id, route, self._clock() - start, pinned=False)
        return _Attempt(chosen, route)

    def explain(self, prompt: PreparedPrompt, overrides: RoutingOverrides) -> _Attempt:
        """Where :meth:`choose` would send ``prompt`` now; nothing is booked or recorded."""
        if overrides.worker_id is not None:
            state = self._pinned_state(overrides)
            return _Attempt(state, self._core.preview(prompt, overrides, worker=state.key))
        rotation = self._registry.rotation()
        if not rotation:
            raise NoWorkerAvailable("no worker is available")
        route = self._core.preview(prompt, overrides)
        chosen = rotation.get(route.worker)
        if chosen is None:
            raise NoWorkerAvailable(f"worker {route.worker.worker_id} is out of rotation")
        return _Attempt(chosen, route)

    def _pinned_state(self, overrides: RoutingOverrides) -> WorkerState:
        assert overrides.worker_id is not None
        state = self._registry.get(overrides.worker_id)
        if state is None:
            raise InvalidRequest(f"x-kvrouter-worker names unknown worker {overrides.worker_id}")
        if not state.healthy:
            raise NoWorkerAvailable(f"worker {overrides.worker_id} is out of rotation")
        return state

    def _record(self, request_id: str, route: RouteResult, latency_s: float, pinned: bool) -> None:
        record = DecisionRecord(
            request_id=request_id,
            time_s=self._clock(),
            worker_id=route.worker.worker_id,
            dp_rank=route.worker.dp_rank,
            policy="direct" if pinned else route.policy,
            overlap_blocks=route.overlap_blocks,
            request_blocks=route.request_blocks,
            latency_s=latency_s,
            route=route,
            pinned=pinned,
        )
        self._counters.record_decision(record)
        rate = self._cfg.decision_log_sample_rate
        if rate > 0 and (rate >= 1 or self._rng.random() < rate):
            decision_log.info("decision %s", _encoder.encode(record.to_dict()).decode())

    # -- proxying ---------------------------------------------------------------------
    async def _forward(
        self,
        request: web.Request,
        kind: Kind,
        parsed: ParsedBody,
        *,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        request_id: str,
    ) -> web.StreamResponse:
        excluded: frozenset[WorkerKey] = frozenset()
        pinned = overrides.worker_id is not None
        timeout_retried = False
        last_error: UpstreamError | None = None
        for attempt_no in range(self._cfg.max_retries + 1):
            try:
                attempt = self.choose(request_id, prompt, overrides, excluded)
            except NoWorkerAvailable:
                if last_error is not None:
                    raise last_error from None
                raise
            if attempt_no > 0:
                self._counters.num_retries += 1
            try:
                return await self._try_worker(request, kind, parsed, attempt, request_id)
            except UpstreamTimeout as exc:
                # Nothing reached the client yet. A slow worker is not a dead one: it
                # stays in rotation, and only one retry is spent on timeouts.
                self._counters.upstream_errors["timeout"] += 1
                if pinned or timeout_retried:
                    raise
                timeout_retried = True
                last_error = exc
            except UpstreamFailure as exc:
                self._note_failure(attempt.state, exc)
                if pinned or not exc.retryable:
                    raise
                last_error = exc
            log.info(
                "request %s: worker %d failed (%s); retrying on another worker",
                request_id,
                attempt.state.worker_id,
                last_error,
            )
            excluded = excluded | {attempt.state.key}
        assert last_error is not None
        raise last_error

    def _note_failure(self, state: WorkerState, exc: UpstreamFailure) -> None:
        self._counters.upstream_errors["connect" if exc.worker_down else "status"] += 1
        if exc.worker_down:
            # Unreachable: out of rotation until a health check passes, and its cache
            # can no longer be trusted. A worker that merely said no (a 5xx answer) is
            # only skipped by this request's retries.
            self._registry.mark_failed(state.worker_id, str(exc))
        else:
            state.num_failures += 1
            state.last_error = str(exc)

    async def _try_worker(
        self,
        request: web.Request,
        kind: Kind,
        parsed: ParsedBody,
        attempt: _Attempt,
        request_id: str,
    ) -> web.StreamResponse:
        state = attempt.state
        state.num_requests += 1
        state.num_in_flight += 1
        self._counters.num_in_flight += 1
        try:
            upstream = await self._upstream.open(
                state.url + _PATHS[kind], parsed.forward_body, request.headers
            )
            if parsed.stream and upstream.status == 200:
                return await self._stream(request, upstream, state, request_id)
            return await self._whole(upstream, state, request_id)
        finally:
            state.num_in_flight -= 1
            self._counters.num_in_flight -= 1
            # Every path ends here: success, error, retry, client disconnect (cancel).
            self._core.on_finish(request_id)

    async def _whole(
        self, upstream: UpstreamResponse, state: WorkerState, request_id: str
    ) -> web.Response:
        try:
            data = await upstream.read()
        except BaseException:
            upstream.close()
            raise
        upstream.release()
        self._core.on_first_token(request_id)
        headers = upstream.passthrough_headers()
        headers["x-kvrouter-worker"] = str(state.worker_id)
        return web.Response(body=data, status=upstream.status, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        state: WorkerState,
        request_id: str,
    ) -> web.StreamResponse:
        chunks = aiter(upstream.iter_chunks())
        finished = False
        response: web.StreamResponse | None = None
        try:
            first = await self._first_chunk(chunks, state)
            self._core.on_first_token(request_id)
            response = web.StreamResponse(
                status=200, headers={**_SSE_HEADERS, "x-kvrouter-worker": str(state.worker_id)}
            )
            await response.prepare(request)
            await response.write(first)
            finished = await self._pump(chunks, response, state)
            await response.write_eof()
            return response
        except ConnectionResetError:
            # The client went away: drop the upstream connection so the worker aborts.
            # Once the response has started there is nobody to answer; end quietly.
            self._counters.num_disconnects += 1
            if response is not None:
                return response
            raise
        except asyncio.CancelledError:
            self._counters.num_disconnects += 1
            raise
        finally:
            if finished:
                upstream.release()
            else:
                upstream.close()

    async def _first_chunk(self, chunks: AsyncIterator[bytes], state: WorkerState) -> bytes:
        try:
            first = await anext(chunks)
        except StopAsyncIteration as exc:
            raise UpstreamFailure(
                f"worker {state.worker_id} closed the stream before any data",
                retryable=True,
                worker_down=False,
            ) from exc
        except UpstreamTimeout:
            raise  # retried once by _forward
        except UpstreamError as exc:
            raise UpstreamFailure(str(exc), retryable=True, worker_down=True) from exc
        return first

    async def _pump(
        self, chunks: AsyncIterator[bytes], response: web.StreamResponse, state: WorkerState
    ) -> bool:
        """Copy the rest of the stream; ``True`` when the worker ended it cleanly."""
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return True
            except UpstreamError as exc:
                kind = "timeout" if isinstance(exc, UpstreamTimeout) else "stream"
                self._counters.upstream_errors[kind] += 1
                log.warning("worker %d broke a stream: %r", state.worker_id, exc)
                status = 504 if kind == "timeout" else 502
                await response.write(
                    sse_error_event(f"worker failed mid-stream: {exc}", status=status)
                )
                return False
            # write() waits for the client to drain: back-pressure reaches the worker.
            await response.write(chunk)
