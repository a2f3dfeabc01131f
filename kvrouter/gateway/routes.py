"""The gateway's HTTP routes (aiohttp): the OpenAI API, admin, debug, metrics, dashboard.

=========================  ==================================================
``POST /v1/completions``   route and proxy (stream or not)
``POST /v1/chat/completions``
``POST /v1/embeddings``    routed by its (first) input, as a completion prompt
``POST /v1/responses``     routed as the chat it stands for; a follow-up
                           (``previous_response_id``) to the worker that stored it
``GET /v1/responses/{id}`` passed to the worker that stored it (and ``POST .../cancel``)
``POST /tokenize``         passed to a worker in rotation (vLLM's), unrouted
``POST /detokenize``
``GET /v1/models``         the union of the workers' models
``GET /health``            200 when at least one worker is in rotation, else 503
``GET /metrics``           Prometheus text, built from ``stats()`` at scrape time
``GET /admin/workers``     workers with health, metrics age and index size
``POST /admin/workers``    add ``{"url": ..., "kv_events": ..., "replay": ...}``
``DELETE /admin/workers/{id}``
``GET /debug/decisions``   ``?n=20`` recent decisions with explanations
``POST /debug/explain``    route a request body without sending it
``GET /dashboard``         a self-contained live page polling ``/dashboard/data``
=========================  ==================================================

Every error is OpenAI's error JSON, mapped in :mod:`kvrouter.gateway.http_errors`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web

from kvrouter.errors import ConfigError, InvalidRequest, RouterError
from kvrouter.gateway.config import parse_worker_spec
from kvrouter.gateway.fanout import split_batch
from kvrouter.gateway.forward import read_body
from kvrouter.gateway.http_errors import NotFound, error_body, map_error, retry_after_header
from kvrouter.gateway.metrics import CONTENT_TYPE, GatewayCollector, render_metrics
from kvrouter.gateway.overrides import RoutingOverrides, parse_overrides
from kvrouter.gateway.prompts import Kind, ParsedBody, batch_prompts, parse_body
from kvrouter.gateway.service import Gateway
from kvrouter.protocol import decode_json

__all__ = ["GATEWAY_KEY", "build_app"]

log = logging.getLogger(__name__)
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("kvrouter_gateway", Gateway)
_encode = msgspec.json.Encoder().encode
_decode_obj = msgspec.json.Decoder(dict[str, Any])
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(data), status=status, content_type="application/json")


def error_response(exc: BaseException, default_retry_after_s: float = 1.0) -> web.Response:
    """The OpenAI-shaped answer for ``exc`` (one table: ``http_errors.ERROR_TABLE``)."""
    mapping = map_error(exc)
    headers = {}
    if mapping.retry_after:
        headers["Retry-After"] = retry_after_header(exc, default_retry_after_s)
    return web.Response(
        body=error_body(str(exc), mapping.error_type, mapping.status),
        status=mapping.status,
        content_type="application/json",
        headers=headers,
    )


def _http_error(exc: web.HTTPException) -> web.Response:
    status = exc.status
    error_type = "not_found_error" if status == 404 else "invalid_request_error"
    message = exc.reason if status != 404 else "no such route: the gateway serves the OpenAI API"
    if status == 413:
        message = "the request body is over the size limit"
    response = web.Response(
        body=error_body(message, error_type, status), status=status, content_type="application/json"
    )
    if status == 405 and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


_ADMIN_PREFIXES = ("/admin/", "/debug/", "/dashboard/")
_KEYED_PATHS = frozenset({"/tokenize", "/detokenize"})


def required_key(path: str, api_key: str | None, admin_api_key: str | None) -> str | None:
    """The API key a request for ``path`` must bear, if any.

    The OpenAI API (``/v1/...``) takes ``api_key``; the admin API, the debug routes and
    the dashboard's data take ``admin_api_key``, or ``api_key`` when that is the only
    one set. ``/health``, ``/metrics`` and the dashboard page itself stay open, for
    probes and Prometheus (as vLLM leaves them).

    >>> required_key("/v1/completions", "k", None)
    'k'
    >>> required_key("/admin/workers", "k", "admin")
    'admin'
    >>> required_key("/metrics", "k", "admin") is None
    True
    """
    if path.startswith("/v1/") or path in _KEYED_PATHS:
        return api_key
    if path.startswith(_ADMIN_PREFIXES):
        return admin_api_key or api_key
    return None


def _bearer_matches(request: web.Request, key: str) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the time taken says nothing about how much of the key matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _unauthorized() -> web.Response:
    return web.Response(
        body=error_body(
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            401,
        ),
        status=401,
        content_type="application/json",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _make_middleware(gateway: Gateway) -> Any:
    counters = gateway.counters
    retry_after_s = gateway.cfg.retry_after_s
    api_key = gateway.cfg.api_key
    admin_api_key = gateway.cfg.admin_api_key
    keyed = api_key is not None or admin_api_key is not None

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        key = required_key(request.path, api_key, admin_api_key) if keyed else None
        if key is not None and not _bearer_matches(request, key):
            counters.requests[(name, 401)] += 1
            return _unauthorized()
        try:
            response = await handler(request)
        except RouterError as exc:
            response = error_response(exc, retry_after_s)
            if response.status >= 500:
                log.warning("%s %s -> %d: %s", request.method, request.path, response.status, exc)
        except web.HTTPException as exc:
            response = _http_error(exc)
        except Exception as exc:  # a bug of ours: still a JSON answer, logged and counted
            log.exception("%s %s failed", request.method, request.path)
            response = error_response(
                RuntimeError(f"internal error ({type(exc).__name__}); see the gateway log")
            )
        counters.requests[(name, response.status)] += 1
        return response

    return errors


class _Handlers:
    """Route handlers bound to one :class:`Gateway`."""

    def __init__(self, gateway: Gateway, collector: GatewayCollector) -> None:
        self.gw = gateway
        self.collector = collector

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.gw.forwarder.handle(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.gw.forwarder.handle(request, "chat")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self.gw.forwarder.handle(request, "embedding")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self.gw.forwarder.handle(request, "response")

    async def stored_response(self, request: web.Request) -> web.Response:
        return await self.gw.forwarder.stored_response(request, request.match_info["id"])

    async def cancel_response(self, request: web.Request) -> web.Response:
        response_id = request.match_info["id"]
        return await self.gw.forwarder.stored_response(request, response_id, "/cancel")

    async def tokenize(self, request: web.Request) -> web.Response:
        return await self._pass(request, "/tokenize")

    async def detokenize(self, request: web.Request) -> web.Response:
        return await self._pass(request, "/detokenize")

    async def _pass(self, request: web.Request, path: str) -> web.Response:
        body = await read_body(request, self.gw.cfg.max_body_bytes)
        status, data, worker_id = await self.gw.passthrough(path, body, request.headers)
        return web.Response(
            body=data,
            status=status,
            content_type="application/json",
            headers={"x-kvrouter-worker": str(worker_id)},
        )

    async def models(self, request: web.Request) -> web.Response:
        return _json(await self.gw.list_models())

    async def health(self, request: web.Request) -> web.Response:
        n = len(self.gw.registry.in_rotation())
        body = {"status": "ok" if n else "no_workers", "workers_in_rotation": n}
        return _json(body, status=200 if n else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=render_metrics(self.collector), headers={"Content-Type": CONTENT_TYPE}
        )

    # -- admin -------------------------------------------------------------------------
    async def list_workers(self, request: web.Request) -> web.Response:
        stats = self.gw.core.stats()
        unreadable = self.gw.event_stream_errors()
        out = []
        for info in self.gw.registry.infos():
            state = self.gw.registry.get(info.worker_id)
            key = state.key if state is not None else None
            rejected, why = stats.event_rejections.get(key, (0, None)) if key else (0, None)
            malformed, unread_why = unreadable.get(info.worker_id, (0, None))
            out.append(
                {
                    "worker_id": info.worker_id,
                    "dp_rank": info.dp_rank,
                    "url": info.url,
                    "kv_events": info.kv_events,
                    "replay": info.replay,
                    "mode": info.mode,
                    "healthy": info.healthy,
                    "consecutive_failures": info.consecutive_failures,
                    "last_error": info.last_error,
                    # Its events the router could not use: unreadable, or refused by
                    # the index (e.g. another block size); the first kind first.
                    "event_errors": malformed + rejected,
                    "last_event_error": unread_why or why,
                    "metrics_age_s": info.metrics_age_s,
                    "index_size": stats.index_size.get(key, 0) if key else 0,
                    "active_blocks": stats.predicted_active_blocks.get(key, 0) if key else 0,
                    "num_requests": info.num_requests,
                    "num_failures": info.num_failures,
                }
            )
        return _json({"workers": out})

    async def add_worker(self, request: web.Request) -> web.Response:
        body = await read_body(request, 1 << 16)
        try:
            data = decode_json(_decode_obj, body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidRequest(f"expected a JSON object describing a worker: {exc}") from exc
        try:
            spec = parse_worker_spec(data)
            state = await self.gw.add_worker(spec)
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from exc
        await self.gw.check_health(state)
        # The registry assigns the id when the spec names none.
        return _json(
            {**spec.to_dict(), "worker_id": state.worker_id, "healthy": state.healthy}, 201
        )

    async def remove_worker(self, request: web.Request) -> web.Response:
        raw = request.match_info["worker_id"]
        try:
            worker_id = int(raw)
        except ValueError as exc:
            raise InvalidRequest(f"worker id must be an integer, got {raw!r}") from exc
        try:
            state = await self.gw.remove_worker(worker_id)
        except KeyError as exc:
            raise NotFound(f"no worker {worker_id}") from exc
        return _json({"removed": state.worker_id, "url": state.url})

    # -- debug -------------------------------------------------------------------------
    async def decisions(self, request: web.Request) -> web.Response:
        raw = request.query.get("n", "20")
        try:
            n = int(raw)
        except ValueError as exc:
            raise InvalidRequest(f"n must be an integer, got {raw!r}") from exc
        if n < 0:
            raise InvalidRequest(f"n must be >= 0, got {n}")
        recent = self.gw.counters.recent_decisions(min(n, 10_000))
        return _json({"decisions": [r.to_dict() for r in recent]})

    async def explain(self, request: web.Request) -> web.Response:
        """Route a completion or chat body without sending it (nothing is booked).

        A batch completion (``prompt`` a list of prompts) is explained prompt by prompt,
        as ``{"prompts": [...]}``, each against the current state as if it came alone.
        """
        body = await read_body(request, self.gw.cfg.max_body_bytes)
        kind: Kind = "chat" if b'"messages"' in body else "completion"
        parsed = parse_body(body, kind)
        overrides = parse_overrides(request.headers, parsed.kvrouter_field)
        batch = batch_prompts(parsed.payload) if kind == "completion" else None
        if batch is None:
            return _json(await self._explain_one(parsed, kind, overrides))
        subs = split_batch(parsed, batch)
        return _json({"prompts": [await self._explain_one(sub, kind, overrides) for sub in subs]})

    async def _explain_one(
        self, parsed: ParsedBody, kind: Kind, overrides: RoutingOverrides
    ) -> dict[str, Any]:
        prompt = await self.gw.prepare(parsed, kind)
        attempt = self.gw.forwarder.explain(prompt, overrides)
        route = attempt.route
        return {
            "worker_id": route.worker.worker_id,
            "dp_rank": route.worker.dp_rank,
            "url": attempt.state.url,
            "policy": route.policy,
            "num_tokens": prompt.num_tokens,
            "request_blocks": route.request_blocks,
            "overlap_blocks": route.overlap_blocks,
            "explanation": list(route.explanation),
        }

    async def dashboard(self, request: web.Request) -> web.Response:
        page = resources.files("kvrouter.gateway").joinpath("dashboard.html").read_text("utf-8")
        return web.Response(text=page, content_type="text/html")

    async def dashboard_data(self, request: web.Request) -> web.Response:
        gw_stats = self.gw.counters.stats()
        state = self.gw.core.debug_state()
        return _json(
            {
                "core": state,
                "in_flight": gw_stats.num_in_flight,
                "retries": gw_stats.num_retries,
                "upstream_errors": gw_stats.num_upstream_errors,
                # The API's requests: not this page's own polls, scrapes or checks.
                "requests": sum(
                    n for (route, _), n in gw_stats.num_requests.items() if route.startswith("/v1/")
                ),
                "workers": [
                    {
                        "worker_id": i.worker_id,
                        "url": i.url,
                        "healthy": i.healthy,
                        "mode": i.mode,
                        "num_requests": i.num_requests,
                        "num_in_flight": i.num_in_flight,
                        "num_failures": i.num_failures,
                        "metrics_age_s": i.metrics_age_s,
                        "dp_rank": i.dp_rank,
                    }
                    for i in self.gw.registry.infos()
                ],
                "decisions": [r.to_dict() for r in self.gw.counters.recent_decisions(10)],
            }
        )


def build_app(gateway: Gateway, collector: GatewayCollector | None = None) -> web.Application:
    """The aiohttp application of ``gateway`` (its lifecycle stays the caller's)."""
    if collector is None:
        collector = GatewayCollector(
            gateway.counters.stats, gateway.core.stats, gateway.registry.infos
        )
    h = _Handlers(gateway, collector)
    # aiohttp's own limit is a safety net; read_body() answers with a clear 413 first.
    app = web.Application(
        middlewares=[_make_middleware(gateway)], client_max_size=gateway.cfg.max_body_bytes
    )
    app[GATEWAY_KEY] = gateway
    add = app.router
    add.add_post("/v1/completions", h.completions)
    add.add_post("/v1/chat/completions", h.chat)
    add.add_post("/v1/embeddings", h.embeddings)
    add.add_post("/v1/responses", h.responses)
    add.add_get("/v1/responses/{id}", h.stored_response)
    add.add_post("/v1/responses/{id}/cancel", h.cancel_response)
    add.add_post("/tokenize", h.tokenize)
    add.add_post("/detokenize", h.detokenize)
    add.add_get("/v1/models", h.models)
    add.add_get("/health", h.health)
    add.add_get("/metrics", h.metrics)
    add.add_get("/admin/workers", h.list_workers)
    add.add_post("/admin/workers", h.add_worker)
    add.add_delete("/admin/workers/{worker_id}", h.remove_worker)
    add.add_get("/debug/decisions", h.decisions)
    add.add_post("/debug/explain", h.explain)
    add.add_get("/dashboard", h.dashboard)
    add.add_get("/dashboard/data", h.dashboard_data)
    return app
