from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvrouter.errors import NoWorkerAvailable, UpstreamError
from kvrouter.runtime import InprocRuntime, endpoint, service
from kvrouter.runtime.client import InstanceGone
from kvrouter.runtime.component import endpoints_of, service_spec


@service(namespace="demo")
class Worker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    @endpoint
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        for i in range(request["n"]):
            yield {"worker": self.name, "i": i}

    @endpoint
    async def ping(self, request: str) -> str:
        if request == "boom":
            raise RuntimeError("exploded")
        return f"pong {self.name} {request}"


def test_decorators_record_names() -> None:
    spec = service_spec(Worker("a"))
    assert (spec.namespace, spec.component) == ("demo", "Worker")
    assert sorted(endpoints_of(Worker("a"))) == ["generate", "ping"]


def test_bad_declarations_are_rejected() -> None:
    with pytest.raises(ValueError, match="not decorated"):
        service_spec(object())
    with pytest.raises(ValueError, match="namespace name"):
        service(namespace="a.b")
    with pytest.raises(TypeError, match="async function"):
        endpoint(lambda x: x)


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


async def test_round_robin_random_and_direct() -> None:
    async with InprocRuntime(rng=random.Random(1)) as rt:
        workers = [Worker(n) for n in "abc"]
        served = [await rt.serve(w) for w in workers]
        client = await rt.client("demo", "Worker", "generate")
        assert await client.wait_for_instances(minimum=3) == sorted(s.instance_id for s in served)

        names = [(await collect(client.round_robin({"n": 1})))[0]["worker"] for _ in range(6)]
        assert sorted(names) == ["a", "a", "b", "b", "c", "c"]
        assert names[:3] == names[3:]

        target = served[1]
        out = await collect(client.direct({"n": 2}, target.instance_id))
        assert out == [{"worker": "b", "i": 0}, {"worker": "b", "i": 1}]

        for _ in range(30):
            await collect(client.random({"n": 1}))
        assert all(w.calls > 2 for w in workers)


async def test_plain_coroutine_endpoint_streams_one_item_and_errors_are_upstream() -> None:
    async with InprocRuntime() as rt:
        served = await rt.serve(Worker("a"))
        client = await rt.client("demo", "Worker", "ping")
        assert await collect(client.generate("x")) == ["pong a x"]
        with pytest.raises(UpstreamError, match="exploded"):
            await collect(client.direct("boom", served.instance_id))


async def test_withdrawn_instances_are_not_called() -> None:
    async with InprocRuntime() as rt:
        served = await rt.serve(Worker("a"))
        client = await rt.client("demo", "Worker", "generate")
        await served.aclose()
        await served.aclose()  # idempotent
        assert client.instance_ids() == []
        with pytest.raises(NoWorkerAvailable):
            await collect(client.generate({"n": 1}))
        with pytest.raises(NoWorkerAvailable):
            client.direct({"n": 1}, served.instance_id)


async def test_kv_mode_uses_the_selector() -> None:
    async with InprocRuntime() as rt:
        served = [await rt.serve(Worker(n)) for n in "ab"]
        wanted = served[1].instance_id

        def selector(request: Any, ids: list[int]) -> int:
            assert sorted(ids) == sorted(s.instance_id for s in served)
            return wanted

        client = await rt.client("demo", "Worker", "generate", router_mode="kv", selector=selector)
        out = await collect(client.generate({"n": 1}))
        assert out == [{"worker": "b", "i": 0}]
    with pytest.raises(ValueError, match="needs a selector"):
        await InprocRuntime().client("demo", "Worker", "generate", router_mode="kv")


@service(namespace="demo")
class Ticker:
    def __init__(self) -> None:
        self.num_running = 0

    @endpoint
    async def ticks(self, request: None) -> AsyncIterator[str]:
        self.num_running += 1
        try:
            while True:
                yield "tick"
                await asyncio.sleep(0)
        finally:
            self.num_running -= 1


async def test_a_caller_that_goes_away_stops_the_handler() -> None:
    async with InprocRuntime() as rt:
        ticker = Ticker()
        await rt.serve(ticker)
        client = await rt.client("demo", "Ticker", "ticks")
        for call in (client.generate, client.random, client.round_robin):
            stream = call(None)
            assert await anext(stream) == "tick"
            await stream.aclose()
            assert ticker.num_running == 0

        started = asyncio.Event()

        async def consume() -> None:
            async for _ in client.generate(None):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ticker.num_running == 0


async def test_no_instance_is_a_clear_error_without_waiting() -> None:
    async with InprocRuntime() as rt:
        client = await rt.client("demo", "Worker", "generate")
        for call in (client.generate, client.random, client.round_robin):
            with pytest.raises(NoWorkerAvailable, match="no instance"):
                await collect(call({"n": 1}))
        with pytest.raises(NoWorkerAvailable, match=r"0 of 1 instances after 0\.05 s"):
            await client.wait_for_instances(timeout_s=0.05)


@service(namespace="demo")
class Relay:
    """An endpoint whose own downstream call found its instance gone."""

    def __init__(self) -> None:
        self.calls = 0

    @endpoint
    async def forward(self, request: str) -> str:
        self.calls += 1
        raise InstanceGone("nested call failed")


async def test_an_endpoint_that_ran_is_not_retried_whatever_it_raised() -> None:
    async with InprocRuntime() as rt:
        relays = [Relay(), Relay(), Relay()]
        for relay in relays:
            await rt.serve(relay)
        client = await rt.client("demo", "Relay", "forward")
        with pytest.raises(UpstreamError, match="InstanceGone: nested call failed") as info:
            await collect(client.generate("x"))
        assert not isinstance(info.value, InstanceGone)
        assert sum(r.calls for r in relays) == 1


@service(namespace="demo")
class Counter:
    @endpoint
    async def ticks(self, request: float) -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(request)


async def test_withdrawn_instances_end_their_streams_after_the_drain_time() -> None:
    async with InprocRuntime() as rt:
        served = await rt.serve(Counter())
        client = await rt.client("demo", "Counter", "ticks")
        stream = client.generate(0.01)
        await anext(stream)
        loop = asyncio.get_running_loop()
        await served.aclose(drain_timeout_s=0.2)
        closed_at = loop.time()
        with pytest.raises(UpstreamError, match="shut down"):
            async for _ in stream:
                pass
        assert 0.2 <= loop.time() - closed_at < 1.0  # it went on for the drain time
        # A stream waiting inside its handler ends too, when the drain time is over.
        blocked_served = await rt.serve(Counter())
        blocked = client.generate(3600)
        await anext(blocked)
        await blocked_served.aclose(drain_timeout_s=0.1)
        closed_at = loop.time()
        with pytest.raises(UpstreamError, match="shut down"):
            await anext(blocked)
        assert loop.time() - closed_at < 1.0
        # The runtime's own close ends what is still running at once, and no new call
        # starts, even from a client made before.
        await rt.serve(Counter())
        other = client.generate(3600)
        await anext(other)
        await rt.aclose()
        with pytest.raises(UpstreamError, match="shut down"):
            await anext(other)
        with pytest.raises(NoWorkerAvailable):
            await collect(client.generate(0.01))
