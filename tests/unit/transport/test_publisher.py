from __future__ import annotations

import pytest

from kvrouter.clock import ManualClock
from kvrouter.events.model import Cleared, Removed, Stored
from kvrouter.events.vllm import BlockRemoved, VllmEventDecoder
from kvrouter.transport import (
    InProcBus,
    InProcTransport,
    KvEventPublisher,
    Message,
    SubscriptionEndpoint,
)
from kvrouter.transport.base import parse_frames
from tests.unit.transport.helpers import BLOCK_SIZE, tokens


async def test_one_batch_per_flush_with_increasing_seq() -> None:
    bus = InProcBus()
    clock = ManualClock(100.0)
    transport = InProcTransport(bus, "w1")
    async with (
        KvEventPublisher(transport, block_size=BLOCK_SIZE, topic="kv", clock=clock) as publisher,
        InProcTransport(bus) as side,
    ):
        subscription = await side.subscribe(SubscriptionEndpoint("w1"))
        assert publisher.flush() is None  # nothing pending: nothing sent
        publisher.publish_stored(tokens(0, 2), [11, 12])
        publisher.publish_removed([11])
        assert publisher.flush() == 0
        publisher.publish_cleared()
        publisher.publish_events([BlockRemoved(block_hashes=[5], medium="CPU")])
        assert publisher.flush() == 1

        decoder = VllmEventDecoder(BLOCK_SIZE)
        first = parse_frames(await subscription.recv())
        second = parse_frames(await subscription.recv())
        assert isinstance(first, Message) and isinstance(second, Message)
        assert (first.topic, first.seq, second.seq) == (b"kv", 0, 1)
        batch = decoder.decode(first.payload)
        assert batch.ts == 100.0
        assert [type(e) for e in batch.events] == [Stored, Removed]
        stored = batch.events[0]
        assert isinstance(stored, Stored)
        assert [b.engine_hash for b in stored.blocks] == [11, 12]
        assert stored.parent_engine_hash is None
        later = decoder.decode(second.payload).events
        assert later == [Cleared(), Removed((5,), "CPU")]
        assert publisher.stats().next_seq == 2
        assert publisher.stats().num_events == 4


async def test_dp_rank_and_map_form() -> None:
    bus = InProcBus()
    transport = InProcTransport(bus, "w1")
    async with (
        KvEventPublisher(transport, block_size=BLOCK_SIZE, data_parallel_rank=3, form="map") as pub,
        InProcTransport(bus) as side,
    ):
        subscription = await side.subscribe(SubscriptionEndpoint("w1"))
        pub.publish_stored(tokens(0, 1), [7], parent_hash=6, lora_name="ad")
        pub.flush()
        message = parse_frames(await subscription.recv())
        assert isinstance(message, Message)
        batch = VllmEventDecoder(BLOCK_SIZE).decode(message.payload)
        assert batch.dp_rank == 3
        stored = batch.events[0]
        assert isinstance(stored, Stored)
        assert (stored.parent_engine_hash, stored.lora_name) == (6, "ad")


async def test_token_count_must_match_blocks() -> None:
    publisher = KvEventPublisher(InProcTransport(InProcBus(), "w"), block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="5 token ids for 1 blocks of 4 tokens"):
        publisher.publish_stored(list(range(5)), [1])


async def test_aclose_is_idempotent_and_flush_after_close_is_misuse() -> None:
    publisher = KvEventPublisher(InProcTransport(InProcBus(), "w"), block_size=BLOCK_SIZE)
    await publisher.start()
    publisher.publish_cleared()
    await publisher.aclose()
    await publisher.aclose()
    assert publisher.stats().num_pending_events == 0
    with pytest.raises(ValueError, match="publisher is closed"):
        publisher.flush()
