"""KV events over real ZeroMQ sockets on 127.0.0.1: publisher -> subscriber -> KvIndexer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvrouter.events.model import WorkerKey
from kvrouter.index import KvIndexer
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.transport import (
    KvEventPublisher,
    KvEventSubscriber,
    MetricsSubscriber,
    StreamStats,
    WorkerEndpoint,
    WorkerMetricsPublisher,
)
from kvrouter.transport.base import encode_seq
from kvrouter.transport.zmq_transport import ZmqTransport
from tests.unit.transport.helpers import BLOCK_SIZE, tokens, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ANY_PORT = "tcp://127.0.0.1:*"
# After the SUB socket connects, its subscription still has to reach the PUB socket.
SUBSCRIPTION_SETTLE_S = 0.2


def publisher_on(
    endpoint: str = ANY_PORT, replay: str | None = ANY_PORT, **options: object
) -> KvEventPublisher:
    transport = ZmqTransport(endpoint, replay, **options)  # type: ignore[arg-type]
    return KvEventPublisher(transport, block_size=BLOCK_SIZE, topic="kv-events")


def endpoint_of(publisher: KvEventPublisher, worker_id: int = 1) -> WorkerEndpoint:
    transport = publisher.transport
    assert transport.publish_address is not None
    return WorkerEndpoint(
        worker_id, transport.publish_address, transport.replay_address, topic=b"kv"
    )


@asynccontextmanager
async def following(
    index: KvIndexer, endpoint: WorkerEndpoint, **options: float
) -> AsyncIterator[KvEventSubscriber]:
    async with KvEventSubscriber(
        index, block_size=BLOCK_SIZE, endpoints=[endpoint], **options
    ) as sub:  # type: ignore[arg-type]
        await wait_until(lambda: sub.stats().streams[0].connected)
        await asyncio.sleep(SUBSCRIPTION_SETTLE_S)
        yield sub


def only(subscriber: KvEventSubscriber) -> StreamStats:
    (stream,) = subscriber.stats().streams
    return stream


def store(
    publisher: KvEventPublisher, start: int, hashes: list[int], parent: int | None = None
) -> None:
    publisher.publish_stored(tokens(start, len(hashes)), hashes, parent)
    publisher.flush()


def skip_next(publisher: KvEventPublisher, count: int) -> None:
    transport = publisher.transport
    assert isinstance(transport, ZmqTransport)
    transport.skip_sends(count)


async def test_end_to_end_into_the_indexer() -> None:
    index = KvIndexer(block_size=BLOCK_SIZE)
    async with publisher_on() as publisher, following(index, endpoint_of(publisher)) as sub:
        store(publisher, 0, [11, 12])
        store(publisher, 8, [13], parent=12)
        publisher.publish_removed([13])
        publisher.publish_stored(tokens(100, 1), [20])
        publisher.flush()
        await wait_until(lambda: only(sub).last_seq == 2)
        assert index.find_matches_for_request(tokens(0, 3)) == {1: 2}
        assert index.find_matches_for_request(tokens(100, 1)) == {1: 1}
        stream = only(sub)
        assert (stream.num_messages, stream.num_events, stream.num_gaps) == (3, 4, 0)
        assert stream.connected


async def test_dropped_batches_are_replayed_until_the_index_matches() -> None:
    index = KvIndexer(block_size=BLOCK_SIZE)
    async with publisher_on() as publisher, following(index, endpoint_of(publisher)) as sub:
        store(publisher, 0, [11])
        skip_next(publisher, 3)  # buffered for replay, never sent
        store(publisher, 4, [12], parent=11)
        store(publisher, 8, [13], parent=12)
        publisher.publish_removed([11])
        publisher.flush()
        store(publisher, 100, [20])
        await wait_until(lambda: only(sub).last_seq == 4)
        stream = only(sub)
        assert (stream.num_gaps, stream.num_replays_ok, stream.num_resets) == (1, 1, 0)
        # Same state as an index that saw everything: block 11 gone, so no prefix of 0..
        assert index.find_matches_for_request(tokens(0, 3)) == {}
        assert index.tree_size(WorkerKey(1, 0)) == 3
        assert index.find_matches_for_request(tokens(100, 1)) == {1: 1}
        assert index.last_event_id(WorkerKey(1, 0)) == 4  # 5 events, ids 0..4, none lost
        # One catch-up as the subscriber joined (nothing to replay yet), one for the gap.
        assert publisher.transport.stats().num_replay_requests == 2


async def test_blocks_cached_before_the_router_subscribed_arrive_without_a_new_event() -> None:
    # An idle worker with a warm cache: its events went out before anyone listened.
    index = KvIndexer(block_size=BLOCK_SIZE)
    async with publisher_on() as publisher:
        store(publisher, 0, [11, 12])
        store(publisher, 8, [13], parent=12)
        async with KvEventSubscriber(
            index, block_size=BLOCK_SIZE, endpoints=[endpoint_of(publisher)]
        ) as sub:
            await wait_until(lambda: only(sub).last_seq == 1)
            assert index.find_matches_for_request(tokens(0, 3)) == {1: 3}
            stream = only(sub)
            assert (stream.num_late_joins, stream.num_replays_ok, stream.num_gaps) == (1, 1, 0)
            assert stream.num_messages == 0  # all of it came by replay
            store(publisher, 100, [20])  # and the live stream follows on
            await wait_until(lambda: only(sub).last_seq == 2)
            assert index.tree_size(WorkerKey(1, 0)) == 4


async def test_gap_beyond_the_replay_buffer_resets_the_worker() -> None:
    index = KvIndexer(block_size=BLOCK_SIZE)
    async with (
        publisher_on(buffer_steps=2) as publisher,
        following(index, endpoint_of(publisher)) as sub,
    ):
        store(publisher, 0, [11])
        skip_next(publisher, 3)
        for offset, block in ((4, 12), (8, 13), (12, 14)):
            store(publisher, offset, [block])
        store(publisher, 100, [20])
        await wait_until(lambda: only(sub).last_seq == 4)
        stream = only(sub)
        assert (stream.num_gaps, stream.num_replays_failed, stream.num_resets) == (1, 1, 1)
        # Block 11 went with the reset; the two batches still buffered were applied.
        assert index.find_matches_for_request(tokens(0, 1)) == {}
        assert index.find_matches_for_request(tokens(12, 1)) == {1: 1}
        assert index.tree_size(WorkerKey(1, 0)) == 2


async def test_publisher_restart_resets_the_worker() -> None:
    index = KvIndexer(block_size=BLOCK_SIZE)
    first = publisher_on()
    await first.start()
    endpoint = endpoint_of(first)
    async with following(index, endpoint) as sub:
        store(first, 0, [11])
        store(first, 4, [12], parent=11)
        await wait_until(lambda: only(sub).last_seq == 1)
        await first.aclose()
        async with publisher_on(endpoint.address, endpoint.replay_address) as second:
            await wait_until(lambda: only(sub).connected)
            await asyncio.sleep(SUBSCRIPTION_SETTLE_S)
            store(second, 100, [20])
            await wait_until(lambda: only(sub).num_restarts == 1)
            stream = only(sub)
            assert (stream.last_seq, stream.num_resets) == (0, 1)
            assert index.find_matches_for_request(tokens(0, 2)) == {}
            assert index.find_matches_for_request(tokens(100, 1)) == {1: 1}


async def test_malformed_frames_are_counted_and_skipped() -> None:
    index = KvIndexer(block_size=BLOCK_SIZE)
    context = zmq.asyncio.Context()
    raw = context.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind(ANY_PORT)
    address = raw.getsockopt(zmq.LAST_ENDPOINT).decode()
    good = msgspec.msgpack.encode([1.0, [["BlockStored", [11], None, tokens(0, 1), BLOCK_SIZE]]])
    try:
        async with following(index, WorkerEndpoint(3, address)) as sub:
            await raw.send_multipart([b"kv", encode_seq(0)])
            await raw.send_multipart([b"kv", b"\x01", b"x"])
            await raw.send_multipart([b"kv", encode_seq(0), b"\xc1"])
            await raw.send_multipart([b"kv", encode_seq(1), good])
            await wait_until(lambda: only(sub).last_seq == 1)
            stream = only(sub)
            assert dict(stream.decode_errors) == {"frame_count": 1, "seq": 1, "batch": 1}
            assert (stream.num_messages, stream.num_events) == (2, 1)
            assert index.find_matches_for_request(tokens(0, 1)) == {3: 1}
    finally:
        raw.close()
        context.term()


async def test_legacy_replay_reply_form_is_accepted() -> None:
    index = KvIndexer(block_size=BLOCK_SIZE)
    publisher = publisher_on(replay_reply_form="legacy")
    async with publisher, following(index, endpoint_of(publisher)) as sub:
        store(publisher, 0, [11])
        skip_next(publisher, 1)
        store(publisher, 4, [12], parent=11)
        store(publisher, 100, [20])
        await wait_until(lambda: only(sub).last_seq == 2)
        stream = only(sub)
        assert (stream.num_replays_ok, stream.num_resets) == (1, 0)
        assert index.find_matches_for_request(tokens(0, 2)) == {1: 2}


async def test_silent_replay_socket_times_out_and_resets() -> None:
    index = KvIndexer(block_size=BLOCK_SIZE)
    context = zmq.asyncio.Context()
    mute = context.socket(zmq.ROUTER)  # accepts requests, never answers
    mute.setsockopt(zmq.LINGER, 0)
    mute.bind(ANY_PORT)
    mute_address = mute.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        async with publisher_on(replay=None) as publisher:
            assert publisher.transport.publish_address is not None
            endpoint = WorkerEndpoint(1, publisher.transport.publish_address, mute_address)
            async with following(index, endpoint, replay_timeout_s=0.2) as sub:
                store(publisher, 0, [11])
                skip_next(publisher, 1)
                store(publisher, 4, [12], parent=11)
                store(publisher, 100, [20])
                await wait_until(lambda: only(sub).last_seq == 2)
                stream = only(sub)
                assert (stream.num_replays_failed, stream.num_resets) == (1, 1)
                assert index.tree_size(WorkerKey(1, 0)) == 1
    finally:
        mute.close()
        context.term()


async def test_metrics_over_zmq() -> None:
    received: list[ForwardPassMetrics] = []
    transport = ZmqTransport(ANY_PORT)
    async with WorkerMetricsPublisher(transport, min_interval_s=0.0, keepalive_s=5.0) as publisher:
        assert transport.publish_address is not None
        endpoint = WorkerEndpoint(4, transport.publish_address)
        async with MetricsSubscriber(endpoints=[endpoint], listeners=[received.append]) as sub:
            await wait_until(lambda: sub.stats()[0].connected)
            await asyncio.sleep(SUBSCRIPTION_SETTLE_S)
            publisher.update(ForwardPassMetrics(worker_id=4, kv_active_blocks=7))
            await wait_until(lambda: len(received) == 1)
            assert received[0] == ForwardPassMetrics(worker_id=4, kv_active_blocks=7)


async def test_publisher_restart_after_a_catch_up_replay_resets_the_worker() -> None:
    # The router caught up by replay alone (seq 0..1), so no live seq was seen yet; the
    # restarted publisher's seq 0 and 1 must not pass for messages already applied.
    index = KvIndexer(block_size=BLOCK_SIZE)
    first = publisher_on()
    await first.start()
    endpoint = endpoint_of(first)
    store(first, 0, [11])
    store(first, 4, [12], parent=11)
    async with KvEventSubscriber(index, block_size=BLOCK_SIZE, endpoints=[endpoint]) as sub:
        await wait_until(lambda: only(sub).last_seq == 1)
        await first.aclose()
        async with publisher_on(endpoint.address, endpoint.replay_address) as second:
            await wait_until(lambda: only(sub).connected)
            await asyncio.sleep(SUBSCRIPTION_SETTLE_S)
            store(second, 100, [20])
            store(second, 200, [30])
            await wait_until(lambda: only(sub).num_events == 4)
            stream = only(sub)
            assert (stream.last_seq, stream.num_restarts) == (1, 1)
            assert index.find_matches_for_request(tokens(0, 2)) == {}
            assert index.find_matches_for_request(tokens(100, 1)) == {1: 1}
            assert index.find_matches_for_request(tokens(200, 1)) == {1: 1}
