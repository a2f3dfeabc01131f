"""NATS transport: the same frames and replay as ZeroMQ, for fleets that share a NATS server.

Where workers and the router reach each other only through NATS (the NATS runtime's
deployments), KV events and load metrics travel there too. A publisher owns one
subject (its ``address``, e.g. ``kvr.events.worker-3``); each message is one NATS
message on it, an envelope around the three frames::

    [topic length: u16 big-endian][topic][seq: u64 big-endian][payload]

Replay works as ZeroMQ's does: a subscriber sends the start seq (8 bytes, big-endian)
to the publisher's replay subject (``address + ".replay"``) with a reply inbox; the
publisher sends every buffered message with ``seq >= start`` there, one envelope each,
then an envelope with the end marker (``END_SEQ``) and an empty payload.

NATS delivers messages on one subject from one connection in order, and drops them for
a subscriber that falls too far behind (a slow consumer), so a subscriber sees the same
gaps as with ZeroMQ and repairs them the same way::

    publisher = KvEventPublisher(
        NatsTransport("nats://10.0.0.2:4222", "kvr.events.w1"), block_size=16)
    subscriber = KvEventSubscriber(index, block_size=16,
        transport=NatsTransport("nats://10.0.0.2:4222"),
        endpoints=[WorkerEndpoint(1, "kvr.events.w1", "kvr.events.w1.replay")])
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from kvrouter.errors import EventStreamError, RouterError
from kvrouter.lifecycle import cancel_and_wait
from kvrouter.transport.base import (
    END_SEQ,
    SEQ_NUM_BYTES,
    EventTransport,
    FrameQueue,
    Message,
    Subscription,
    SubscriptionEndpoint,
    TransportStats,
    encode_seq,
    parse_frames,
)

__all__ = [
    "NatsSubscription",
    "NatsTransport",
    "connect_nats",
    "is_nats_endpoint",
    "log_nats_error",
    "nats_endpoint",
    "pack_envelope",
    "split_nats_endpoint",
    "unpack_envelope",
]

logger = logging.getLogger(__name__)

DEFAULT_BUFFER_STEPS = 10_000
DEFAULT_QUEUE_SIZE = 100_000
REPLAY_SUFFIX = ".replay"
_TOPIC_LEN_BYTES = 2


def is_nats_endpoint(endpoint: str) -> bool:
    """Whether a configured endpoint names a NATS subject (``nats://host:port/subject``)."""
    return endpoint.startswith("nats://")


def split_nats_endpoint(endpoint: str) -> tuple[str, str]:
    """``nats://host:port/subject`` -> (``nats://host:port``, ``subject``).

    Raises ``ValueError`` for anything else (no host, no subject, a path in the subject).
    """
    parts = urlsplit(endpoint)
    subject = parts.path[1:]
    if parts.scheme != "nats" or not parts.netloc or not subject or "/" in subject:
        raise ValueError(f"a NATS endpoint looks like nats://host:4222/subject, got {endpoint!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a NATS endpoint has no query or fragment, got {endpoint!r}")
    return f"nats://{parts.netloc}", subject


def nats_endpoint(server: str, subject: str) -> str:
    """The inverse of :func:`split_nats_endpoint`."""
    return f"{server.rstrip('/')}/{subject}"


def pack_envelope(message: Message) -> bytes:
    """One message as the payload of a NATS message."""
    topic = message.topic
    if len(topic) > 0xFFFF:
        raise ValueError(f"topic of {len(topic)} bytes does not fit a NATS envelope")
    return b"".join(
        [
            len(topic).to_bytes(_TOPIC_LEN_BYTES, "big"),
            topic,
            encode_seq(message.seq),
            message.payload,
        ]
    )


def unpack_envelope(data: bytes) -> list[bytes]:
    """The three frames inside an envelope; a malformed one comes back as a single frame,
    which :func:`~kvrouter.transport.base.parse_frames` reports (and the stream goes on)."""
    if len(data) < _TOPIC_LEN_BYTES:
        return [data]
    topic_end = _TOPIC_LEN_BYTES + int.from_bytes(data[:_TOPIC_LEN_BYTES], "big")
    seq_end = topic_end + SEQ_NUM_BYTES
    if len(data) < seq_end:
        return [data]
    return [data[_TOPIC_LEN_BYTES:topic_end], data[topic_end:seq_end], data[seq_end:]]


async def log_nats_error(exc: Exception) -> None:
    """``error_cb`` for nats-py: one line per error instead of its default traceback.

    A refused connection, which every reconnect attempt meets while the server is down,
    is logged at debug level; the lost connection itself is a warning, once.
    """
    level = logging.DEBUG if isinstance(exc, OSError) else logging.WARNING
    logger.log(level, "NATS: %s: %s", type(exc).__name__, exc)


async def connect_nats(
    servers: str | list[str],
    *,
    error: type[RouterError] = EventStreamError,
    reconnect_wait_s: float = 0.5,
    **callbacks: Any,
) -> Any:
    """A ``nats.NATS`` connection that reconnects for as long as it takes (every
    ``reconnect_wait_s``; a server restart must not end it) and logs nats-py's errors
    as one line each. ``callbacks``: nats-py's ``disconnected_cb`` and the like.

    Raises ``error`` when the server cannot be reached now.
    """
    import nats

    try:
        return await nats.connect(
            servers,
            connect_timeout=2,
            max_reconnect_attempts=-1,
            reconnect_time_wait=reconnect_wait_s,
            error_cb=log_nats_error,
            **callbacks,
        )
    except Exception as exc:  # nats raises several unrelated types for an unreachable server
        raise error(f"cannot connect to NATS at {servers}: {exc}") from exc


class NatsSubscription(Subscription):
    """A subscriber's queue on one publisher's subject."""

    def __init__(self, nc: Any, endpoint: SubscriptionEndpoint, queue_size: int) -> None:
        self.endpoint = endpoint
        self._nc = nc
        self._queue = FrameQueue(queue_size)
        self._sub: Any = None
        self._closed = False

    @property
    def num_dropped(self) -> int:
        """Messages lost to a full queue (NATS itself may drop more for a slow consumer)."""
        return self._queue.num_dropped

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self.endpoint.address, cb=self._on_message)
        await self._nc.flush()

    async def _on_message(self, msg: Any) -> None:
        frames = unpack_envelope(msg.data)
        if len(frames) == 3 and not frames[0].startswith(self.endpoint.topic):
            return  # another topic on the same subject: not ours, as a SUB filter
        self._queue.offer(frames)

    async def recv(self) -> list[bytes]:
        while not self._queue:
            if self._closed or self._nc.is_closed:
                raise EventStreamError(f"NATS subscription to {self.endpoint.address} closed")
            await self._queue.wait(1.0)  # now and then: notice a connection closed for good
        return self._queue.pop()

    @property
    def connected(self) -> bool:
        return not self._closed and bool(self._nc.is_connected)

    async def replay(self, start_seq: int, timeout_s: float) -> list[Message] | None:
        subject = self.endpoint.replay_address
        if subject is None or self._closed or not self._nc.is_connected:
            return None
        replies: asyncio.Queue[Any] = asyncio.Queue()
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=replies.put)
        try:
            await self._nc.publish(subject, encode_seq(start_seq), reply=inbox)
            async with asyncio.timeout(timeout_s):
                return await self._collect(replies)
        except TimeoutError:
            logger.warning("replay from %s timed out after %.3f s", subject, timeout_s)
            return None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _collect(self, replies: asyncio.Queue[Any]) -> list[Message] | None:
        messages: list[Message] = []
        while True:
            msg = await replies.get()
            if msg.headers and msg.headers.get("Status") == "503":
                return None  # nobody answers on the replay subject
            frames = unpack_envelope(msg.data)
            if len(frames) == 3 and int.from_bytes(frames[1], "big") == END_SEQ:
                return messages
            reply = parse_frames(frames)
            if not isinstance(reply, Message):
                logger.warning("bad replay reply from %s: %s", self.endpoint.replay_address, reply)
                return None
            messages.append(reply)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.wake()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


