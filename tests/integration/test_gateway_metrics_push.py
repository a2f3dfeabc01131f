"""Pushed load metrics: simulated workers publish over ZeroMQ and are not scraped."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import aiohttp
import pytest

from kvrouter.gateway.embedded import EmbeddedOptions, start_embedded
from kvrouter.load.metrics import ForwardPassMetrics

pytestmark = pytest.mark.integration


async def test_embedded_workers_push_their_metrics() -> None:
    options = EmbeddedOptions(num_workers=2, port=0, block_size=16, speedup_ratio=100.0)
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as client:
        server = await start_embedded(options, stack)
        specs = server.cfg.workers
        assert all(spec.metrics and spec.metrics.startswith("tcp://") for spec in specs)
        gw = server.gateway
        body = {"model": "kvrouter-mock", "prompt": "hello " * 20, "max_tokens": 4}
        for worker_id in (0, 1):
            async with client.post(
                server.url + "/v1/completions",
                json=body,
                headers={"x-kvrouter-worker": str(worker_id)},
            ) as resp:
                assert resp.status == 200
        endpoints = {}
        for _ in range(200):
            endpoints = {e.worker_id: e for e in server.core.aggregator.get_metrics().endpoints}
            if len(endpoints) == 2:
                break
            await asyncio.sleep(0.02)
        assert {w: e.source for w, e in endpoints.items()} == {0: "push", 1: "push"}
        assert all(e.kv_total_blocks == 16384 for e in endpoints.values())
        agg = server.core.aggregator.stats()
        assert agg.num_pushed >= 2
        assert agg.num_scrapes == 0  # pushed workers are not scraped
        assert all(i.metrics_age_s is not None for i in gw.registry.infos())
        streams = server.metrics_feeds.stats()
        assert sorted(s.worker_id for s in streams) == [0, 1]
        assert all(s.num_messages >= 1 for s in streams)


async def test_pushed_metrics_of_a_worker_out_of_rotation_are_ignored() -> None:
    options = EmbeddedOptions(num_workers=1, port=0, block_size=16, speedup_ratio=100.0)
    async with AsyncExitStack() as stack:
        server = await start_embedded(options, stack)
        gw = server.gateway
        gw.registry.mark_failed(0, "test: taken out")
        gw.on_pushed_metrics(ForwardPassMetrics(worker_id=0, kv_total_blocks=8))
        assert server.core.aggregator.get_metrics().endpoints == ()
        gw.registry.mark_ok(0)
        gw.on_pushed_metrics(ForwardPassMetrics(worker_id=0, kv_total_blocks=8))
        assert [e.kv_total_blocks for e in server.core.aggregator.get_metrics().endpoints] == [8]
