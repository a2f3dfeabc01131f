"""The simulated engine's HTTP server: one :class:`EngineCore` driven in real time.

::

    HTTP handler ──add_request──▶ EngineCore ◀──step()── engine loop (one task)
         ▲                                                  │ sleep(duration_s)
         └──────── queue per HTTP request ◀── outputs ──────┤
                                   KvEventPublisher ◀── kv_events (one batch per step)
                              WorkerMetricsPublisher ◀── core.metrics()

Endpoints (vLLM's): ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE when
``stream`` is true), ``GET /v1/models``, ``GET /health``, ``GET|POST /ping``,
``GET /version``, ``GET /metrics``, ``POST /tokenize``, ``POST /detokenize``,
``POST /v1/completions/render``, ``POST /v1/chat/completions/render``,
``POST /v1/responses`` and ``GET /v1/responses/{id}`` (:mod:`kvrouter.engine.responses`).

The output text is synthetic but deterministic: the tokenizer's decoding of the token
ids the core generates. Each of a request's ``n`` choices per prompt is its own engine
request. A client that disconnects has its request aborted in the core.

Usage::

    core = EngineCore(EngineConfig(speedup_ratio=10.0))
    async with EngineServer(core, load_tokenizer(None), ServerConfig(port=8001)) as server:
        ...  # serve until cancelled
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
from aiohttp import web

from kvrouter import __version__
from kvrouter.engine import EngineCore, EngineRequest, RequestOutput
from kvrouter.engine.generation import Generation, Waiter, engine_request_ids
from kvrouter.engine.http import (
    ModelNotFound,
    NotFound,
    ShuttingDown,
    aborted_output,
    bound_port,
    error_response,
    error_type,
    finish_reason,
    has_client_id,
    json_response,
    read_body,
    render_engine_metrics,
    request_id_of,
    sse,
)
from kvrouter.engine.latency import LatencyMetrics
from kvrouter.engine.logprobs import ChoiceScorer, LogprobModel
from kvrouter.engine.responses import ResponseBuilder, ResponseStore, StoredResponse
from kvrouter.engine.stops import StopCheck
from kvrouter.engine.tools import ToolCallStream, plan_tool_call
from kvrouter.errors import InvalidRequest, RequestError
from kvrouter.events.vllm import KVCacheEvent
from kvrouter.lifecycle import AsyncLifecycle, cancel_and_wait
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.protocol import (
    OUTPUT_TOKENS_FIELD,
    ChatCompletionRequest,
    ChatFormat,
    CompletionFormat,
    CompletionRequest,
    DetokenizeResponse,
    Logprobs,
    ModelCard,
    ModelList,
    RenderedRequest,
    ResponseFormat,
    TokenizeResponse,
    ToolCall,
    check_response_fields,
    decode_chat_request,
    decode_completion_request,
    decode_detokenize_request,
    decode_json,
    decode_tokenize_request,
    encode,
    input_messages,
    require_messages,
)
from kvrouter.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["EngineServer", "ServerConfig", "ServerStats", "render_engine_metrics"]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# Prompts longer than this are tokenized in a thread, shorter ones inline: a thread hop
# costs more than encoding a few kilobytes.
_INLINE_TOKENIZE_CHARS = 4096
# A step that did nothing (every request blocked) is retried after this pause.
_IDLE_STEP_PAUSE_S = 0.001
# Sleeps shorter than this only yield to the loop; the timer wheel is coarser.
_MIN_SLEEP_S = 50e-6
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_object_decoder = msgspec.json.Decoder(dict[str, Any])


class _EventSink(Protocol):
    """What the server needs from :class:`kvrouter.transport.KvEventPublisher`."""

    def publish_events(self, events: Iterable[KVCacheEvent]) -> None: ...
    def flush(self) -> int | None: ...


class _MetricsSink(Protocol):
    """What the server needs from :class:`kvrouter.transport.WorkerMetricsPublisher`."""

    def update(self, metrics: ForwardPassMetrics) -> None: ...


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where and as what the server listens."""

    host: str = "127.0.0.1"
    port: int = 0
    model_name: str = "kvrouter-mock"
    max_model_len: int = 131072
    # Longest an HTTP body may be (token-id prompts of 100k tokens are ~700 kB).
    max_body_bytes: int = 64 * 1024 * 1024
    shutdown_timeout_s: float = 2.0


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Counters of one server."""

    num_requests: int
    num_active: int
    num_aborted: int
    num_rejected: int
    num_steps: int
    num_kv_events: int


@dataclass(slots=True)
class _Counters:
    num_requests: int = 0
    num_aborted: int = 0
    num_rejected: int = 0
    num_steps: int = 0
    num_kv_events: int = 0


class EngineServer(AsyncLifecycle):
    """Serves one engine core over vLLM's HTTP API; an async context manager."""

    def __init__(
        self,
        core: EngineCore,
        tokenizer: Tokenizer,
        config: ServerConfig | None = None,
        *,
        kv_publisher: _EventSink | None = None,
        metrics_publisher: _MetricsSink | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self._core = core
        self._tokenizer = tokenizer
        self._kv_publisher = kv_publisher
        self._metrics_publisher = metrics_publisher
        self._waiters: dict[str, Waiter] = {}
        self._latency = LatencyMetrics()
        self._wake = asyncio.Event()
        self._counters = _Counters()
        self._runner: web.AppRunner | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self._port = 0
        self._closed = False
        self._failed = False
        self._completion_format = CompletionFormat(self.config.model_name)
        self._chat_format = ChatFormat(self.config.model_name)
        self._logprob_model = LogprobModel(core.config.vocab_size)
        self._engine_ids = itertools.count(1)
        self._stored = ResponseStore()

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Bind the HTTP port and start the engine loop."""
        if self._runner is not None:
            raise ValueError("server already started")
        runner = web.AppRunner(
            self.build_app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self.config.shutdown_timeout_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        self._runner = runner
        self._port = bound_port(runner, self.config.port)
        self._engine_task = asyncio.create_task(self._run_engine(), name="engine-loop")
        self._engine_task.add_done_callback(self._on_engine_done)
        if self._metrics_publisher is not None:
            # An idle worker takes no steps; announce its (empty) load at once.
            self._metrics_publisher.update(self._core.metrics())
        logger.info("engine server listening on %s", self.url)

    async def aclose(self) -> None:
        """Stop accepting, let open requests finish for up to ``shutdown_timeout_s``,
        abort the rest (their streams end with ``finish_reason="abort"``), then stop
        the HTTP server and the engine loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + self.config.shutdown_timeout_s
        while self._waiters and self._engine_task is not None and loop.time() < deadline_s:
            await asyncio.sleep(0.01)
        if self._waiters:
            logger.info("aborting %d unfinished requests at shutdown", len(self._waiters))
            for request_id in list(self._waiters):
                # The waiter stays: the engine delivers the abort output to its handler.
                self._core.abort_request(request_id)
            self._wake.set()
            await asyncio.sleep(0.05)
        if self._runner is not None:
            await self._runner.cleanup()
        await cancel_and_wait(self._engine_task)
        for request_id in list(self._waiters):
            self._abort(request_id)

    @property
    def port(self) -> int:
        """The bound HTTP port (after :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.config.host}:{self._port}"

    def stats(self) -> ServerStats:
        c = self._counters
        return ServerStats(
            num_requests=c.num_requests,
            num_active=len(self._waiters),
            num_aborted=c.num_aborted,
            num_rejected=c.num_rejected,
            num_steps=c.num_steps,
            num_kv_events=c.num_kv_events,
        )

    def build_app(self) -> web.Application:
        """The aiohttp application (routes and the error middleware)."""
        app = web.Application(
            client_max_size=self.config.max_body_bytes, middlewares=[self._error_middleware]
        )
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/responses/{id}", self._stored_response)
        app.router.add_post("/v1/completions/render", self._render_completions)
        app.router.add_post("/v1/chat/completions/render", self._render_chat)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._health)
        app.router.add_post("/ping", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/metrics", self._metrics)
        return app

    # --- engine loop --------------------------------------------------------------

    async def _run_engine(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._core.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
                continue
            started_s = loop.time()
            result = self._core.step()
            self._counters.num_steps += 1
            # The step "runs" for duration_s of wall time, counted from its start.
            remaining_s = started_s + result.duration_s - loop.time()
            if remaining_s > _MIN_SLEEP_S:
                await asyncio.sleep(remaining_s)
            elif not result.outputs and not result.kv_events and result.duration_s <= 0:
                await asyncio.sleep(_IDLE_STEP_PAUSE_S)
            else:
                await asyncio.sleep(0)
            self._deliver(result.outputs)
            self._publish(result.kv_events)

    def _on_engine_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the core: fail what is open rather than leave handlers waiting forever.
        logger.error("engine loop failed", exc_info=task.exception())
        self._failed = True
        for request_id, waiter in list(self._waiters.items()):
            del self._waiters[request_id]
            waiter.queue.put_nowait((waiter.index, aborted_output(request_id)))

    def _deliver(self, outputs: Sequence[RequestOutput]) -> None:
        now = asyncio.get_running_loop().time()
        latency = self._latency
        for output in outputs:
            waiter = self._waiters.get(output.request_id)
            if waiter is None:
                continue  # aborted while the step ran
            if new := len(output.new_token_ids):
                last = waiter.last_token_s
                if last is None:
                    latency.ttft.observe(now - waiter.started_s)
                else:
                    gap = (now - last) / new
                    for _ in range(new):
                        latency.inter_token.observe(gap)
                waiter.last_token_s = now
            if output.finished:
                del self._waiters[output.request_id]
                latency.e2e.observe(now - waiter.started_s)
                latency.finished[finish_reason(output)] += 1
            waiter.queue.put_nowait((waiter.index, output))

    def _publish(self, kv_events: Sequence[KVCacheEvent]) -> None:
        if kv_events and self._kv_publisher is not None:
            self._kv_publisher.publish_events(kv_events)
            self._kv_publisher.flush()  # one batch per step, as vLLM sends
            self._counters.num_kv_events += len(kv_events)
        if self._metrics_publisher is not None:
            self._metrics_publisher.update(self._core.metrics())

    def _release(self, gen: Generation) -> None:
        """Abort what is still open of ``gen``'s engine requests (their ids are its own)."""
        for sub_id in gen.sub_ids:
            self._abort(sub_id)

    def _abort(self, request_id: str) -> None:
        if self._waiters.pop(request_id, None) is not None:
            self._core.abort_request(request_id)
            self._counters.num_aborted += 1
            self._latency.finished["abort"] += 1
            self._wake.set()  # the abort may have freed blocks another request waits for

    # --- middleware ---------------------------------------------------------------

    @web.middleware
    async def _error_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestError as exc:
            self._counters.num_rejected += 1
            return error_response(exc.status, str(exc), error_type(exc.status))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, exc.reason, error_type(exc.status))

    # --- generation ---------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        req = decode_completion_request(body)
        self._check_model(req.model)
        texts_or_ids = req.prompts()
        prompts = [await self._encode_prompt(p) for p in texts_or_ids]
        echo_texts = None
        if req.echo:
            echo_texts = [
                p if isinstance(p, str) else self._tokenizer.decode(p) for p in texts_or_ids
            ]
        return await self._generate(request, req, prompts, self._completion_format, echo_texts)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        req = decode_chat_request(body)
        self._check_model(req.model)
        prompt = await self._encode_chat(req)
        return await self._generate(request, req, [prompt], self._chat_format)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        payload = decode_json(_object_decoder, await read_body(request))
        check_response_fields(payload)
        self._check_model(payload.get("model"))
        if payload.get("background"):
            raise InvalidRequest("background responses are not supported by the simulated engine")
        history: list[dict[str, Any]] = []
        previous = payload.get("previous_response_id")
        if previous:
            history = self._stored_or_404(previous).conversation
        # The instructions are this request's alone; the conversation carries on.
        conversation = history + require_messages(input_messages(payload["input"]))
        instructions = payload.get("instructions")
        messages = [{"role": "system", "content": instructions}] if instructions else []
        try:
            chat = msgspec.convert(
                {
                    "messages": messages + conversation,
                    "max_tokens": payload.get("max_output_tokens"),
                    "temperature": payload.get("temperature"),
                    "cache_salt": payload.get("cache_salt"),
                    OUTPUT_TOKENS_FIELD: payload.get(OUTPUT_TOKENS_FIELD),
                },
                ChatCompletionRequest,
            )
        except msgspec.ValidationError as exc:
            raise InvalidRequest(str(exc)) from exc
        prompt = await self._encode_chat(chat)
        limit = self._output_limit(chat, len(prompt))
        response_id = f"resp_{uuid.uuid4().hex}"
        gen = self._submit(response_id, [prompt], chat, None, [limit])
        build = ResponseBuilder(response_id, self.config.model_name, gen.created, payload)
        try:
            if payload.get("stream") is not True:
                text, reason = await self._collect_text(gen, None)
                body = self._finish_response(build, gen, text, reason, conversation)
                return json_response(encode(body))
            stream = web.StreamResponse(headers=_SSE_HEADERS)
            await stream.prepare(request)
            await stream.write(build.opening())
            text, reason = await self._collect_text(
                gen, lambda piece: stream.write(build.delta(piece))
            )
            body = self._finish_response(build, gen, text, reason, conversation)
            await stream.write(build.closing(body, text))
            await stream.write_eof()
            return stream
        except ConnectionResetError:
            logger.debug("client disconnected from response %s", response_id)
            return web.Response()
        finally:
            self._release(gen)

    def _finish_response(
        self,
        build: ResponseBuilder,
        gen: Generation,
        text: str,
        reason: str | None,
        conversation: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """The finished response's JSON; stored with its conversation (unless the
        request said ``store: false``)."""
        request = build.request
        # Cut short by the client's own max_output_tokens: incomplete, as vLLM says.
        cut = reason == "length" and request.get("max_output_tokens") is not None
        cut = cut and request.get(OUTPUT_TOKENS_FIELD) is None
        body = build.body(text, "incomplete" if cut else "completed", gen.usage())
        if request.get("store", True) is not False:
            answer = {"role": "assistant", "content": text}
            self._stored.put(build.response_id, StoredResponse(body, [*conversation, answer]))
        return body

    async def _collect_text(
        self, gen: Generation, on_text: Callable[[str], Awaitable[None]] | None
    ) -> tuple[str, str | None]:
        """Wait for a one-choice generation's text (``on_text`` gets each piece)."""
        decoder = IncrementalDecoder(self._tokenizer)
        pieces: list[str] = []
        reason = None
        while gen.num_open > 0:
            _index, output = await gen.queue.get()
            gen.account(0, output)
            if output.finished:
                reason = finish_reason(output)
            if output.new_token_ids or output.finished:
                piece = decoder.feed(output.new_token_ids, final=output.finished)
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        await on_text(piece)
        return "".join(pieces), reason

    async def _stored_response(self, request: web.Request) -> web.Response:
        return json_response(encode(self._stored_or_404(request.match_info["id"]).body))

    def _stored_or_404(self, response_id: str) -> StoredResponse:
        stored = self._stored.get(response_id)
        if stored is None:
            raise NotFound(f"Response with id '{response_id}' not found.")
        return stored

    async def _generate(
        self,
        request: web.Request,
        req: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        fmt: ResponseFormat,
        echo_texts: list[str] | None = None,
    ) -> web.StreamResponse:
        limits = [self._output_limit(req, len(ids)) for ids in prompts]
        request_id = request_id_of(request, fmt.id_prefix)
        # What can refuse the request comes before it starts.
        scorer = self._scorer(req, prompts, fmt)
        forced = _forced_calls(req, request_id, limits)
        gen = self._submit(request_id, prompts, req, echo_texts, limits)
        # vLLM answers with its own id, the client's x-request-id behind its prefix.
        gen.response_id = f"{fmt.id_prefix}-{request_id}" if has_client_id(request) else request_id
        try:
            if req.stream:
                return await self._stream(request, gen, fmt, req, scorer=scorer, forced=forced)
            return await self._collect(gen, fmt, req, scorer=scorer, forced=forced)
        finally:
            self._release(gen)

    def _scorer(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        fmt: ResponseFormat,
    ) -> ChoiceScorer | None:
        """Who scores the choices' tokens, when the request asks for logprobs."""
        num_top = req.num_logprobs()
        if num_top is None:
            return None
        return ChoiceScorer(
            self._logprob_model,
            self._tokenizer,
            num_top,
            chat=isinstance(fmt, ChatFormat),
            prompts=prompts,
            n=req.num_choices(),
            echo=isinstance(req, CompletionRequest) and req.echo,
        )

    def _submit(
        self,
        request_id: str,
        prompts: list[list[int]],
        req: CompletionRequest | ChatCompletionRequest,
        echo_texts: list[str] | None,
        limits: list[int],
    ) -> Generation:
        """Start every choice of every prompt; ``limits``: each prompt's output tokens
        (see :meth:`_output_limit`)."""
        if self._closed or self._failed:
            raise ShuttingDown("the server is shutting down or its engine failed")
        n = req.num_choices()
        # Each choice runs under an engine id of its own, never reused: a client's
        # x-request-id need not be unique, and an id freed by one request may still have
        # an abort or a step's output on its way. Its tokens follow the client's id.
        seeds = engine_request_ids(request_id, len(prompts), n)
        sub_ids = engine_request_ids(f"{request_id}#{next(self._engine_ids)}", len(prompts), n)
        gen = Generation(
            request_id,
            sub_ids,
            int(time.time()),
            n,
            [len(ids) for ids in prompts],
            echo_texts,
            num_open=len(sub_ids),
        )
        now = asyncio.get_running_loop().time()
        for i, sub_id in enumerate(sub_ids):
            engine_request = EngineRequest(
                sub_id,
                prompts[i // n],
                limits[i // n],
                cache_salt=req.cache_salt,
                min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos,
                seed_key=seeds[i],
            )
            try:
                self._core.add_request(engine_request)
            except ValueError as exc:  # a duplicate id, or a request that can never fit
                for started in sub_ids[:i]:
                    self._abort(started)
                raise InvalidRequest(str(exc)) from exc
            self._waiters[sub_id] = Waiter(gen.queue, i, started_s=now)
            self._latency.prompt_tokens += len(prompts[i // n])
        self._counters.num_requests += 1
        self._wake.set()
        return gen

    async def _collect(
        self,
        gen: Generation,
        fmt: ResponseFormat,
        req: CompletionRequest | ChatCompletionRequest,
        *,
        scorer: ChoiceScorer | None = None,
        forced: _ForcedCalls | None = None,
    ) -> web.Response:
        if req.has_stops() and forced is None:
            return await self._collect_with_stops(gen, fmt, req, scorer)
        token_ids: list[list[int]] = [[] for _ in gen.sub_ids]
        reasons: list[str | None] = [None for _ in gen.sub_ids]
        while gen.num_open > 0:
            index, output = await gen.queue.get()
            token_ids[index].extend(output.new_token_ids)
            gen.account(index, output)
            if output.finished:
                reasons[index] = finish_reason(output)
        texts = [gen.echo(i) + self._tokenizer.decode(ids) for i, ids in enumerate(token_ids)]
        scores = _score_all(scorer, token_ids)
        calls: list[ToolCall | None] | None = None
        if forced is not None:
            # The calls stand in for the text; a choice cut short (an abort) has none.
            calls = [
                c if r != "abort" else None for c, r in zip(forced.calls, reasons, strict=True)
            ]
            reasons = [forced.reason if c else r for c, r in zip(calls, reasons, strict=True)]
            texts = ["" if c else t for c, t in zip(calls, texts, strict=True)]
        body = fmt.response(
            gen.response_id,
            gen.created,
            texts,
            reasons,
            gen.usage(),
            logprobs=scores,
            tool_calls=calls,
        )
        return _answer(gen, body)

    async def _collect_with_stops(
        self,
        gen: Generation,
        fmt: ResponseFormat,
        req: CompletionRequest | ChatCompletionRequest,
        scorer: ChoiceScorer | None = None,
    ) -> web.Response:
        checks = self._stop_checks(req, len(gen.sub_ids))
        pieces: list[list[str]] = [[gen.echo(i)] for i in range(len(gen.sub_ids))]
        reasons: list[str | None] = [None for _ in gen.sub_ids]
        stops: list[str | int | None] = [None for _ in gen.sub_ids]
        token_ids: list[list[int]] = [[] for _ in gen.sub_ids]
        while gen.num_open > 0:
            index, output = await gen.queue.get()
            if reasons[index] is not None:
                continue  # stopped: what was already on its way is not part of it
            token_ids[index].extend(output.new_token_ids)
            text, stop = checks[index].feed(output.new_token_ids, final=output.finished)
            pieces[index].append(text)
            if stop is not None:
                reasons[index], stops[index] = "stop", stop
                self._stop_choice(gen, index, output, checks[index].num_tokens)
            elif output.finished:
                gen.account(index, output)
                reasons[index] = finish_reason(output)
        texts = ["".join(parts) for parts in pieces]
        # A choice's tokens are those its stop check counted (up to the stop).
        kept = [ids[: check.num_tokens] for ids, check in zip(token_ids, checks, strict=True)]
        body = fmt.response(
            gen.response_id,
            gen.created,
            texts,
            reasons,
            gen.usage(),
            stop_reasons=stops,
            logprobs=_score_all(scorer, kept),
        )
        return _answer(gen, body)

    def _stop_checks(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        num_choices: int,
        *,
        apply_stops: bool = True,
    ) -> list[StopCheck]:
        stops = req.stop_strings() if apply_stops else ()
        ids = frozenset(req.stop_token_ids or ()) if apply_stops else frozenset()
        include = req.include_stop_str_in_output
        return [StopCheck(self._tokenizer, stops, ids, include=include) for _ in range(num_choices)]

    def _stop_choice(
        self, gen: Generation, index: int, output: RequestOutput, num_tokens: int
    ) -> None:
        """End choice ``index`` at a stop sequence: the engine request stops now (vLLM's
        output processor aborts it the same way) and counts as finished, with ``stop``."""
        sub_id = gen.sub_ids[index]
        waiter = self._waiters.pop(sub_id, None)
        if waiter is not None:  # still running in the engine
            self._core.abort_request(sub_id)
            self._wake.set()
            self._latency.e2e.observe(asyncio.get_running_loop().time() - waiter.started_s)
            self._latency.finished["stop"] += 1
        elif output.finished:  # it ended in this very output: counted as its own reason
            self._latency.finished[finish_reason(output)] -= 1
            self._latency.finished["stop"] += 1
        gen.finish(index, num_tokens, output.num_cached_tokens)

    async def _stream(
        self,
        request: web.Request,
        gen: Generation,
        fmt: ResponseFormat,
        req: CompletionRequest | ChatCompletionRequest,
        *,
        scorer: ChoiceScorer | None = None,
        forced: _ForcedCalls | None = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        response.headers["x-request-id"] = gen.request_id
        await response.prepare(request)
        rid, created = gen.response_id, gen.created
        continuous = req.include_continuous_usage()
        num_choices = len(gen.sub_ids)
        # Without stop sequences a check is the incremental decoder alone. Forced tool
        # calls stand in for the text, so stop strings do not apply to them.
        checks = self._stop_checks(req, num_choices, apply_stops=forced is None)
        calls = None
        tool_reason = ""
        if forced is not None:
            calls = [ToolCallStream(c, n) for c, n in zip(forced.calls, forced.limits, strict=True)]
            tool_reason = forced.reason
        stopped = [False] * num_choices
        echoed = [False] * num_choices
        num_tokens = [0] * num_choices
        num_chars = [0] * num_choices  # text sent so far (logprobs' text offsets)
        try:
            for index in range(num_choices):
                usage = gen.choice_usage(index, 0) if continuous else None
                first = fmt.first_chunk(rid, created, index, usage=usage)
                if first is not None:
                    await response.write(sse(first))
            while gen.num_open > 0:
                index, output = await gen.queue.get()
                if stopped[index]:
                    continue  # ended at a stop sequence; this was already on its way
                reason: str | None
                check = checks[index]
                before = num_tokens[index]
                text, stop = check.feed(output.new_token_ids, final=output.finished)
                if stop is not None:
                    stopped[index] = True
                    self._stop_choice(gen, index, output, check.num_tokens)
                    reason = "stop"
                    num_tokens[index] = check.num_tokens
                else:
                    gen.account(index, output)
                    reason = finish_reason(output) if output.finished else None
                    num_tokens[index] += len(output.new_token_ids)
                if output.new_token_ids or reason is not None:
                    if not echoed[index]:
                        text = gen.echo(index) + text
                        echoed[index] = True
                    usage = gen.choice_usage(index, num_tokens[index]) if continuous else None
                    scores = None
                    if scorer is not None:
                        piece = output.new_token_ids[: num_tokens[index] - before]
                        scores = scorer.score(index, piece, num_chars[index])
                    num_chars[index] += len(text)
                    delta = None
                    if calls is not None:  # the call stands in for the text
                        text = ""
                        if reason is not None and reason != "abort":
                            reason = tool_reason
                        if reason != "abort":  # an aborted choice's call is not finished
                            delta = calls[index].delta(num_tokens[index], final=reason is not None)
                        if delta is None and reason is None and scores is None:
                            continue  # nothing new to send yet
                    chunk = fmt.chunk(
                        rid,
                        created,
                        index,
                        text,
                        reason,
                        usage=usage,
                        stop_reason=stop,
                        logprobs=scores,
                        tool_calls=delta,
                    )
                    await response.write(sse(chunk))
            if req.include_usage():
                await response.write(sse(fmt.usage_chunk(rid, created, gen.usage())))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            # The client went away; the caller's cleanup aborts what is still running.
            logger.debug("client disconnected from stream %s", rid)
        return response

    # --- tokenization -------------------------------------------------------------

    async def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return await self._run_tokenizer(lambda: self._tokenizer.encode(prompt), len(prompt))

    async def _encode_chat(self, req: ChatCompletionRequest) -> list[int]:
        return await self._encode_messages(
            req.message_dicts(), req.add_generation_prompt, req.template_vars()
        )

    async def _encode_messages(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        template_vars: dict[str, Any] | None = None,
    ) -> list[int]:
        def encode_messages() -> list[int]:
            text = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt, template_vars
            )
            # The template already placed any BOS token.
            return self._tokenizer.encode(text, add_special_tokens=False)

        size = sum(len(str(m.get("content") or "")) for m in messages)
        return await self._run_tokenizer(encode_messages, size)

    async def _run_tokenizer(self, fn: Callable[[], _T], size: int) -> _T:
        if size <= _INLINE_TOKENIZE_CHARS:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    # --- checks -------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise ModelNotFound(f"The model `{model}` does not exist.")

    def _output_limit(
        self, req: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int
    ) -> int:
        """Tokens to generate for one prompt, checked against the context.

        A limit the request gives must fit (else 400, as vLLM says). Without one the
        default (16) is cut to the room the context has left, so a request is never
        refused for a limit it did not ask for (vLLM would generate until EOS, which
        this engine never samples, or the end of the context).
        """
        limit = req.output_tokens()
        room = self.config.max_model_len - num_prompt_tokens
        if req.given_output_tokens() is None and 0 < room < limit:
            limit = room
        self._check_length(num_prompt_tokens, limit)
        if req.min_tokens > limit:
            raise InvalidRequest(
                f"min_tokens ({req.min_tokens}) must be at most max_tokens ({limit})"
            )
        return limit

    def _check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty after tokenization")
        total = num_prompt_tokens + max_tokens
        if total > self.config.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.config.max_model_len} tokens. "
                f"However, you requested {total} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} in the completion)."
            )

    # --- other endpoints ----------------------------------------------------------

    async def _tokenize(self, request: web.Request) -> web.Response:
        req = decode_tokenize_request(await read_body(request))
        self._check_model(req.model)
        if req.messages is not None:
            messages = [m.to_dict() for m in req.messages]
            tokens = await self._encode_messages(
                messages, req.add_generation_prompt, req.template_vars()
            )
        else:
            prompt = req.prompt or ""
            tokens = await self._run_tokenizer(
                lambda: self._tokenizer.encode(prompt, req.add_special_tokens), len(prompt)
            )
        strs = [self._tokenizer.decode([t]) for t in tokens] if req.return_token_strs else None
        body = TokenizeResponse(
            count=len(tokens),
            max_model_len=self.config.max_model_len,
            tokens=tokens,
            token_strs=strs,
        )
        return json_response(encode(body))

    async def _render_completions(self, request: web.Request) -> web.Response:
        req = decode_completion_request(await read_body(request))
        self._check_model(req.model)
        prompts = [await self._encode_prompt(p) for p in req.prompts()]
        request_id = request_id_of(request, "cmpl")
        many = len(prompts) > 1
        rendered = [
            self._render_one(f"{request_id}-{i}" if many else request_id, ids, req)
            for i, ids in enumerate(prompts)
        ]
        return json_response(encode(rendered))

    async def _render_chat(self, request: web.Request) -> web.Response:
        req = decode_chat_request(await read_body(request))
        self._check_model(req.model)
        ids = await self._encode_chat(req)
        return json_response(encode(self._render_one(request_id_of(request, "chatcmpl"), ids, req)))

    def _render_one(
        self, request_id: str, token_ids: list[int], req: CompletionRequest | ChatCompletionRequest
    ) -> RenderedRequest:
        self._check_length(len(token_ids), req.output_tokens())
        return RenderedRequest.of(request_id, token_ids, req, self.config.model_name)

    async def _detokenize(self, request: web.Request) -> web.Response:
        req = decode_detokenize_request(await read_body(request))
        self._check_model(req.model)
        tokens = req.tokens
        text = await self._run_tokenizer(lambda: self._tokenizer.decode(tokens), len(tokens))
        return json_response(encode(DetokenizeResponse(prompt=text)))

    async def _models(self, request: web.Request) -> web.Response:
        name = self.config.model_name
        card = ModelCard(
            id=name, created=int(time.time()), max_model_len=self.config.max_model_len, root=name
        )
        return json_response(encode(ModelList(data=[card])))

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return json_response(encode({"version": __version__}))

    async def _metrics(self, request: web.Request) -> web.Response:
        text = render_engine_metrics(self._core, self.config.model_name, self._latency)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")


def _answer(gen: Generation, body: bytes) -> web.Response:
    """A whole (unstreamed) generation answer, with its request id echoed."""
    response = web.Response(body=body, content_type="application/json")
    response.headers["x-request-id"] = gen.request_id
    return response


def _score_all(
    scorer: ChoiceScorer | None, token_ids: list[list[int]]
) -> list[Logprobs | None] | None:
    if scorer is None:
        return None
    return [scorer.score(i, ids) for i, ids in enumerate(token_ids)]


@dataclass(slots=True)
class _ForcedCalls:
    """A forced ``tool_choice``'s answer: one call per choice, in place of its text."""

    calls: list[ToolCall]
    reason: str  # the finish reason of a choice that made its call, as vLLM gives it
    limits: list[int]  # each choice's expected tokens (to pace a streamed call)


def _forced_calls(
    req: CompletionRequest | ChatCompletionRequest, request_id: str, limits: list[int]
) -> _ForcedCalls | None:
    """The calls a forced ``tool_choice`` makes, one per choice (``limits``: each
    prompt's output tokens), fixed by the request id as its text would be."""
    if not isinstance(req, ChatCompletionRequest):
        return None
    functions = req.forced_tools()
    if functions is None:
        return None
    # vLLM ends a "required" answer with "tool_calls", a named function's with "stop".
    reason = "tool_calls" if req.tool_choice == "required" else "stop"
    n = req.num_choices()
    seeds = engine_request_ids(request_id, len(limits), n)
    calls = [plan_tool_call(functions, seed) for seed in seeds]
    return _ForcedCalls(calls, reason, [limits[i // n] for i in range(len(seeds))])
