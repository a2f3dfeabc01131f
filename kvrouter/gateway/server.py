"""Assemble and run the gateway: config -> routing core, event feeds, tokenizer -> HTTP.

>>> # async with GatewayServer(build_config(flags={"port": 0, "workers": [...]})) as srv:
>>> #     print(srv.url)

:class:`GatewayServer` is what ``kvrouter serve``, ``kvrouter run`` and the tests use.
Handlers are cancelled when their client disconnects (aiohttp ``handler_cancellation``),
which is how a dropped client aborts the upstream request and frees its booking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from aiohttp import web

from kvrouter.errors import ConfigError
from kvrouter.gateway.config import TOKENIZER_BUILTIN, TOKENIZER_WORKER, GatewayConfig
from kvrouter.gateway.feeds import MetricsFeeds, SubscriberFeeds
from kvrouter.gateway.kvcore import KvRoutingCore
from kvrouter.gateway.metrics import GatewayCollector
from kvrouter.gateway.routes import build_app
from kvrouter.gateway.service import Gateway
from kvrouter.lifecycle import AsyncLifecycle
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.tokenizer import Tokenizer, load_tokenizer

__all__ = ["GatewayServer", "install_uvloop", "load_gateway_tokenizer", "serve_forever"]

log = logging.getLogger(__name__)

# After the shutdown grace, how long cut streams get to send their error event.
_LAST_WORDS_S = 2.0


def load_gateway_tokenizer(cfg: GatewayConfig) -> Tokenizer | None:
    """The local tokenizer the config names (``None`` when the workers tokenize)."""
    if cfg.tokenizer == TOKENIZER_WORKER:
        return None
    spec = None if cfg.tokenizer in (TOKENIZER_BUILTIN, "byte") else cfg.tokenizer
    if spec is not None and not Path(spec).exists():
        raise ConfigError(
            f"tokenizer {spec!r} does not exist; give '{TOKENIZER_BUILTIN}', "
            f"'{TOKENIZER_WORKER}', 'byte' or the path of a tokenizer.json (or of a folder "
            "holding one)"
        )
    return load_tokenizer(spec, cfg.chat_template)


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed; ``False`` otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return False
    # uvloop.install() is deprecated on Python 3.12+; set the policy ourselves.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


class GatewayServer(AsyncLifecycle):
    """The gateway listening on ``cfg.host:cfg.port`` (port 0: any free port)."""

    def __init__(self, cfg: GatewayConfig, *, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg
        self.core = KvRoutingCore(cfg)
        self.feeds = SubscriberFeeds(self.core.indexer, block_size=cfg.block_size)
        if tokenizer is None:
            tokenizer = load_gateway_tokenizer(cfg)

        # Pushed metrics reach the gateway, which knows who is in rotation (it is built
        # just below, so look it up at call time).
        def on_pushed(metrics: ForwardPassMetrics) -> None:
            self.gateway.on_pushed_metrics(metrics)

        self.metrics_feeds = MetricsFeeds(on_pushed)
        self.gateway = Gateway(
            cfg,
            self.core,
            tokenizer=tokenizer,
            feeds=self.feeds,
            metrics_feeds=self.metrics_feeds,
        )
        collector = GatewayCollector(
            self.gateway.counters.stats,
            self.core.stats,
            self.gateway.registry.infos,
            self.feeds.stats,
        )
        self.app = build_app(self.gateway, collector)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the gateway is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    async def start(self) -> None:
        await self.gateway.start()
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            # After the grace, requests get their last words (cut_short) first.
            shutdown_timeout=self.cfg.shutdown_grace_s + _LAST_WORDS_S,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self.gateway.aclose()
            raise ConfigError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: {exc}") from exc
        self._runner = runner
        self._port = _bound_port(runner, self.cfg.port)
        log.info("kvrouter gateway listening on %s", self.url)

    async def aclose(self) -> None:
        """Stop accepting, let requests in flight finish for up to ``shutdown_grace_s``
        (then cancel them: a stream ends with an SSE error event), stop; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self.gateway.forwarder.closing = True
            in_flight = self.gateway.counters.num_in_flight
            if in_flight:
                log.info(
                    "shutting down: %d request(s) in flight get up to %.0f s to finish",
                    in_flight,
                    self.cfg.shutdown_grace_s,
                )
            forwarder = self.gateway.forwarder
            cleanup = asyncio.ensure_future(runner.cleanup())
            done, _ = await asyncio.wait({cleanup}, timeout=self.cfg.shutdown_grace_s)
            if not done and (cut := forwarder.cut_short()):
                log.warning("shutdown grace over: %d request(s) cut short", cut)
            await cleanup
        await self.gateway.aclose()


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)


async def serve_forever(cfg: GatewayConfig) -> None:
    """Run the gateway until SIGINT / SIGTERM, then shut down cleanly."""
    async with GatewayServer(cfg) as server:
        print(f"kvrouter gateway on {server.url} ({len(cfg.workers)} worker(s))", flush=True)
        if not cfg.workers:
            log.warning(
                "no workers configured: every request gets 503 until one is added "
                "(POST %s/admin/workers, or --workers)",
                server.url,
            )
        await wait_for_signal()
        log.info("shutting down")


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    """The port actually bound (``requested`` may be 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
