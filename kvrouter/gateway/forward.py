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
this one now, and so is one whose 200 answer is not JSON (or, to a streaming request,
not an event stream). A connection failure (refused, reset, dropped) takes a worker
out, until a health check passes, and so do ``error_threshold`` failed answers in a row
(:class:`~kvrouter.gateway.registry.WorkerRegistry`). A timeout before the first byte
is retried once.

After the first byte has gone to the client, a failure cannot be retried: a stream
ends with an SSE error event in OpenAI's shape and ``data: [DONE]``.

A batch completion (``prompt`` a list of several prompts) fans out: each prompt is
routed, retried and booked as a request of its own, all run at once, and the answers
are merged into one (:mod:`kvrouter.gateway.fanout`). A stream starts once every worker
has accepted its prompt and the first prompt has its first byte
(:class:`~kvrouter.gateway.batch.BatchStream`), so a refusal is still a plain HTTP error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
from aiohttp import web

from kvrouter.clock import Clock, monotonic
from kvrouter.errors import (
    AllWorkersBusy,
    InvalidRequest,
    NoWorkerAvailable,
    RequestTooLarge,
    RouterError,
    UpstreamError,
    UpstreamTimeout,
)
from kvrouter.events.model import WorkerKey
from kvrouter.gateway.batch import (
    SHUTDOWN_CANCEL,
    SSE_HEADERS,
    Batch,
    BatchStream,
    OpenStream,
    PromptAnswer,
    end_cut_stream,
    gather_or_cancel,
    json_response,
    sub_headers,
)
from kvrouter.gateway.config import GatewayConfig
from kvrouter.gateway.core import RouteResult, RoutingCore
from kvrouter.gateway.fanout import merge_completions, split_batch
from kvrouter.gateway.http_errors import NotFound, responses_error_event, sse_error_event
from kvrouter.gateway.overrides import RoutingOverrides, parse_overrides
from kvrouter.gateway.prompts import Kind, ParsedBody, PreparedPrompt, batch_prompts, parse_body
from kvrouter.gateway.proxy import UpstreamClient, UpstreamFailure, UpstreamResponse
from kvrouter.gateway.registry import WorkerRegistry, WorkerState
from kvrouter.gateway.responses import ResponseHomes, ResponseIdSniffer
from kvrouter.gateway.stats import DecisionRecord, GatewayCounters

__all__ = ["PromptPreparer", "RequestForwarder", "read_body"]

log = logging.getLogger(__name__)
decision_log = logging.getLogger("kvrouter.decisions")