class NatsTransport(EventTransport):
    """:class:`EventTransport` over NATS.

    ``servers``: the NATS server URL(s), used when no ``connection`` (a connected
    ``nats.NATS`` client, e.g. the runtime's) is given; a connection passed in stays the
    caller's. ``address``: the subject to publish on (``None``: subscribe only).
    ``buffer_steps``: messages kept for replay (0: no replay subject).
    ``queue_size``: per-subscription and outgoing queue bound (a full queue drops).
    """

    kind = "nats"

    def __init__(
        self,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        address: str | None = None,
        *,
        connection: Any = None,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        if buffer_steps < 0 or queue_size <= 0:
            raise ValueError(
                f"buffer_steps must be >= 0 and queue_size > 0, got {buffer_steps}, {queue_size}"
            )
        if address is not None and (not address or address.endswith(REPLAY_SUFFIX)):
            raise ValueError(f"not a usable NATS subject to publish on: {address!r}")
        self._servers = servers
        self._address = address
        self._nc = connection
        self._owns_connection = connection is None
        self._buffer: deque[Message] | None = deque(maxlen=buffer_steps) if buffer_steps else None
        self._queue_size = queue_size
        self._outgoing: asyncio.Queue[bytes | None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._replay_sub: Any = None
        self._subscriptions: list[NatsSubscription] = []
        self._started = False
        self._closed = False
        self._num_published = 0
        self._num_dropped = 0
        self._num_replay_requests = 0
        self._num_bad_replay_requests = 0

    async def _connection(self) -> Any:
        if self._nc is None:
            self._nc = await connect_nats(self._servers)
        return self._nc

    async def start(self) -> None:
        if self._closed:
            raise ValueError("transport is closed")
        if self._started:
            return
        nc = await self._connection()
        self._started = True
        if self._address is None:
            return
        self._outgoing = asyncio.Queue(self._queue_size)
        self._sender = asyncio.create_task(self._send_forever(nc, self._address))
        if self._buffer is not None:
            self._replay_sub = await nc.subscribe(
                self._address + REPLAY_SUFFIX, cb=self._serve_replay
            )
        await nc.flush()

    def publish(self, message: Message) -> bool:
        outgoing = self._outgoing
        if outgoing is None or self._closed:
            raise ValueError("transport has no started publishing subject (call start())")
        self._num_published += 1
        if self._buffer is not None:
            self._buffer.append(message)
        try:
            outgoing.put_nowait(pack_envelope(message))
        except asyncio.QueueFull:
            self._num_dropped += 1
            return False
        return True

    async def _send_forever(self, nc: Any, subject: str) -> None:
        outgoing = self._outgoing
        assert outgoing is not None
        while True:
            data = await outgoing.get()
            if data is None:
                return  # closing: everything queued before was sent
            try:
                await nc.publish(subject, data)
            except Exception as exc:  # a closed or failed connection: the message is lost
                self._num_dropped += 1
                logger.warning("NATS publish on %s failed: %s", subject, exc)

    async def _serve_replay(self, msg: Any) -> None:
        self._num_replay_requests += 1
        if len(msg.data) != SEQ_NUM_BYTES or not msg.reply:
            self._num_bad_replay_requests += 1
            logger.warning("bad replay request on %s: %r", self._address, msg.data[:16])
            return
        start_seq = int.from_bytes(msg.data, "big")
        wanted = [m for m in self._buffer or () if m.seq >= start_seq]
        nc = self._nc
        for message in wanted:
            await nc.publish(msg.reply, pack_envelope(message))
        await nc.publish(msg.reply, pack_envelope(Message(b"", END_SEQ, b"")))

    async def subscribe(self, endpoint: SubscriptionEndpoint) -> NatsSubscription:
        if self._closed:
            raise ValueError("transport is closed")
        nc = await self._connection()
        subscription = NatsSubscription(nc, endpoint, self._queue_size)
        try:
            await subscription.start()
        except Exception as exc:  # a closed or broken connection; the caller retries
            raise EventStreamError(f"cannot subscribe to {endpoint.address}: {exc}") from exc
        self._subscriptions.append(subscription)
        return subscription

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        sender = self._sender
        if sender is not None:
            try:  # send what is queued, briefly
                async with asyncio.timeout(1.0):
                    await self._finish_sending(sender)
            except TimeoutError:
                logger.warning("closing NATS transport with unsent messages on %s", self._address)
            finally:
                await cancel_and_wait(sender)
        for subscription in self._subscriptions:
            await subscription.aclose()
        if self._replay_sub is not None:
            with contextlib.suppress(Exception):
                await self._replay_sub.unsubscribe()
        nc = self._nc
        if nc is not None and self._owns_connection and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.drain()

    async def _finish_sending(self, sender: asyncio.Task[None]) -> None:
        assert self._outgoing is not None
        await self._outgoing.put(None)
        await sender
        if self._nc.is_connected:
            await self._nc.flush()

    def stats(self) -> TransportStats:
        return TransportStats(
            kind=self.kind,
            num_published=self._num_published,
            num_dropped=self._num_dropped,
            num_buffered=len(self._buffer) if self._buffer is not None else 0,
            num_replay_requests=self._num_replay_requests,
            num_bad_replay_requests=self._num_bad_replay_requests,
            num_subscriptions=len(self._subscriptions),
        )

    @property
    def connection(self) -> Any:
        """The ``nats.NATS`` client once started (or the one passed in), else ``None``."""
        return self._nc

    @property
    def publish_address(self) -> str | None:
        return self._address if self._sender is not None else None

    @property
    def replay_address(self) -> str | None:
        if self._sender is None or self._buffer is None or self._address is None:
            return None
        return self._address + REPLAY_SUFFIX
