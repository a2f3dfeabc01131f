from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import pytest

from kvrouter.events.model import WorkerKey
from kvrouter.events.vllm import BlockRemoved, BlockStored, KVEventBatch, encode_batch
from kvrouter.index import KvIndexer
from kvrouter.transport import (
    InProcBus,
    InProcTransport,
    KvEventPublisher,
    KvEventSubscriber,
    StreamStats,
    WorkerEndpoint,
)
from kvrouter.transport.base import encode_seq
from tests.unit.transport.helpers import BLOCK_SIZE, tokens, wait_until


@dataclass
class Rig:
    bus: InProcBus
    index: KvIndexer
    subscriber: KvEventSubscriber

    def stream(self, worker_id: int = 1) -> StreamStats:
        return next(s for s in self.subscriber.stats().streams if s.worker_id == worker_id)

    async def publisher(self, address: str = "w1", buffer_steps: int = 100) -> KvEventPublisher:
        transport = InProcTransport(self.bus, address, buffer_steps=buffer_steps)
        publisher = KvEventPublisher(transport, block_size=BLOCK_SIZE)
        await publisher.start()
        return publisher


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    bus = InProcBus()
    index = KvIndexer(block_size=BLOCK_SIZE)
    side = InProcTransport(bus)
    endpoint = WorkerEndpoint(1, "w1", replay_address="w1")
    async with KvEventSubscriber(
        index, block_size=BLOCK_SIZE, transport=side, endpoints=[endpoint]
    ) as subscriber:
        yield Rig(bus, index, subscriber)
    await side.aclose()


def store(
    publisher: KvEventPublisher, start: int, hashes: list[int], parent: int | None = None
) -> None:
    publisher.publish_stored(tokens(start, len(hashes)), hashes, parent)
    publisher.flush()


async def test_events_reach_the_index(rig: Rig) -> None:
    publisher = await rig.publisher()
    await wait_until(lambda: rig.stream().connected)
    store(publisher, 0, [11, 12])
    store(publisher, 8, [13], parent=12)
    publisher.publish_removed([13])
    publisher.flush()
    await wait_until(lambda: rig.stream().last_seq == 2)
    assert rig.index.find_matches_for_request(tokens(0, 3)) == {1: 2}
    assert rig.index.tree_size(WorkerKey(1, 0)) == 2
    assert rig.index.last_event_id(WorkerKey(1, 0)) == 2
    stats = rig.stream()
    assert (stats.num_messages, stats.num_events, stats.num_gaps, stats.num_resets) == (3, 3, 0, 0)
    await publisher.aclose()


async def test_a_late_subscriber_catches_up_before_the_next_event() -> None:
    bus = InProcBus()
    index = KvIndexer(block_size=BLOCK_SIZE)
    publisher = KvEventPublisher(InProcTransport(bus, "w1"), block_size=BLOCK_SIZE)
    await publisher.start()
    store(publisher, 0, [11, 12])  # nobody subscribed yet: only the replay buffer has it
    endpoint = WorkerEndpoint(1, "w1", replay_address="w1")
    async with (
        InProcTransport(bus) as side,
        KvEventSubscriber(index, block_size=BLOCK_SIZE, transport=side, endpoints=[endpoint]),
    ):
        await wait_until(lambda: index.tree_size(WorkerKey(1, 0)) == 2)
        assert index.find_matches_for_request(tokens(0, 2)) == {1: 2}
    await publisher.aclose()


async def test_without_a_replay_socket_a_late_subscriber_waits_for_live_events() -> None:
    bus = InProcBus()
    index = KvIndexer(block_size=BLOCK_SIZE)
    publisher = KvEventPublisher(InProcTransport(bus, "w1"), block_size=BLOCK_SIZE)
    await publisher.start()
    store(publisher, 0, [11])
    async with (
        InProcTransport(bus) as side,
        KvEventSubscriber(
            index, block_size=BLOCK_SIZE, transport=side, endpoints=[WorkerEndpoint(1, "w1")]
        ) as subscriber,
    ):
        await wait_until(lambda: subscriber.stats().streams[0].connected)
        store(publisher, 100, [20])
        await wait_until(lambda: subscriber.stats().streams[0].last_seq == 1)
        # Block 11 went out before the subscription and cannot be asked for again.
        assert index.find_matches_for_request(tokens(0, 1)) == {}
        assert index.find_matches_for_request(tokens(100, 1)) == {1: 1}
    await publisher.aclose()