_PATHS: dict[Kind, str] = {
    "completion": "/v1/completions",
    "chat": "/v1/chat/completions",
    "embedding": "/v1/embeddings",
    "response": "/v1/responses",
}
_encoder = msgspec.json.Encoder()
_T = TypeVar("_T")

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
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding the body does not match
        raise InvalidRequest(f"the request body could not be read: {exc}") from exc


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
        # Set when the gateway shuts down: requests still running at the end of the
        # grace period are cancelled by the server, not by their clients.
        self.closing = False
        self._handlers: set[asyncio.Task[Any]] = set()  # requests being served
        # Which worker stored each recent /v1/responses answer (follow-ups go there).
        self.responses = ResponseHomes()
        self._gone: set[int] = set()  # requests in flight whose client is counted gone

    # -- entry point ------------------------------------------------------------------
    async def handle(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        """Serve one ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``
        or ``/v1/responses`` request."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await self._handle(request, kind)
        except asyncio.CancelledError as exc:
            if task is not None and SHUTDOWN_CANCEL in exc.args:
                # The shutdown grace is over before any answer started: a 503 the
                # client can retry (on another gateway), not a dropped connection.
                task.uncancel()
                raise NoWorkerAvailable(
                    "the router is shutting down; send the request again"
                ) from None
            # The client went away (its handler is cancelled), wherever the request was:
            # tokenizing, queued, waiting for a worker, or streaming.
            if not self.closing:
                self._client_gone(request)
            raise
        finally:
            self._gone.discard(id(request))
            if task is not None:
                self._handlers.discard(task)

    def _client_gone(self, request: web.Request) -> None:
        """Count a client that went away, once per request: a reset seen on a write is
        often followed by the cancel of the same handler."""
        if id(request) not in self._gone:
            self._gone.add(id(request))
            self._counters.num_disconnects += 1

    async def _handle(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        body = await read_body(request, self._cfg.max_body_bytes)
        parsed = parse_body(body, kind)
        overrides = parse_overrides(request.headers, parsed.kvrouter_field)
        if kind == "completion":
            prompts = batch_prompts(parsed.payload)
            if prompts is not None:
                return await self._fan_out(request, parsed, prompts, overrides)
        if kind == "response":
            overrides = self._to_home(parsed.payload, overrides)
        # An embedding request is prepared as a completion of its (first) input, a
        # Responses request as the chat it stands for.
        prompt = await self._prepare(
            parsed, "chat" if kind in {"chat", "response"} else "completion"
        )
        request_id = self._new_id()
        self._note_short(prompt)
        return await self._forward(
            request, kind, parsed, prompt=prompt, overrides=overrides, request_id=request_id
        )

    def _to_home(self, payload: Mapping[str, Any], overrides: RoutingOverrides) -> RoutingOverrides:
        """Pin a follow-up (``previous_response_id``) to the worker that stored the
        response it continues: no other worker has it. A pin the client chose wins; an
        unknown id (too old, or from before a restart) is routed as usual, and the
        worker says whether it knows it."""
        previous = payload.get("previous_response_id")
        if not previous or overrides.worker_id is not None:
            return overrides
        state = self._home_of(previous)
        if state is None:
            return overrides
        return replace(overrides, worker_id=state.worker_id, dp_rank=state.spec.dp_rank)

    def _home_of(self, response_id: str) -> WorkerState | None:
        """The worker that stored ``response_id`` (``None``: none known). Raises
        :class:`NoWorkerAvailable` when it is out of rotation: no other has it."""
        home = self.responses.home(response_id)
        state = None if home is None else self._registry.get(home)
        if state is not None and not state.healthy:
            raise NoWorkerAvailable(
                f"worker {state.worker_id}, which holds response {response_id!r}, "
                "is out of rotation"
            )
        return state

    async def stored_response(
        self, request: web.Request, response_id: str, action: str = ""
    ) -> web.Response:
        """``GET /v1/responses/{id}`` (``action`` ``""``) or ``POST .../cancel``, passed
        to the worker that stored the response; 404 when no worker is known to."""
        state = self._home_of(response_id)
        if state is None:
            raise NotFound(f"response {response_id!r} is not known to this router")
        url = f"{state.url}/v1/responses/{quote(response_id, safe='')}{action}"
        if query := request.rel_url.raw_query_string:  # vLLM's ?stream=true&starting_after=N
            url += "?" + query  # as the client encoded it
        content_type = "application/json"
        if request.method == "GET":
            status, data, content_type = await self._upstream.get_typed(
                url, self._cfg.request_timeout_s, request.headers
            )
        else:
            body = await read_body(request, self._cfg.max_body_bytes)
            upstream = await self._upstream.open(url, body or b"{}", request.headers)
            status, data = upstream.status, await upstream.read()
        return web.Response(
            body=data,
            status=status,
            content_type=content_type or "application/json",
            headers={"x-kvrouter-worker": str(state.worker_id)},
        )

    def _new_id(self) -> str:
        # Our own ids: a client's x-request-id (forwarded as is) need not be unique, and
        # uuid4 costs a urandom syscall per request.
        return f"{self._id_prefix}-{next(self._ids)}"

    def _note_short(self, prompt: PreparedPrompt) -> None:
        if len(prompt.local_hashes) == 0:
            # Shorter than one block: nothing to match, so load alone decides.
            self._counters.num_short_prompts += 1

    # -- routing ----------------------------------------------------------------------
    def choose(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        exclude: frozenset[WorkerKey] = frozenset(),
        *,
        queued: tuple[RouteResult, float] | None = None,
    ) -> _Attempt:
        """Pick and book a worker in rotation (not in ``exclude``); record the decision.

        ``queued``: the route the router queue made (already booked) and when the request
        joined the queue.
        """
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
        if queued is not None and queued[0].worker not in rotation:
            # Its worker left the rotation between the queue routing the request and the
            # request resuming: the request has had its turn, so route it again now.
            self._core.on_finish(request_id)
            queued = None
        if queued is not None:
            route, start = queued
        else:
            start = self._clock()
            route = self._core.route(request_id, prompt, overrides, exclude=exclude)
        chosen = rotation.get(route.worker)
        if chosen is None:  # the core's worker set lagged behind the rotation
            self._core.on_finish(request_id)
            raise NoWorkerAvailable(f"worker {route.worker.worker_id} is out of rotation")
        self._record(request_id, route, self._clock() - start, pinned=False)
        return _Attempt(chosen, route)

    async def _queued_route(
        self, request_id: str, prompt: PreparedPrompt, overrides: RoutingOverrides
    ) -> tuple[RouteResult, float]:
        """Wait in the router queue until the request is routed (booked); see
        ``docs/routing.md``. A client that leaves, or a wait past ``request_timeout_s``
        (503), takes the request out of the queue; a route made for a client that has
        already left is freed."""
        routed: asyncio.Future[RouteResult | RouterError] = (
            asyncio.get_running_loop().create_future()
        )
        start = self._clock()
        if not self._registry.rotation():
            raise NoWorkerAvailable("no worker is available")
        # The queue hands the outcome over once: a request taken out of it by cancel()
        # is never routed, so the future is only ever set while someone waits on it.
        self._core.submit(request_id, prompt, overrides, routed.set_result)
        try:
            async with asyncio.timeout(self._cfg.request_timeout_s):
                outcome = await asyncio.shield(routed)
        except BaseException as exc:
            # Not in the queue any more: it was routed just before the wait ended, and
            # its booking is for nobody.
            if not self._core.cancel(request_id) and isinstance(routed.result(), RouteResult):
                self._core.on_finish(request_id)
            if isinstance(exc, TimeoutError):
                raise AllWorkersBusy(
                    f"waited {self._cfg.request_timeout_s:g} s in the router queue",
                    retry_after_s=self._cfg.retry_after_s,
                ) from None
            raise
        if isinstance(outcome, RouterError):
            raise outcome
        return outcome, start

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
        return await self._with_retries(
            prompt,
            overrides,
            request_id,
            lambda attempt: self._try_worker(request, kind, parsed, attempt, request_id),
        )

    async def _with_retries(
        self,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        request_id: str,
        run: Callable[[_Attempt], Awaitable[_T]],
    ) -> _T:
        """Route and ``run`` one request, retrying on another worker as described above."""
        excluded: frozenset[WorkerKey] = frozenset()
        pinned = overrides.worker_id is not None
        timeout_retried = False
        last_error: UpstreamError | None = None
        for attempt_no in range(self._cfg.max_retries + 1):
            try:
                queued = None
                if attempt_no == 0 and not pinned and self._core.queue_enabled:
                    queued = await self._queued_route(request_id, prompt, overrides)
                attempt = self.choose(request_id, prompt, overrides, excluded, queued=queued)
            except NoWorkerAvailable:
                if last_error is not None:
                    raise last_error from None
                raise
            if attempt_no > 0:
                self._counters.num_retries += 1
            try:
                return await run(attempt)
            except UpstreamTimeout as exc:
                # Nothing reached the client yet. A slow worker is not a dead one: only
                # one retry is spent on timeouts, and the worker stays in rotation unless
                # its answers keep timing out (a stalled engine).
                self._counters.upstream_errors["timeout"] += 1
                self._blame(attempt.state, exc)
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
        self._blame(state, exc)

    def _blame(self, state: WorkerState, exc: UpstreamError) -> None:
        """What a failed request says about its worker.

        Unreachable (refused, reset, a connection dropped mid-stream): out of rotation
        until a health check passes, and its cache can no longer be trusted. A worker
        that merely said no (a 5xx answer) or did not answer in time (no first byte, a
        stream gone silent) is a failed answer: only this request's retries skip it,
        unless ``error_threshold`` answers in a row fail (a stalled engine whose health
        check still passes).
        """
        if isinstance(exc, UpstreamFailure) and exc.worker_down:
            self._registry.mark_failed(state.worker_id, str(exc))
        elif isinstance(exc, UpstreamFailure | UpstreamTimeout):
            self._registry.mark_error(state.worker_id, str(exc))

    async def _try_worker(
        self,
        request: web.Request,
        kind: Kind,
        parsed: ParsedBody,
        attempt: _Attempt,
        request_id: str,
    ) -> web.StreamResponse:
        state = attempt.state
        with self._booked(state, request_id):
            upstream = await self._upstream.open(
                state.url + _PATHS[kind],
                parsed.forward_body,
                request.headers,
                stream=parsed.stream,
                dp_rank=self._registry.rank_to_name(state),
            )
            if parsed.stream and upstream.status == 200:
                return await self._stream(request, upstream, state, request_id, kind)
            data = await self._read_whole(upstream, state, request_id)
            if kind == "response" and upstream.status == 200:
                self.responses.note_body(data, state.worker_id)
            headers = upstream.passthrough_headers()
            headers["x-kvrouter-worker"] = str(state.worker_id)
            return web.Response(body=data, status=upstream.status, headers=headers)

    @contextmanager
    def _booked(self, state: WorkerState, request_id: str) -> Iterator[None]:
        """A request in flight on ``state``: counted, and finished in the router at the end."""
        self._start_on(state)
        failed = False
        try:
            yield
        except UpstreamFailure:
            failed = True  # before any answer: what was predicted for it is not there
            raise
        finally:
            # Every path ends here: success, error, retry, client disconnect (cancel).
            self._end_on(state, request_id, failed)

    def _start_on(self, state: WorkerState) -> None:
        state.num_requests += 1
        state.num_in_flight += 1
        self._counters.num_in_flight += 1

    def _end_on(self, state: WorkerState, request_id: str, failed: bool = False) -> None:
        state.num_in_flight -= 1
        self._counters.num_in_flight -= 1
        self._core.on_finish(request_id, failed=failed)

    async def _read_whole(
        self, upstream: UpstreamResponse, state: WorkerState, request_id: str
    ) -> bytes:
        data = await upstream.read()
        self._on_first_byte(state, request_id)
        return data

    def _on_first_byte(self, state: WorkerState, request_id: str) -> None:
        state.consecutive_errors = 0  # it answered: its failed answers are no longer in a row
        self._core.on_first_token(request_id)

    async def _stream(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        state: WorkerState,
        request_id: str,
        kind: Kind = "completion",
    ) -> web.StreamResponse:
        """Pass a stream on (of a Responses stream, learn its id from its start)."""
        chunks = aiter(upstream.iter_chunks())
        sniffer = self.responses.sniffer(state.worker_id) if kind == "response" else None
        finished = False
        response: web.StreamResponse | None = None
        try:
            first = await self._first_chunk(chunks, state)
            self._on_first_byte(state, request_id)
            response = web.StreamResponse(
                status=200, headers={**SSE_HEADERS, "x-kvrouter-worker": str(state.worker_id)}
            )
            await response.prepare(request)
            await response.write(first)
            if sniffer is not None:
                sniffer.feed(first)
            finished = await self._pump(chunks, response, state, kind, sniffer)
            await response.write_eof()
            return response
        except ConnectionResetError:
            # The client went away: drop the upstream connection so the worker aborts.
            # Once the response has started there is nobody to answer; end quietly.
            self._client_gone(request)
            if response is not None:
                return response
            raise
        except asyncio.CancelledError as exc:
            if response is None or SHUTDOWN_CANCEL not in exc.args:
                raise
            # Still streaming when the shutdown grace ran out: say so, then end cleanly.
            return await end_cut_stream(response)
        finally:
            if finished:
                upstream.release()
            else:
                upstream.close()

    def cut_short(self) -> int:
        """The shutdown grace is over: end every request still being served, a stream
        with an SSE error event, anything else with a 503; returns how many."""
        for task in self._handlers:
            task.cancel(SHUTDOWN_CANCEL)
        return len(self._handlers)

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
        self,
        chunks: AsyncIterator[bytes],
        response: web.StreamResponse,
        state: WorkerState,
        kind: Kind,
        sniffer: ResponseIdSniffer | None,
    ) -> bool:
        """Copy the rest of the stream; ``True`` when the worker ended it cleanly."""
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return True
            except UpstreamError as exc:
                await response.write(self._broken_stream(state, exc, kind))
                return False
            if sniffer is not None:
                sniffer.feed(chunk)  # returns at once after the id is found
            # write() waits for the client to drain: back-pressure reaches the worker.
            await response.write(chunk)

    def _broken_stream(
        self,
        state: WorkerState,
        exc: UpstreamError,
        kind: Kind = "completion",
        prompt: int | None = None,
    ) -> bytes:
        """Count a stream that broke after its first byte; the SSE frames that end it
        (``kind``: the API's, a Responses stream's own error event; ``prompt``: the
        batch prompt whose stream it was)."""
        timed_out = isinstance(exc, UpstreamTimeout)
        self._counters.upstream_errors["timeout" if timed_out else "stream"] += 1
        self._blame(state, exc)
        log.warning("worker %d broke a stream: %r", state.worker_id, exc)
        status = 504 if timed_out else 502
        message = f"worker {state.worker_id} failed mid-stream: {exc}"
        if prompt is not None:
            message = f"prompt {prompt}: {message}"
        if kind == "response":
            return responses_error_event(message, status)
        return sse_error_event(message, status=status)

    # -- batch completions ------------------------------------------------------------
    async def _fan_out(
        self,
        request: web.Request,
        parsed: ParsedBody,
        prompts: list[str | list[int]],
        overrides: RoutingOverrides,
    ) -> web.StreamResponse:
        """One request per prompt, each routed on its own; the answers merged as one."""
        subs = split_batch(parsed, prompts)
        prepared = await asyncio.gather(*(self._prepare(sub, "completion") for sub in subs))
        base_id = self._new_id()
        for prompt in prepared:
            self._note_short(prompt)
        self._counters.num_batches += 1
        self._counters.num_batch_prompts += len(subs)
        batch = Batch(
            subs,
            list(prepared),
            [f"{base_id}-{i}" for i in range(len(subs))],
            [sub_headers(request.headers, i) for i in range(len(subs))],
            overrides,
        )
        if parsed.stream:
            return await self._fan_out_stream(request, batch)
        answers = await self._each_prompt(batch, self._answer)
        for answer in answers:
            if answer.status != 200:  # a worker refused one prompt: the batch fails so
                return json_response(answer.body, answer.status, [answer.worker_id])
        body = merge_completions([a.body for a in answers], batch.n)
        return json_response(body, 200, [a.worker_id for a in answers])

    def _each_prompt(
        self,
        batch: Batch,
        run: Callable[..., Awaitable[_T]],
    ) -> Awaitable[list[_T]]:
        """:meth:`_prompt_with_retries` for every prompt at once
        (:func:`~kvrouter.gateway.batch.gather_or_cancel`)."""
        return gather_or_cancel(
            self._prompt_with_retries(batch, i, run) for i in range(len(batch.subs))
        )

    def _prompt_with_retries(
        self, batch: Batch, index: int, run: Callable[..., Awaitable[_T]], **extra: Any
    ) -> Awaitable[_T]:
        """``run(attempt, sub=, request_id=, headers=, **extra)`` for prompt ``index``
        of ``batch``, routed and retried as a request of its own."""
        request_id = batch.ids[index]
        return self._with_retries(
            batch.prompts[index],
            batch.overrides,
            request_id,
            partial(
                run,
                sub=batch.subs[index],
                request_id=request_id,
                headers=batch.headers[index],
                **extra,
            ),
        )

    async def _answer(
        self, attempt: _Attempt, sub: ParsedBody, request_id: str, headers: Mapping[str, str]
    ) -> PromptAnswer:
        state = attempt.state
        with self._booked(state, request_id):
            upstream = await self._upstream.open(
                state.url + _PATHS["completion"],
                sub.forward_body,
                headers,
                stream=False,
                dp_rank=self._registry.rank_to_name(state),
            )
            data = await self._read_whole(upstream, state, request_id)
            return PromptAnswer(upstream.status, data, state.worker_id)

    async def _open_stream(
        self,
        attempt: _Attempt,
        sub: ParsedBody,
        request_id: str,
        headers: Mapping[str, str],
        on_accepted: Callable[[int], Awaitable[None]],
    ) -> OpenStream:
        """Open one prompt's stream up to its first chunk; the booking outlives this call.

        ``on_accepted(worker_id)`` runs as soon as the worker has answered 200 (before its first
        chunk: that comes after the prompt's prefill).
        """
        state = attempt.state
        self._start_on(state)
        upstream: UpstreamResponse | None = None
        try:
            upstream = await self._upstream.open(
                state.url + _PATHS["completion"],
                sub.forward_body,
                headers,
                stream=True,
                dp_rank=self._registry.rank_to_name(state),
            )
            if upstream.status != 200:
                data = await self._read_whole(upstream, state, request_id)
                self._end_on(state, request_id)
                return OpenStream(state, upstream.status, data, None, None, lambda: None)
            await on_accepted(state.worker_id)
            chunks = aiter(upstream.iter_chunks())
            first = await self._first_chunk(chunks, state)
            self._on_first_byte(state, request_id)
        except BaseException:
            if upstream is not None:
                upstream.close()
            self._end_on(state, request_id)
            raise
        return OpenStream(
            state, 200, first, chunks, upstream, partial(self._end_on, state, request_id)
        )

    async def _fan_out_stream(self, request: web.Request, batch: Batch) -> web.StreamResponse:
        def open_prompt(
            index: int, on_accepted: Callable[[int], Awaitable[None]]
        ) -> Awaitable[OpenStream]:
            return self._prompt_with_retries(
                batch, index, self._open_stream, on_accepted=on_accepted
            )

        def disconnected() -> None:
            self._client_gone(request)

        def broken(state: WorkerState, exc: UpstreamError, index: int) -> bytes:
            return self._broken_stream(state, exc, prompt=index)

        stream = BatchStream(request, batch, open_prompt, broken, disconnected)
        return await stream.run()
