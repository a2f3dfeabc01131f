"""The one small transport interface: publish, subscribe, close.

A transport moves *sequenced messages* from one publisher to its subscribers. A
message is exactly what vLLM puts on its ZeroMQ PUB socket (DESIGN 3.2)::

    frame 0   topic            bytes, subscribers filter on its prefix
    frame 1   seq              8 bytes, big-endian unsigned; 0, 1, 2, ... per publisher
    frame 2   payload          msgpack (a KV event batch, or a metrics snapshot)

Every implementation carries these three frames unchanged, so the subscriber has a
single parsing path (:func:`parse_frames`) whatever moves the bytes. A transport that
keeps a replay buffer also answers "send me everything from ``start_seq`` on"
(:meth:`Subscription.replay`), which is how a subscriber repairs a gap.

Implementations: :class:`~kvrouter.transport.inproc.InProcTransport` (tests, the
embedded default, the simulator), :class:`~kvrouter.transport.zmq_transport.ZmqTransport`
(vLLM / SGLang compatible) and :class:`~kvrouter.transport.nats_transport.NatsTransport`
(fleets that share a NATS server). :func:`make_event_transport` picks one by name.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvrouter.errors import DecodeError
from kvrouter.lifecycle import AsyncLifecycle

__all__ = [
    "END_SEQ",
    "EventTransport",
    "FrameQueue",
    "Malformed",
    "Message",
    "Subscription",
    "SubscriptionEndpoint",
    "TransportStats",
    "decode_seq",
    "encode_seq",
    "make_event_transport",
    "parse_frames",
]

# The replay stream ends with this seq and an empty payload (vLLM: -1 as signed 8 bytes).
END_SEQ = 0xFFFF_FFFF_FFFF_FFFF
SEQ_NUM_BYTES = 8


def encode_seq(seq: int) -> bytes:
    """``seq`` as 8 big-endian bytes, the wire form of frame 1."""
    return seq.to_bytes(SEQ_NUM_BYTES, "big", signed=False)


def decode_seq(frame: bytes) -> int:
    """Inverse of :func:`encode_seq`; raises :class:`DecodeError` on a wrong length."""
    if len(frame) != SEQ_NUM_BYTES:
        raise DecodeError(f"seq frame has {len(frame)} bytes, expected {SEQ_NUM_BYTES}")
    return int.from_bytes(frame, "big", signed=False)


class Message(NamedTuple):
    """One published message: ``[topic, seq, payload]``."""

    topic: bytes
    seq: int
    payload: bytes

    def frames(self) -> list[bytes]:
        """The three wire frames."""
        return [self.topic, encode_seq(self.seq), self.payload]


class Malformed(NamedTuple):
    """Why frames are not a message; ``kind`` is what stats count by."""

    kind: str  # "frame_count" | "seq"
    reason: str


def parse_frames(frames: Sequence[bytes]) -> Message | Malformed:
    """Frames from a subscription -> :class:`Message`, or :class:`Malformed` saying why not.

    A value rather than an exception: a malformed message is counted and skipped, and
    the stream goes on.
    """
    if len(frames) != 3:
        return Malformed("frame_count", f"message has {len(frames)} frames, expected 3")
    seq_frame = frames[1]
    if len(seq_frame) != SEQ_NUM_BYTES:
        return Malformed("seq", f"seq frame has {len(seq_frame)} bytes, expected {SEQ_NUM_BYTES}")
    seq = int.from_bytes(seq_frame, "big", signed=False)
    if seq == END_SEQ:
        return Malformed("seq", "a live message carries the replay end marker")
    return Message(bytes(frames[0]), seq, bytes(frames[2]))


@dataclass(frozen=True, slots=True)
class SubscriptionEndpoint:
    """Where to subscribe: a publisher address, its optional replay address and a topic.

    For ZeroMQ the addresses are ZeroMQ endpoints (``tcp://10.0.0.5:5557``); for the
    in-process transport they are names on an :class:`~kvrouter.transport.inproc.InProcBus`.
    """

    address: str
    replay_address: str | None = None
    topic: bytes = b""


@dataclass(frozen=True, slots=True)
class TransportStats:
    """What a transport has done (publishing side)."""

    kind: str
    num_published: int
    num_dropped: int  # not sent: a full queue, a high-water mark, or an injected fault
    num_buffered: int  # messages held for replay now
    num_replay_requests: int
    num_bad_replay_requests: int
    num_subscriptions: int


class FrameQueue:
    """A subscription's bounded queue of received frames; a full queue drops the newest
    message (as a ZeroMQ high-water mark does) and counts it."""

    def __init__(self, size: int) -> None:
        self._items: deque[list[bytes]] = deque()
        self._size = size
        self._ready = asyncio.Event()
        self.num_dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, frames: list[bytes]) -> bool:
        """Queue ``frames`` if there is room; ``True`` if queued."""
        if len(self._items) >= self._size:
            self.num_dropped += 1
            return False
        self._items.append(frames)
        self._ready.set()
        return True

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until something is queued, :meth:`wake` is called or ``timeout_s`` passes."""
        if self._items:
            return
        self._ready.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()

    def wake(self) -> None:
        """End every :meth:`wait` now (the subscription is closing)."""
        self._ready.set()

    def pop(self) -> list[bytes]:
        """The oldest queued frames (the queue must not be empty)."""
        return self._items.popleft()


class Subscription(abc.ABC):
    """One subscriber's connection to one publisher."""

    endpoint: SubscriptionEndpoint

    @abc.abstractmethod
    async def recv(self) -> list[bytes]:
        """The next message's raw frames (parse with :func:`parse_frames`).

        Raises :class:`~kvrouter.errors.EventStreamError` when the connection broke
        beyond what the transport repairs by itself.
        """

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether a publisher is connected right now (best knowledge)."""

    async def wait_connected(self) -> None:
        """Return once the subscription reaches its publisher.

        At once by default: subscribing already connected, or there is nothing to wait
        for. A transport that connects in the background (ZeroMQ) waits for that.
        """
        return None

    @abc.abstractmethod
    async def replay(self, start_seq: int, timeout_s: float) -> list[Message] | None:
        """Every buffered message with ``seq >= start_seq``, oldest first.

        ``None``: no replay is possible (no replay endpoint, timeout, broken reply).
        An empty list or a first seq above ``start_seq`` means the publisher no longer
        holds the start of the range. Raises nothing for an unreachable publisher.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop receiving and release resources; idempotent."""


class EventTransport(AsyncLifecycle, abc.ABC):
    """Publish sequenced messages and subscribe to publishers.

    The publishing side is optional: a transport built without a publish address can
    only subscribe. ``async with transport:`` starts it and closes it.
    """

    kind: str = ""

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind the publishing side, if any, and start its background tasks; idempotent."""

    @abc.abstractmethod
    def publish(self, message: Message) -> bool:
        """Send without blocking; buffer for replay. ``False``: the message was dropped.

        Raises ``ValueError`` when the transport has no publishing side or is not started.
        """

    @abc.abstractmethod
    async def subscribe(self, endpoint: SubscriptionEndpoint) -> Subscription:
        """Connect to a publisher. Works before the publisher exists (it connects later)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop serving and release sockets; idempotent."""

    @abc.abstractmethod
    def stats(self) -> TransportStats:
        """A frozen snapshot of the publishing side's counters."""

    @property
    def publish_address(self) -> str | None:
        """The address subscribers connect to, once started (ports resolved)."""
        return None

    @property
    def replay_address(self) -> str | None:
        """The replay address subscribers connect to, once started."""
        return None


TRANSPORT_KINDS = ("inproc", "zmq", "nats")


def make_event_transport(kind: str, **options: Any) -> EventTransport:
    """Build a transport by name: ``"inproc"``, ``"zmq"`` or ``"nats"``.

    ``options`` go to the implementation's constructor::

        make_event_transport("zmq", endpoint="tcp://*:5557", replay_endpoint="tcp://*:5558")
        make_event_transport("inproc", bus=bus, address="worker-1")
        make_event_transport("nats", servers="nats://10.0.0.2:4222", address="kvr.events.w1")

    Raises ``ValueError`` naming an unknown kind.
    """
    if kind == "inproc":
        from kvrouter.transport.inproc import InProcTransport

        return InProcTransport(**options)
    if kind == "zmq":
        from kvrouter.transport.zmq_transport import ZmqTransport

        return ZmqTransport(**options)
    if kind == "nats":
        from kvrouter.transport.nats_transport import NatsTransport

        return NatsTransport(**options)
    raise ValueError(
        f"unknown event transport kind {kind!r}; expected one of {', '.join(TRANSPORT_KINDS)}"
    )