async def test_gap_is_repaired_by_replay(rig: Rig) -> None:
    publisher = await rig.publisher()
    await wait_until(lambda: rig.stream().connected)
    store(publisher, 0, [11])
    publisher.transport.skip_sends(2)  # type: ignore[attr-defined]
    store(publisher, 4, [12], parent=11)
    store(publisher, 8, [13], parent=12)
    store(publisher, 100, [20])
    await wait_until(lambda: rig.stream().last_seq == 3)
    assert rig.index.find_matches_for_request(tokens(0, 3)) == {1: 3}
    assert rig.index.tree_size(WorkerKey(1, 0)) == 4
    stats = rig.stream()
    assert (stats.num_gaps, stats.num_replays_ok, stats.num_replays_failed) == (1, 1, 0)
    assert stats.num_resets == 0
    await publisher.aclose()


async def test_gap_beyond_the_buffer_resets_the_worker(rig: Rig) -> None:
    publisher = await rig.publisher(buffer_steps=1)
    await wait_until(lambda: rig.stream().connected)
    store(publisher, 0, [11])
    publisher.transport.skip_sends(2)  # type: ignore[attr-defined]
    store(publisher, 4, [12], parent=11)
    store(publisher, 8, [13], parent=12)
    store(publisher, 100, [20])
    await wait_until(lambda: rig.stream().last_seq == 3)
    # Block 11 was dropped by the reset; only the batch after the gap is known.
    assert rig.index.find_matches_for_request(tokens(0, 1)) == {}
    assert rig.index.find_matches_for_request(tokens(100, 1)) == {1: 1}
    stats = rig.stream()
    assert (stats.num_gaps, stats.num_replays_ok, stats.num_replays_failed) == (1, 0, 1)
    assert stats.num_resets == 1
    await publisher.aclose()


async def test_gap_without_replay_socket_resets() -> None:
    bus = InProcBus()
    index = KvIndexer(block_size=BLOCK_SIZE)
    async with (
        InProcTransport(bus) as side,
        KvEventSubscriber(
            index, block_size=BLOCK_SIZE, transport=side, endpoints=[WorkerEndpoint(1, "w1")]
        ) as subscriber,
    ):
        transport = InProcTransport(bus, "w1")
        async with KvEventPublisher(transport, block_size=BLOCK_SIZE) as publisher:
            await wait_until(lambda: subscriber.stats().streams[0].connected)
            store(publisher, 0, [11])
            transport.skip_sends(1)
            store(publisher, 4, [12], parent=11)
            store(publisher, 100, [20])
            await wait_until(lambda: subscriber.stats().streams[0].last_seq == 2)
        stats = subscriber.stats().streams[0]
        assert (stats.num_gaps, stats.num_resets, stats.num_replays_failed) == (1, 1, 0)
        assert index.tree_size(WorkerKey(1, 0)) == 1


async def test_publisher_restart_resets_and_follows_the_new_one(rig: Rig) -> None:
    first = await rig.publisher()
    await wait_until(lambda: rig.stream().connected)
    store(first, 0, [11])
    store(first, 4, [12], parent=11)
    await wait_until(lambda: rig.stream().last_seq == 1)
    await first.aclose()
    second = await rig.publisher()
    store(second, 100, [20])
    await wait_until(lambda: rig.stream().num_restarts == 1)
    assert rig.index.find_matches_for_request(tokens(0, 2)) == {}
    assert rig.index.find_matches_for_request(tokens(100, 1)) == {1: 1}
    stats = rig.stream()
    assert (stats.last_seq, stats.num_resets, stats.num_gaps) == (0, 1, 0)
    await second.aclose()


async def test_late_join_replays_from_zero() -> None:
    bus = InProcBus()
    index = KvIndexer(block_size=BLOCK_SIZE)
    transport = InProcTransport(bus, "w1")
    async with KvEventPublisher(transport, block_size=BLOCK_SIZE) as publisher:
        store(publisher, 0, [11])  # published before anyone listened
        async with (
            InProcTransport(bus) as side,
            KvEventSubscriber(
                index,
                block_size=BLOCK_SIZE,
                transport=side,
                endpoints=[WorkerEndpoint(1, "w1", replay_address="w1")],
            ) as subscriber,
        ):
            await wait_until(lambda: subscriber.stats().streams[0].connected)
            store(publisher, 4, [12], parent=11)
            await wait_until(lambda: subscriber.stats().streams[0].last_seq == 1)
            stats = subscriber.stats().streams[0]
            assert (stats.num_late_joins, stats.num_replays_ok, stats.num_resets) == (1, 1, 0)
            assert index.find_matches_for_request(tokens(0, 2)) == {1: 2}


