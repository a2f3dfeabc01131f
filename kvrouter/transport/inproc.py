"""In-process transport: the same frames and replay as ZeroMQ, without sockets.

Used by tests, by the embedded default (gateway and simulated workers in one
process) and by the simulator. Addresses are names on an :class:`InProcBus` that
the caller creates and passes to both sides (no process-global registry)::

    bus = InProcBus()
    pub = InProcTransport(bus=bus, address="worker-1")        # publishing side
    sub = InProcTransport(bus=bus)                            # subscribing side
    subscription = await sub.subscribe(SubscriptionEndpoint("worker-1", "worker-1"))

Delivery is synchronous into a bounded per-subscription queue (a full queue drops
the message, as a ZeroMQ high-water mark does), so a subscriber sees the same gaps
and repairs them with the same replay. Replay is offered when the endpoint names a
replay address (any name; the publisher's buffer answers) and the publisher keeps a
buffer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvrouter.transport.base import (
    EventTransport,
    FrameQueue,
    Message,
    Subscription,
    SubscriptionEndpoint,
    TransportStats,
)

__all__ = ["InProcBus", "InProcSubscription", "InProcTransport"]

DEFAULT_BUFFER_STEPS = 10_000
DEFAULT_QUEUE_SIZE = 100_000


@dataclass(slots=True)
class _Channel:
    """One address on the bus: the bound publisher's buffer and the subscriptions."""

    buffer: deque[Message] | None = None
    owner: InProcTransport | None = None
    subscriptions: set[InProcSubscription] = field(default_factory=set)

    @property
    def bound(self) -> bool:
        return self.owner is not None


class InProcBus:
    """A namespace of in-process publisher addresses."""

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}

    def channel(self, address: str) -> _Channel:
        """The channel at ``address``, created on first mention (bind or subscribe)."""
        found = self._channels.get(address)
        if found is None:
            found = self._channels[address] = _Channel()
        return found

    def inject(self, address: str, frames: list[bytes]) -> int:
        """Deliver raw frames to every subscription of ``address``; returns how many got them.

        For tests that need frames no well-behaved publisher would send.
        """
        subscriptions = list(self.channel(address).subscriptions)
        return sum(1 for subscription in subscriptions if subscription.deliver(frames))


class InProcSubscription(Subscription):
    """A subscriber's queue on one :class:`InProcBus` address."""

    def __init__(self, bus: InProcBus, endpoint: SubscriptionEndpoint, queue_size: int) -> None:
        self.endpoint = endpoint
        self._bus = bus
        self._queue = FrameQueue(queue_size)
        self._closed = False
        bus.channel(endpoint.address).subscriptions.add(self)

    @property
    def num_dropped(self) -> int:
        """Messages lost to a full queue."""
        return self._queue.num_dropped

    def wants(self, topic: bytes) -> bool:
        """Whether this subscription takes messages of ``topic`` (prefix match, as SUB)."""
        return not self._closed and topic.startswith(self.endpoint.topic)

    def deliver(self, frames: list[bytes]) -> bool:
        """Queue frames if wanted and there is room; ``True`` if queued."""
        if not frames or not self.wants(frames[0]):
            return False
        return self._queue.offer(frames)

    async def recv(self) -> list[bytes]:
        while not self._queue:
            await self._queue.wait()
        return self._queue.pop()

    @property
    def connected(self) -> bool:
        return not self._closed and self._bus.channel(self.endpoint.address).bound

    async def replay(self, start_seq: int, timeout_s: float) -> list[Message] | None:
        if self.endpoint.replay_address is None:
            return None
        channel = self._bus.channel(self.endpoint.address)
        if channel.buffer is None or channel.owner is None:
            return None
        channel.owner.note_replay_request()
        return [m for m in channel.buffer if m.seq >= start_seq]

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Synchronous :meth:`aclose` (nothing here waits)."""
        if not self._closed:
            self._closed = True
            self._bus.channel(self.endpoint.address).subscriptions.discard(self)


class InProcTransport(EventTransport):
    """:class:`EventTransport` over an :class:`InProcBus`.

    ``address``: the publishing side's name (``None``: subscribe only).
    ``buffer_steps``: messages kept for replay (0: no replay).
    ``queue_size``: per-subscription queue bound.
    """

    kind = "inproc"

    def __init__(
        self,
        bus: InProcBus | None = None,
        address: str | None = None,
        *,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        if buffer_steps < 0 or queue_size <= 0:
            raise ValueError(
                f"buffer_steps must be >= 0 and queue_size > 0, got {buffer_steps}, {queue_size}"
            )
        self.bus = bus if bus is not None else InProcBus()
        self._address = address
        self._buffer_steps = buffer_steps
        self._queue_size = queue_size
        self._channel: _Channel | None = None
        self._subscriptions: list[InProcSubscription] = []
        self._closed = False
        self._skip_sends = 0
        self._num_published = 0
        self._num_dropped = 0
        self._num_replay_requests = 0

    async def start(self) -> None:
        self.bind()

    def bind(self) -> None:
        """Take the publishing address (synchronous, for the virtual-time simulator)."""
        if self._closed:
            raise ValueError("transport is closed")
        if self._address is None or self._channel is not None:
            return
        channel = self.bus.channel(self._address)
        if channel.bound:
            raise ValueError(f"in-process address {self._address!r} is already bound")
        channel.owner = self
        channel.buffer = deque(maxlen=self._buffer_steps) if self._buffer_steps else None
        self._channel = channel

    def publish(self, message: Message) -> bool:
        channel = self._channel
        if channel is None:
            raise ValueError("transport has no bound publishing address (call start())")
        self._num_published += 1
        if channel.buffer is not None:
            channel.buffer.append(message)
        if self._skip_sends > 0:
            self._skip_sends -= 1
            self._num_dropped += 1
            return False
        frames = message.frames()
        wanted = [s for s in channel.subscriptions if s.wants(message.topic)]
        if not all([s.deliver(frames) for s in wanted]):
            self._num_dropped += 1  # at least one subscriber's queue was full
        return True

    def skip_sends(self, count: int) -> None:
        """Fault injection: buffer the next ``count`` messages for replay but do not send them."""
        self._skip_sends += count

    def note_replay_request(self) -> None:
        self._num_replay_requests += 1

    async def subscribe(self, endpoint: SubscriptionEndpoint) -> InProcSubscription:
        if self._closed:
            raise ValueError("transport is closed")
        subscription = InProcSubscription(self.bus, endpoint, self._queue_size)
        self._subscriptions.append(subscription)
        return subscription

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in self._subscriptions:
            subscription.close()
        if self._channel is not None:
            # A later publisher on the same address starts with an empty buffer,
            # exactly as a restarted engine does.
            self._channel.owner = None
            self._channel.buffer = None
            self._channel = None

    def stats(self) -> TransportStats:
        buffer = self._channel.buffer if self._channel is not None else None
        return TransportStats(
            kind=self.kind,
            num_published=self._num_published,
            num_dropped=self._num_dropped,
            num_buffered=len(buffer) if buffer is not None else 0,
            num_replay_requests=self._num_replay_requests,
            num_bad_replay_requests=0,
            num_subscriptions=len(self._channel.subscriptions) if self._channel else 0,
        )

    @property
    def publish_address(self) -> str | None:
        return self._address if self._channel is not None else None

    @property
    def replay_address(self) -> str | None:
        bound = self._channel is not None and self._buffer_steps > 0
        return self._address if bound else None
