from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest

from kvrouter.clock import ManualClock
from kvrouter.events.model import RouterEvent, Stored, StoredBlock
from kvrouter.hashing import compute_block_hashes
from kvrouter.index import KvIndexer
from kvrouter.routing.scheduler import KvScheduler
from kvrouter.runtime import Client, InprocRuntime, InstanceGone, KvRouterClient, endpoint, service

BLOCK = 4


@service(namespace="kv")
class Engine:
    def __init__(self, name: str) -> None:
        self.name = name

    @endpoint
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[str]:
        yield self.name
        yield "done"


def store(indexer: KvIndexer, worker_id: int, tokens: list[int]) -> None:
    hashes = compute_block_hashes(tokens, BLOCK)
    blocks = tuple(StoredBlock(1000 + i, h) for i, h in enumerate(hashes))
    indexer.apply_event(RouterEvent(worker_id, 0, 1, Stored(None, blocks)))


async def test_requests_go_where_the_prefix_is_and_bookings_are_released() -> None:
    clock = ManualClock()
    indexer = KvIndexer(block_size=BLOCK, clock=clock)
    scheduler = KvScheduler(indexer, block_size=BLOCK, clock=clock, predict_cache=False)
    async with InprocRuntime() as rt:
        served = {name: await rt.serve(Engine(name)) for name in ("a", "b", "c")}
        client = await rt.client("kv", "Engine", "generate")
        router = KvRouterClient(client, scheduler)

        prompt = list(range(40))
        store(indexer, served["b"].instance_id, prompt)
        assert router.select({"token_ids": prompt}) == served["b"].instance_id

        for _ in range(3):
            out = [item async for item in router.generate({"token_ids": prompt})]
            assert out == ["b", "done"]
        assert scheduler.stats().active.num_requests == 0

        # An abandoned stream still frees its booking.
        stream = router.generate({"token_ids": prompt})
        assert await anext(stream) == "b"
        assert scheduler.stats().active.num_requests == 1
        await stream.aclose()
        assert scheduler.stats().active.num_requests == 0

        # A withdrawn instance leaves the scheduler on the next call.
        await served["b"].aclose()
        out = [item async for item in router.generate({"token_ids": prompt})]
        assert out[0] in {"a", "c"}
        assert {k.worker_id for k in scheduler.workers} == {
            served["a"].instance_id,
            served["c"].instance_id,
        }


async def test_a_cache_salt_routes_only_to_the_same_tenants_prefix() -> None:
    clock = ManualClock()
    indexer = KvIndexer(block_size=BLOCK, clock=clock)
    scheduler = KvScheduler(indexer, block_size=BLOCK, clock=clock, predict_cache=False)
    async with InprocRuntime() as rt:
        served = {name: await rt.serve(Engine(name)) for name in ("a", "b")}
        client = await rt.client("kv", "Engine", "generate")
        router = KvRouterClient(client, scheduler)
        prompt = list(range(40))
        hashes = compute_block_hashes(prompt, BLOCK, cache_salt="tenant-1")
        blocks = tuple(StoredBlock(2000 + i, h) for i, h in enumerate(hashes))
        worker = served["a"].instance_id
        indexer.apply_event(RouterEvent(worker, 0, 1, Stored(None, blocks)))
        salted = {"token_ids": prompt, "cache_salt": "tenant-1"}
        assert router.select(salted) == worker
        assert [item async for item in router.generate(salted)] == ["a", "done"]
        decision = scheduler.recent_decisions()[-1]
        assert decision.overlap_blocks == len(hashes)
        # Another tenant, or no salt, shares nothing with tenant-1's blocks.
        for request in ({"token_ids": prompt, "cache_salt": "tenant-2"}, {"token_ids": prompt}):
            preview = scheduler.preview(router._schedule_request("p", request))
            assert preview.overlap_blocks == 0

        # A custom reader for requests that carry the salt elsewhere.
        custom = KvRouterClient(
            client, scheduler, tokens_of=lambda r: r[0], cache_salt_of=lambda r: r[1]
        )
        assert custom.select((prompt, "tenant-1")) == worker


class GhostTransport:
    """Lists instances 1 and 2; instance 1 died without a goodbye (as after a kill)."""

    def __init__(self) -> None:
        self.listed = {1, 2}
        self.alive = {2}

    def instance_ids(self) -> list[int]:
        return sorted(self.listed)

    async def call(self, instance_id: int, request: Any) -> AsyncGenerator[Any, None]:
        if instance_id not in self.alive:
            self.listed.discard(instance_id)
            raise InstanceGone(f"instance {instance_id} has no responders")
        yield instance_id

    async def aclose(self) -> None:
        return None


async def test_an_instance_found_gone_before_the_first_item_is_routed_around() -> None:
    clock = ManualClock()
    indexer = KvIndexer(block_size=BLOCK, clock=clock)
    scheduler = KvScheduler(indexer, block_size=BLOCK, clock=clock, predict_cache=False)
    transport = GhostTransport()
    router = KvRouterClient(Client(transport), scheduler)
    prompt = list(range(40))
    store(indexer, 1, prompt)  # the dead instance holds the whole prefix
    assert [item async for item in router.generate({"token_ids": prompt})] == [2]
    assert {k.worker_id for k in scheduler.workers} == {2}
    assert scheduler.stats().active.num_requests == 0

    # Every attempt finds its instance gone: the last InstanceGone reaches the caller.
    transport.alive.clear()
    transport.listed = {2, 3}
    impatient = KvRouterClient(Client(transport), scheduler, max_attempts=2)
    with pytest.raises(InstanceGone):
        [item async for item in impatient.generate({"token_ids": prompt})]
    assert transport.listed == set()
    assert scheduler.stats().active.num_requests == 0
