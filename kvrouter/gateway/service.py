"""The gateway as one long-lived component: workers, background loops, lifecycle.

:class:`Gateway` owns the worker registry, the shared upstream session, the health
checker and metrics scraper tasks, the per-worker KV event feeds and the request
forwarder. ``async with Gateway(cfg, core) as gw:`` starts it; :meth:`Gateway.aclose`
stops the loops, closes the event feeds and the session (idempotent).

A worker that fails a health check, that cannot be reached for a request, or that
fails several answers in a row, leaves the rotation and its blocks leave the index
(``core.remove_worker``); it rejoins when a health check passes, with a fresh KV event
subscription that replays its cache into the index. A worker that answers one request
with an error stays in rotation (that request's retries skip it).

Load metrics come from each worker's ``/metrics`` page (scraped every
``metrics_scrape_interval_s``), or, for a worker configured with a ``metrics``
endpoint, from what it pushes over ZeroMQ (``metrics_feeds``); pushed workers are not
scraped.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import msgspec

from kvrouter.clock import Clock, monotonic
from kvrouter.errors import InvalidRequest, NoWorkerAvailable, UpstreamError
from kvrouter.gateway.config import TOKENIZER_WORKER, GatewayConfig, WorkerSpec
from kvrouter.gateway.core import RoutingCore
from kvrouter.gateway.forward import RequestForwarder
from kvrouter.gateway.prompts import (
    INLINE_MAX_BODY_BYTES,
    Kind,
    ParsedBody,
    PreparedPrompt,
    can_prepare_inline,
    first_prompt,
    prepare_prompt,
)
from kvrouter.gateway.proxy import UpstreamClient, UpstreamFailure
from kvrouter.gateway.registry import WorkerRegistry, WorkerState
from kvrouter.gateway.stats import GatewayCounters
from kvrouter.lifecycle import AsyncLifecycle, cancel_and_wait
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.tokenizer import Tokenizer, normalize_messages
from kvrouter.transport.subscriber import SubscriberStats

__all__ = ["EventFeeds", "Gateway"]

log = logging.getLogger(__name__)
_json = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.Encoder().encode

# How often each worker's /v1/models is read again (LoRA adapters come and go).
MODELS_REFRESH_S = 30.0

# Chat request fields passed to a worker's /tokenize with the messages.
_TOKENIZE_CHAT_FIELDS = (
    "add_generation_prompt",
    "continue_final_message",
    "tools",
    "chat_template",
    "chat_template_kwargs",
)

# How often queued requests are checked against room freed by expired bookings.
QUEUE_POLL_INTERVAL_S = 1.0


class EventFeeds(Protocol):
    """Starts and stops the KV event subscription of each worker that has one."""

    async def start_feed(self, state: WorkerState) -> None: ...

    async def stop_feed(self, worker_id: int) -> None: ...

    async def aclose(self) -> None: ...


class KvEventFeeds(EventFeeds, Protocol):
    """Event feeds that count, per stream, what they could not read."""

    def stats(self) -> SubscriberStats: ...


class Gateway(AsyncLifecycle):
    """Everything behind the HTTP routes; see the module docstring."""

    def __init__(
        self,
        cfg: GatewayConfig,
        core: RoutingCore,
        *,
        tokenizer: Tokenizer | None = None,
        feeds: KvEventFeeds | None = None,
        metrics_feeds: EventFeeds | None = None,
        clock: Clock = monotonic,
    ) -> None:
        self.cfg = cfg
        self.core = core
        self.tokenizer = tokenizer
        self.registry = WorkerRegistry(clock)
        self.counters = GatewayCounters(history=cfg.decision_history)
        self.upstream = UpstreamClient(
            max_connections=cfg.max_connections,
            connect_timeout_s=cfg.connect_timeout_s,
            request_timeout_s=cfg.request_timeout_s,
            stream_idle_timeout_s=cfg.stream_idle_timeout_s,
            worker_api_key=cfg.worker_api_key,
            # A client's key for the gateway is not one for the workers.
            forward_authorization=cfg.api_key is None,
        )
        self.forwarder = RequestForwarder(
            cfg,
            registry=self.registry,
            core=core,
            upstream=self.upstream,
            counters=self.counters,
            prepare=self.prepare,
            clock=clock,
        )
        self._feeds = feeds
        self._metrics_feeds = metrics_feeds
        # Model names the workers serve as LoRA adapters: a request naming one is hashed
        # with the adapter's salt, as vLLM salts the blocks it stores for it.
        self.lora_models: frozenset[str] = frozenset()
        self._clock = clock
        # Tokenizing holds the GIL for most of its time; a couple of threads keep the
        # loop free without pretending to add parallelism.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvrouter-tok")
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._resubscribing: set[int] = set()
        self._passthrough_turn = itertools.count()
        self.registry.add_listeners(on_down=self._on_down, on_up=self._on_up)

    def event_stream_errors(self) -> dict[int, tuple[int, str | None]]:
        """Per worker id: KV event messages it sent that could not be read, and why the
        latest one could not."""
        out: dict[int, tuple[int, str | None]] = {}
        for stream in self._feeds.stats().streams if self._feeds is not None else ():
            count, last = out.get(stream.worker_id, (0, None))
            count += sum(stream.decode_errors.values())
            out[stream.worker_id] = (count, stream.last_decode_error or last)
        return out

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Open the session, add the configured workers, start the background loops."""
        if self._started:
            return
        self._started = True
        await self.upstream.start()
        try:
            for spec in self.cfg.workers:
                await self.add_worker(spec)
        except BaseException:  # e.g. a worker given twice: nothing may be left open
            await self.aclose()
            raise
        self._spawn(self._health_loop(), "health")
        self._spawn(self._scrape_loop(), "metrics-scrape")
        if self.core.queue_enabled:
            self._spawn(self._queue_loop(), "router-queue")

    async def aclose(self) -> None:
        """Stop the loops, the event feeds and the session; idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        await cancel_and_wait(*tasks)
        if tasks:
            log.info("gateway stopped %d background task(s)", len(tasks))
        for feeds in (self._feeds, self._metrics_feeds):
            if feeds is not None:
                await feeds.aclose()
        await self.upstream.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"kvrouter-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_if_failed)

    # -- workers -------------------------------------------------------------------------
    async def add_worker(self, spec: WorkerSpec) -> WorkerState:
        """Register a worker, start its event feed and put it in rotation."""
        state = self.registry.add(spec)
        if self._feeds is not None and spec.kv_events:
            await self._feeds.start_feed(state)
        if self._metrics_feeds is not None and spec.metrics:
            await self._metrics_feeds.start_feed(state)
        return state

    async def remove_worker(self, worker_id: int) -> WorkerState:
        """Take a worker out for good; raises ``KeyError`` when it is unknown."""
        state = self.registry.remove(worker_id)
        # Out of the routing core before the first await: a request routed while the
        # feeds stop would find its worker gone from the rotation.
        self.core.remove_worker(state.key)
        if state.lora_ids:
            self._note_lora_models()
        if self._feeds is not None and state.spec.kv_events:
            await self._feeds.stop_feed(worker_id)
        if self._metrics_feeds is not None and state.spec.metrics:
            await self._metrics_feeds.stop_feed(worker_id)
        return state

    def on_pushed_metrics(self, metrics: ForwardPassMetrics) -> None:
        """A worker pushed its load: into the aggregator, while it is in rotation."""
        state = self.registry.get(metrics.worker_id)
        # A worker out of rotation is not a candidate; its metrics would only skew the
        # fleet averages until it is back.
        if state is None or not state.healthy:
            return
        self.core.update_metrics(metrics)
        self.registry.mark_metrics(state.worker_id)

    def _is_pushed(self, state: WorkerState) -> bool:
        return self._metrics_feeds is not None and bool(state.spec.metrics)

    def _on_down(self, state: WorkerState) -> None:
        # Its cache is unknown from now on: route nothing there by stale overlap.
        self.core.remove_worker(state.key)

    def _on_up(self, state: WorkerState) -> None:
        self.core.add_worker(state.key, publishes_events=bool(state.spec.kv_events))

    # -- background loops ----------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            workers = list(self.registry)
            results = await asyncio.gather(
                *(self.check_health(w) for w in workers), return_exceptions=True
            )
            for state, result in zip(workers, results, strict=True):
                if isinstance(result, Exception):
                    log.error("health check of worker %d failed", state.worker_id, exc_info=result)
            await asyncio.sleep(self.cfg.health_check_interval_s)

    async def check_health(self, state: WorkerState) -> bool:
        """One ``GET /health`` of ``state``; updates the registry."""
        try:
            status, _ = await self.upstream.get(
                state.url + "/health", timeout_s=self.cfg.health_check_timeout_s
            )
        except UpstreamError as exc:
            self.registry.mark_failed(state.worker_id, f"health check failed: {exc}")
            return False
        if status != 200:
            self.registry.mark_failed(state.worker_id, f"health check answered {status}")
            return False
        rejoins = not state.healthy
        self.registry.mark_ok(state.worker_id)
        if rejoins and self.registry.get(state.worker_id) is state:
            await self._resubscribe(state)
        if rejoins or self._clock() - state.models_at_s >= MODELS_REFRESH_S:
            # Which model names are LoRA adapters (adapters load and unload at run time).
            await self._models_of(state)
        return True

    async def _resubscribe(self, state: WorkerState) -> None:
        """Follow a worker that rejoined the rotation with a fresh event subscription.

        Its blocks left the index when it left, but its cache did not (a stall, a
        dropped connection): the old stream would go on from where it was, and every
        event that builds on a forgotten block would be rejected. A new subscription
        first replays what the worker's replay socket holds, so the index learns its
        cache again (a restarted worker replays its new, empty history).
        """
        worker_id = state.worker_id
        if self._feeds is None or not state.spec.kv_events or worker_id in self._resubscribing:
            return
        self._resubscribing.add(worker_id)  # two checks passing at once subscribe once
        try:
            await self._feeds.stop_feed(worker_id)
            if self.registry.get(worker_id) is state:  # not removed meanwhile
                await self._feeds.start_feed(state)
        finally:
            self._resubscribing.discard(worker_id)

    async def _queue_loop(self) -> None:
        # Finishes and first tokens dispatch queued requests at once; this catches room
        # freed by expired bookings, which no event announces.
        while True:
            await asyncio.sleep(QUEUE_POLL_INTERVAL_S)
            self.core.poll()

    async def _scrape_loop(self) -> None:
        while True:
            scraped = [w for w in self.registry.in_rotation() if not self._is_pushed(w)]
            results = await asyncio.gather(
                *(self.scrape_metrics(w) for w in scraped), return_exceptions=True
            )
            for state, result in zip(scraped, results, strict=True):
                if isinstance(result, Exception):  # a bug of ours: logged, never the loop's end
                    log.error(
                        "metrics scrape of worker %d failed", state.worker_id, exc_info=result
                    )
            await asyncio.sleep(self.cfg.metrics_scrape_interval_s)

    async def scrape_metrics(self, state: WorkerState) -> bool:
        """One ``GET /metrics`` of ``state`` into the aggregator."""
        try:
            status, body = await self.upstream.get(
                state.url + "/metrics", timeout_s=self.cfg.health_check_timeout_s
            )
        except UpstreamError as exc:
            log.debug("metrics scrape of worker %d failed: %s", state.worker_id, exc)
            return False
        if status != 200:
            return False
        ok = self.core.update_metrics_text(
            state.key,
            body.decode("utf-8", errors="replace"),
            engine_rank=self.registry.rank_to_name(state),
        )
        if ok:
            self.registry.mark_metrics(state.worker_id)
        return ok

    # -- tokenizing ----------------------------------------------------------------------
    async def prepare(self, parsed: ParsedBody, kind: Kind) -> PreparedPrompt:
        """Token ids and block hashes of the routed prompt.

        Small prompts that need no real tokenizer are prepared right here, where a
        thread hop would cost more than the work; the rest off the event loop (see
        ``prompts.can_prepare_inline``).
        """
        token_ids = None
        if self.cfg.tokenizer == TOKENIZER_WORKER and not _has_token_ids(parsed, kind):
            token_ids = await self._tokenize_on_worker(parsed.payload, kind)
            inline = len(parsed.forward_body) <= INLINE_MAX_BODY_BYTES
        else:
            inline = can_prepare_inline(self.tokenizer, parsed, kind)
        job = functools.partial(
            prepare_prompt,
            self.tokenizer,
            parsed.payload,
            kind,
            block_size=self.core.block_size,
            max_prompt_tokens=self.cfg.max_prompt_tokens,
            token_ids=token_ids,
            lora_models=self.lora_models,
        )
        if inline:
            self.counters.num_inline_prepares += 1
            return job()
        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    async def _tokenize_on_worker(self, payload: dict[str, Any], kind: Kind) -> list[int]:
        """Ask a worker for the token ids it would use (vLLM's ``/tokenize``)."""
        workers = self.registry.in_rotation()
        if not workers:
            raise NoWorkerAvailable("no worker is available to tokenize the prompt")
        if kind == "chat":
            # Images and other media as markers, as with a local tokenizer: the worker's
            # tokens for them are placeholders that every image shares.
            messages = normalize_messages(payload["messages"], media="mark")
            body: dict[str, Any] = {"messages": messages}
            # What vLLM's /tokenize takes that changes the rendered prompt: tool
            # definitions, template switches (e.g. enable_thinking), a custom template.
            for name in _TOKENIZE_CHAT_FIELDS:
                if name in payload:
                    body[name] = payload[name]
        else:
            body = {"prompt": first_prompt(payload)}
        if "model" in payload:
            body["model"] = payload["model"]
        url = workers[0].url + "/tokenize"
        response = await self.upstream.open(url, _encode(body))
        data = await response.read()
        if response.status != 200:
            raise InvalidRequest(f"the worker could not tokenize the prompt: {data[:300]!r}")
        tokens = _json.decode(data).get("tokens")
        if not isinstance(tokens, list):
            raise UpstreamError("the worker's /tokenize answer has no 'tokens' list")
        return [int(t) for t in tokens]

    # -- pass-through ----------------------------------------------------------------------
    async def passthrough(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes, int]:
        """POST ``body`` to ``path`` on a worker in rotation and return ``(status, body,
        worker_id)``: for vLLM's ``/tokenize`` and ``/detokenize``, which any worker
        answers alike. Workers take turns; one that cannot be reached or answers 5xx
        passes the request to the next. Nothing is routed or booked."""
        workers = self.registry.in_rotation()
        if not workers:
            raise NoWorkerAvailable("no worker is available")
        first = next(self._passthrough_turn) % len(workers)
        last: UpstreamError | None = None
        for state in workers[first:] + workers[:first]:
            try:
                response = await self.upstream.open(state.url + path, body, headers)
            except UpstreamFailure as exc:
                last = exc
                continue
            return response.status, await response.read(), state.worker_id
        assert last is not None
        raise last

    # -- models --------------------------------------------------------------------------
    async def list_models(self) -> dict[str, Any]:
        """``GET /v1/models``: the union of the models the workers in rotation serve."""
        workers = self.registry.in_rotation()
        answers = await asyncio.gather(*(self._models_of(w) for w in workers))
        seen: dict[str, dict[str, Any]] = {}
        for models in answers:
            for card in models:
                seen.setdefault(str(card.get("id")), card)
        return {"object": "list", "data": list(seen.values())}

    async def _models_of(self, state: WorkerState) -> list[dict[str, Any]]:
        """The model cards ``state`` lists, noted on it; ``[]`` (and what it listed
        before kept) when it gives no usable answer, e.g. a 503 under load."""
        try:
            status, body = await self.upstream.get(
                state.url + "/v1/models", timeout_s=self.cfg.health_check_timeout_s
            )
            data = _json.decode(body) if status == 200 else None
        except (UpstreamError, msgspec.DecodeError):
            return []
        listed = data.get("data") if data is not None else None
        if not isinstance(listed, list):
            return []
        cards = [c for c in listed if isinstance(c, dict)]
        state.model_ids = tuple(str(c.get("id")) for c in cards)
        lora_ids = tuple(
            str(c.get("id"))
            for c in cards
            if isinstance(c.get("parent"), str) and c["parent"] and c["parent"] != c.get("id")
        )
        state.models_at_s = self._clock()
        if lora_ids != state.lora_ids:  # the union is rebuilt only when a worker's changes
            state.lora_ids = lora_ids
            self._note_lora_models()
        return cards

    def _note_lora_models(self) -> None:
        self.lora_models = frozenset(i for w in self.registry for i in w.lora_ids)


def _log_if_failed(task: asyncio.Task[None]) -> None:
    """A background loop that ended on an error says so (it would otherwise end unseen)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s stopped", task.get_name(), exc_info=exc)


def _has_token_ids(parsed: ParsedBody, kind: Kind) -> bool:
    return kind == "completion" and isinstance(first_prompt(parsed.payload), list)