async def test_malformed_messages_are_counted_and_skipped(rig: Rig) -> None:
    bus = rig.bus
    bus.channel("w1").owner = InProcTransport(bus)  # looks bound: frames come from inject()
    await wait_until(lambda: rig.stream().connected)
    good = encode_batch(KVEventBatch(1.0, [BlockStored([11], None, tokens(0, 1), BLOCK_SIZE)]))
    one_bad_event = msgspec.msgpack.encode(
        [1.0, [["Nope"], ["BlockStored", [12], 11, tokens(4, 1), BLOCK_SIZE]], None]
    )
    bus.inject("w1", [b"", encode_seq(0)])  # two frames
    bus.inject("w1", [b"", b"\x00", b"x"])  # short seq
    bus.inject("w1", [b"", encode_seq(0), good])
    bus.inject("w1", [b"", encode_seq(1), b"\xc1"])  # not msgpack
    bus.inject("w1", [b"", encode_seq(2), one_bad_event])
    wrong_size = KVEventBatch(1.0, [BlockStored([13], None, tokens(8, 2), BLOCK_SIZE * 2)])
    bus.inject("w1", [b"", encode_seq(3), encode_batch(wrong_size)])
    await wait_until(lambda: rig.stream().last_seq == 3)
    stats = rig.stream()
    assert dict(stats.decode_errors) == {
        "frame_count": 1,
        "seq": 1,
        "batch": 1,
        "event": 1,
        "block_size_mismatch": 1,
    }
    assert (stats.num_messages, stats.num_events, stats.num_resets) == (4, 2, 0)
    assert rig.subscriber.stats().num_decode_errors == 5
    assert rig.index.find_matches_for_request(tokens(0, 2)) == {1: 2}


async def test_hybrid_model_map_batches_index_the_full_attention_group(rig: Rig) -> None:
    # The newest vLLM's form (the batch a map) from a model with a sliding-window group:
    # only the full-attention group's blocks reach the index, the rest is counted.
    bus = rig.bus
    bus.channel("w1").owner = InProcTransport(bus)
    await wait_until(lambda: rig.stream().connected)

    def stored(hashes: list[int], parent: int | None, group: int, kind: str) -> BlockStored:
        return BlockStored(
            hashes,
            parent,
            tokens(4 * (hashes[0] - 11), len(hashes)),
            BLOCK_SIZE,
            medium="GPU",
            group_idx=group,
            kv_cache_spec_kind=kind,
        )

    first = KVEventBatch(
        1.0,
        [stored([11, 12], None, 1, "sliding_window"), stored([11, 12], None, 0, "full_attention")],
        0,
    )
    second = KVEventBatch(2.0, [BlockRemoved([11], group_idx=1)], 0)
    bus.inject("w1", [b"", encode_seq(0), encode_batch(first, form="map-batch")])
    bus.inject("w1", [b"", encode_seq(1), encode_batch(second, form="map-batch")])
    await wait_until(lambda: rig.stream().last_seq == 1)
    stats = rig.stream()
    assert (stats.num_events, stats.num_skipped_events, stats.kv_group) == (1, 2, 0)
    assert rig.subscriber.stats().num_skipped_events == 2
    assert dict(stats.decode_errors) == {}
    # The window's removal of block 11 did not cut the full-attention prefix.
    assert rig.index.find_matches_for_request(tokens(0, 2)) == {1: 2}


async def test_forced_dp_rank_and_remove_endpoint_forgets_the_worker() -> None:
    bus = InProcBus()
    index = KvIndexer(block_size=BLOCK_SIZE)
    async with (
        InProcTransport(bus) as side,
        KvEventSubscriber(index, block_size=BLOCK_SIZE, transport=side) as subscriber,
    ):
        subscriber.add_endpoint(WorkerEndpoint(7, "w7", dp_rank=2))
        with pytest.raises(ValueError, match="worker 7 rank 2 is already subscribed"):
            subscriber.add_endpoint(WorkerEndpoint(7, "other", dp_rank=2))
        transport = InProcTransport(bus, "w7")
        async with KvEventPublisher(transport, block_size=BLOCK_SIZE) as publisher:
            await wait_until(lambda: subscriber.stats().streams[0].connected)
            store(publisher, 0, [11])
            await wait_until(lambda: subscriber.stats().streams[0].last_seq == 0)
            assert index.tree_size(WorkerKey(7, 2)) == 1
            assert await subscriber.remove_endpoint(7) == 1
            assert index.workers() == []
            assert subscriber.stats().streams == ()
