from __future__ import annotations

import asyncio

import msgspec

from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.load.prometheus import parse_engine_metrics
from kvrouter.transport import (
    InProcBus,
    InProcTransport,
    MetricsSubscriber,
    WorkerEndpoint,
    WorkerMetricsPublisher,
    render_vllm_metrics,
)
from kvrouter.transport.base import encode_seq
from tests.unit.transport.helpers import wait_until


def test_render_uses_vllm_names_and_parses_back() -> None:
    metrics = ForwardPassMetrics(
        request_active_slots=3, num_requests_waiting=2, gpu_cache_usage_perc=0.25
    )
    text = render_vllm_metrics(
        metrics,
        model_name='m"1',
        prefix_cache_queries_total=100,
        prefix_cache_hits_total=40,
    )
    assert 'vllm:num_requests_running{model_name="m\\"1"} 3\n' in text
    assert "# TYPE vllm:prefix_cache_hits_total counter\n" in text
    assert 'vllm:gpu_cache_usage_perc{model_name="m\\"1"} 0.25\n' in text
    snapshot = parse_engine_metrics(text)
    assert snapshot.engine == "vllm"
    assert (snapshot.num_requests_running, snapshot.num_requests_waiting) == (3, 2)
    assert snapshot.kv_usage == 0.25


async def test_changes_are_debounced_and_keepalives_flow() -> None:
    bus = InProcBus()
    received: list[ForwardPassMetrics] = []
    publisher = WorkerMetricsPublisher(
        InProcTransport(bus, "m1"), min_interval_s=0.2, keepalive_s=0.3
    )
    async with (
        InProcTransport(bus) as side,
        MetricsSubscriber(
            transport=side,
            endpoints=[WorkerEndpoint(5, "m1", dp_rank=1)],
            listeners=[received.append],
        ) as subscriber,
        publisher,
    ):
        await wait_until(lambda: subscriber.stats()[0].connected)
        publisher.update(ForwardPassMetrics(worker_id=99, num_requests_waiting=1))
        await wait_until(lambda: len(received) == 1)
        publisher.update(ForwardPassMetrics(num_requests_waiting=2))
        publisher.update(ForwardPassMetrics(num_requests_waiting=3))  # within the interval
        await wait_until(lambda: len(received) == 2)
        assert [m.num_requests_waiting for m in received] == [1, 3]
        # The endpoint, not the payload, says who this is.
        assert {(m.worker_id, m.data_parallel_rank) for m in received} == {(5, 1)}
        await wait_until(lambda: publisher.stats().num_keepalives >= 1, timeout_s=2.0)
        await wait_until(lambda: len(received) == 3)
        assert received[2].num_requests_waiting == 3
        bus.inject("m1", [b"kv-metrics", encode_seq(9), b"\xc1"])
        await wait_until(lambda: subscriber.stats()[0].decode_errors.get("payload") == 1)
        assert subscriber.stats()[0].num_messages == 3
    await publisher.aclose()  # idempotent after the context exit


async def test_send_now_without_updates_sends_nothing() -> None:
    publisher = WorkerMetricsPublisher(InProcTransport(InProcBus(), "m"))
    await publisher.start()
    assert publisher.send_now() is None
    publisher.update(ForwardPassMetrics(kv_total_blocks=10))
    await asyncio.sleep(0)
    await wait_until(lambda: publisher.stats().num_sent == 1)
    await publisher.aclose()
    assert publisher.stats().num_updates == 1


async def test_impossible_values_are_malformed_and_a_failing_listener_stops_nothing() -> None:
    bus = InProcBus()
    received: list[ForwardPassMetrics] = []
    calls = 0

    def flaky(metrics: ForwardPassMetrics) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("listener bug")

    # The publisher only makes the endpoint exist; it sends nothing without updates.
    publisher = WorkerMetricsPublisher(InProcTransport(bus, "m1"), keepalive_s=60.0)
    async with (
        InProcTransport(bus) as side,
        MetricsSubscriber(
            transport=side,
            endpoints=[WorkerEndpoint(1, "m1")],
            listeners=[flaky, received.append],
        ) as subscriber,
        publisher,
    ):
        await wait_until(lambda: subscriber.stats()[0].connected)

        def push(seq: int, **fields: float) -> None:
            payload = msgspec.msgpack.encode([0.0, fields])
            bus.inject("m1", [b"kv-metrics", encode_seq(seq), payload])

        push(0, gpu_cache_usage_perc=float("nan"))
        push(1, gpu_cache_usage_perc=5.0)
        push(2, num_requests_waiting=-1)
        await wait_until(lambda: subscriber.stats()[0].decode_errors.get("payload") == 3)
        push(3, num_requests_waiting=2)  # the first listener raises on this one
        push(4, num_requests_waiting=4)
        await wait_until(lambda: len(received) == 2)
        assert [m.num_requests_waiting for m in received] == [2, 4]
        assert subscriber.stats()[0].num_messages == 2
