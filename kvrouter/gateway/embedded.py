"""``kvrouter run``: the gateway in front of simulated workers, all on loopback.

The workers are kvrouter's own simulated engine (HTTP + ZeroMQ KV events with replay,
and load metrics pushed over ZeroMQ instead of scraped), started in this process on
free ports; nothing outside the machine is needed.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

from kvrouter.gateway.config import GatewayConfig, WorkerSpec
from kvrouter.gateway.server import GatewayServer, wait_for_signal

__all__ = ["EmbeddedOptions", "run_embedded", "start_embedded"]


@dataclass(frozen=True, slots=True)
class EmbeddedOptions:
    """Settings of ``kvrouter run``."""

    num_workers: int = 4
    port: int = 8000
    router_mode: str = "kv"
    speedup_ratio: float = 10.0
    block_size: int = 64
    host: str = "127.0.0.1"


async def start_embedded(options: EmbeddedOptions, stack: AsyncExitStack) -> GatewayServer:
    """Start the workers and the gateway inside ``stack`` (which closes them)."""
    from kvrouter.engine.cli import MockerOptions, start_workers

    mocker = MockerOptions(
        num_workers=options.num_workers,
        host=options.host,
        base_port=0,
        kv_events_base_port=0,
        replay_base_port=0,
        metrics_base_port=0,
        block_size=options.block_size,
        speedup_ratio=options.speedup_ratio,
    )
    workers = await start_workers(mocker, stack)
    specs = tuple(
        WorkerSpec(
            url=addr.http_url,
            kv_events=addr.kv_events,
            replay=addr.replay,
            metrics=addr.metrics,
            worker_id=addr.worker_id,
        )
        for _, addr in workers
    )
    cfg = GatewayConfig(
        host=options.host,
        port=options.port,
        workers=specs,
        router_mode=options.router_mode,
        block_size=options.block_size,
        metrics_scrape_interval_s=0.5,
        health_check_interval_s=1.0,
    )
    return await stack.enter_async_context(GatewayServer(cfg))


def sample_curl(url: str) -> str:
    """A request to paste into a shell."""
    return (
        f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
        """-d '{"model": "kvrouter-mock", "max_tokens": 16, """
        """"messages": [{"role": "user", "content": "Hello there"}]}'"""
    )


async def run_embedded(options: EmbeddedOptions) -> None:
    """Serve until SIGINT / SIGTERM, then close everything."""
    async with AsyncExitStack() as stack:
        server = await start_embedded(options, stack)
        url = server.url
        print(f"kvrouter is serving on {url} with {options.num_workers} simulated workers")
        print(
            f"  dashboard: {url}/dashboard   metrics: {url}/metrics   workers: {url}/admin/workers"
        )
        print(f"  try: {sample_curl(url)}", flush=True)
        await wait_for_signal()
        print("shutting down", flush=True)
