from __future__ import annotations

import pytest

from kvrouter.transport import InProcBus, InProcTransport, Message, SubscriptionEndpoint


async def test_publish_reaches_matching_subscriptions_only() -> None:
    bus = InProcBus()
    async with InProcTransport(bus, "w1") as pub, InProcTransport(bus) as sub_side:
        kv = await sub_side.subscribe(SubscriptionEndpoint("w1", topic=b"kv"))
        other = await sub_side.subscribe(SubscriptionEndpoint("w1", topic=b"metrics"))
        assert kv.connected
        assert pub.publish(Message(b"kv-events", 0, b"a"))
        assert await kv.recv() == [b"kv-events", (0).to_bytes(8, "big"), b"a"]
        assert pub.publish(Message(b"kv-events", 1, b"b"))
        assert (await kv.recv())[2] == b"b"
        assert not other.deliver([b"kv", b"", b""])  # topic filter, as a SUB socket
        assert pub.stats().num_published == 2
        assert pub.stats().num_dropped == 0
        assert pub.stats().num_subscriptions == 2


async def test_replay_returns_buffered_from_start_seq() -> None:
    bus = InProcBus()
    async with InProcTransport(bus, "w1", buffer_steps=3) as pub, InProcTransport(bus) as side:
        with_replay = await side.subscribe(SubscriptionEndpoint("w1", replay_address="w1"))
        without = await side.subscribe(SubscriptionEndpoint("w1"))
        for seq in range(5):
            pub.publish(Message(b"", seq, bytes([seq])))
        assert await with_replay.replay(3, 1.0) == [
            Message(b"", 3, b"\x03"),
            Message(b"", 4, b"\x04"),
        ]
        assert [m.seq for m in await with_replay.replay(0, 1.0) or []] == [2, 3, 4]
        assert await without.replay(0, 1.0) is None
        assert pub.stats().num_buffered == 3
        assert pub.stats().num_replay_requests == 2


async def test_full_queue_drops_and_skip_sends_buffers_without_sending() -> None:
    bus = InProcBus()
    async with InProcTransport(bus, "w1") as pub, InProcTransport(bus, queue_size=1) as side:
        subscription = await side.subscribe(SubscriptionEndpoint("w1", replay_address="w1"))
        assert pub.publish(Message(b"", 0, b"a"))
        pub.publish(Message(b"", 1, b"b"))  # queue full: dropped for this subscriber
        pub.skip_sends(1)
        assert not pub.publish(Message(b"", 2, b"c"))
        assert subscription.num_dropped == 1
        assert (await subscription.recv())[2] == b"a"
        assert [m.seq for m in await subscription.replay(0, 1.0) or []] == [0, 1, 2]
        assert pub.stats().num_dropped == 2


async def test_address_binds_once_and_frees_on_close() -> None:
    bus = InProcBus()
    first = InProcTransport(bus, "w1")
    await first.start()
    with pytest.raises(ValueError, match="'w1' is already bound"):
        await InProcTransport(bus, "w1").start()
    await first.aclose()
    await first.aclose()  # idempotent
    second = InProcTransport(bus, "w1")
    await second.start()
    assert second.stats().num_buffered == 0
    await second.aclose()


async def test_publish_without_address_is_misuse() -> None:
    transport = InProcTransport(InProcBus())
    with pytest.raises(ValueError, match="no bound publishing address"):
        transport.publish(Message(b"", 0, b""))
