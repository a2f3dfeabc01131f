"""ZeroMQ transport in vLLM's exact wire format (DESIGN 3.2).

Publishing side (one engine process)::

    PUB    tcp://*:5557   ->  [topic, seq (8 bytes BE), msgpack payload]      seq 0, 1, 2, ...
    ROUTER tcp://*:5558   <-  [identity, b"", start_seq (8 bytes BE)]
                          ->  [identity, b"", topic, seq, payload]   for each buffered seq >= start
                          ->  [identity, b"", topic, 0xFFFFFFFFFFFFFFFF, b""]   end marker

(``replay_reply_form="legacy"`` drops the topic frame, as older vLLM and SGLang do.)

Subscribing side: one SUB socket per publisher (ZeroMQ reconnects it by itself, with
exponential backoff between ``reconnect_ivl_ms`` and ``reconnect_ivl_max_ms``), a
socket monitor that tracks whether the publisher is connected, and a short-lived
DEALER per replay request, so a late reply to an abandoned request never mixes with
the next one.

The PUB send never blocks: past the high-water mark ZeroMQ drops messages, and the
subscriber sees the gap and asks the replay socket for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvrouter.errors import EventStreamError
from kvrouter.lifecycle import cancel_and_wait
from kvrouter.transport.base import (
    END_SEQ,
    SEQ_NUM_BYTES,
    EventTransport,
    Malformed,
    Message,
    Subscription,
    SubscriptionEndpoint,
    TransportStats,
    encode_seq,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_REPLAY_ENDPOINT",
    "ZmqSubscription",
    "ZmqTransport",
    "parse_replay_reply",
]

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://*:5557"
DEFAULT_REPLAY_ENDPOINT = "tcp://*:5558"
DEFAULT_BUFFER_STEPS = 10_000
DEFAULT_HWM = 100_000
END_SEQ_BYTES = encode_seq(END_SEQ)
REPLY_FORMS = ("topic", "legacy")

_CONNECT_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


def parse_replay_reply(frames: Sequence[bytes], topic: bytes) -> Message | Malformed:
    """A DEALER-side replay reply -> :class:`Message` (``seq == END_SEQ`` ends the stream).

    Accepts ``[b"", topic, seq, payload]`` and the older ``[b"", seq, payload]``
    (which gets ``topic``).
    """
    if not frames or frames[0] != b"":
        return Malformed("replay_envelope", "replay reply does not start with an empty frame")
    parts = frames[1:]
    if len(parts) == 3:
        reply_topic, seq_frame, payload = parts
    elif len(parts) == 2:
        reply_topic, (seq_frame, payload) = topic, parts
    else:
        return Malformed("replay_frame_count", f"replay reply has {len(frames)} frames")
    if len(seq_frame) != SEQ_NUM_BYTES:
        return Malformed("replay_seq", f"replay seq frame has {len(seq_frame)} bytes")
    seq = int.from_bytes(seq_frame, "big", signed=False)
    return Message(bytes(reply_topic), seq, bytes(payload))


class ZmqSubscription(Subscription):
    """A SUB socket on one publisher, with a connection monitor and replay via DEALER."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        endpoint: SubscriptionEndpoint,
        *,
        hwm: int,
        reconnect_ivl_ms: int,
        reconnect_ivl_max_ms: int,
    ) -> None:
        self.endpoint = endpoint
        self._context = context
        self._connected = asyncio.Event()  # set while a publisher is connected
        self._closed = False
        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ivl_max_ms)
        sock.setsockopt(zmq.SUBSCRIBE, endpoint.topic)
        self._monitor = sock.get_monitor_socket(_CONNECT_EVENTS)
        self._sock = sock
        self._monitor_task: asyncio.Task[None] | None = None
        try:
            sock.connect(endpoint.address)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise EventStreamError(f"cannot connect to {endpoint.address!r}: {exc}") from exc

    def start_monitor(self) -> None:
        """Track connect / disconnect events (needs a running loop)."""
        if self._monitor_task is None:
            self._monitor_task = asyncio.create_task(self._watch_connection())

    async def _watch_connection(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_CONNECTED:
                self._connected.set()
            elif event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self._connected.clear()

    async def wait_connected(self) -> None:
        """Until the socket has connected to the publisher (ZeroMQ connects in the
        background, and retries while the publisher is not up)."""
        await self._connected.wait()

    async def recv(self) -> list[bytes]:
        try:
            return await self._sock.recv_multipart()
        except zmq.ZMQError as exc:
            raise EventStreamError(f"receive from {self.endpoint.address!r}: {exc}") from exc

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    async def replay(self, start_seq: int, timeout_s: float) -> list[Message] | None:
        address = self.endpoint.replay_address
        if address is None or self._closed:
            return None
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(address)
            async with asyncio.timeout(timeout_s):
                return await self._request_replay(dealer, start_seq)
        except TimeoutError:
            logger.warning("replay from %s timed out after %.3f s", address, timeout_s)
            return None
        except zmq.ZMQError as exc:
            logger.warning("replay from %s failed: %s", address, exc)
            return None
        finally:
            dealer.close()

    async def _request_replay(
        self, dealer: zmq.asyncio.Socket, start_seq: int
    ) -> list[Message] | None:
        await dealer.send_multipart([b"", encode_seq(start_seq)])
        messages: list[Message] = []
        while True:
            reply = parse_replay_reply(await dealer.recv_multipart(), self.endpoint.topic)
            if isinstance(reply, Malformed):
                logger.warning(
                    "bad replay reply from %s: %s", self.endpoint.replay_address, reply.reason
                )
                return None
            if reply.seq == END_SEQ:
                return messages
            messages.append(reply)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._monitor_task = self._monitor_task, None
        try:
            await cancel_and_wait(task)
        finally:
            self._close_sockets()

    def _close_sockets(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close()
        self._sock.close()


class ZmqTransport(EventTransport):
    """:class:`EventTransport` over ZeroMQ, compatible with vLLM and SGLang.

    ``endpoint``: the PUB address to bind (``None``: subscribe only); a port ``*``
    picks a free one (see :attr:`publish_address`). ``replay_endpoint``: the ROUTER
    address to bind (``None``: no replay). ``buffer_steps``: batches kept for replay.
    """

    kind = "zmq"

    def __init__(
        self,
        endpoint: str | None = None,
        replay_endpoint: str | None = None,
        *,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        hwm: int = DEFAULT_HWM,
        replay_reply_form: str = "topic",
        reconnect_ivl_ms: int = 100,
        reconnect_ivl_max_ms: int = 5_000,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if replay_reply_form not in REPLY_FORMS:
            raise ValueError(
                f"unknown replay_reply_form {replay_reply_form!r}; expected one of {REPLY_FORMS}"
            )
        if buffer_steps <= 0 and replay_endpoint is not None:
            raise ValueError(f"a replay endpoint needs buffer_steps > 0, got {buffer_steps}")
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._buffer: deque[Message] = deque(maxlen=max(buffer_steps, 1))
        self._keep_buffer = replay_endpoint is not None
        self._hwm = hwm
        self._reply_form = replay_reply_form
        self._reconnect = (reconnect_ivl_ms, reconnect_ivl_max_ms)
        # Created on first use, so a transport that is never started holds nothing.
        self._given_context = context
        self._own_context: zmq.asyncio.Context | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._publish_address: str | None = None
        self._replay_address: str | None = None
        self._subscriptions: list[ZmqSubscription] = []
        self._started = False
        self._closed = False
        self._skip_sends = 0
        self._num_published = 0
        self._num_dropped = 0
        self._num_replay_requests = 0
        self._num_bad_replay_requests = 0

    @property
    def _context(self) -> zmq.asyncio.Context:
        if self._given_context is not None:
            return self._given_context
        if self._own_context is None:
            self._own_context = zmq.asyncio.Context()
        return self._own_context

    async def start(self) -> None:
        if self._closed:
            raise ValueError("transport is closed")
        if self._started:
            return
        self._started = True
        try:
            self._bind_sockets()
        except BaseException:
            # ``async with`` does not close what failed to start: a taken port must not
            # leave the sockets and the context behind.
            await self.aclose()
            raise

    def _bind_sockets(self) -> None:
        if self._endpoint is not None:
            # A plain (blocking-API) socket: sends are NOBLOCK and never awaited.
            pub: zmq.Socket[bytes] = zmq.Socket(self._context, zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, self._hwm)
            self._pub = pub
            self._publish_address = _bind(pub, self._endpoint)
        if self._replay_endpoint is not None:
            router = self._context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            self._router = router
            self._replay_address = _bind(router, self._replay_endpoint)
            self._replay_task = asyncio.create_task(self._serve_replay(router))

    def publish(self, message: Message) -> bool:
        if self._pub is None:
            raise ValueError("transport has no started PUB endpoint (pass endpoint=, call start())")
        self._num_published += 1
        if self._keep_buffer:
            self._buffer.append(message)
        if self._skip_sends > 0:
            self._skip_sends -= 1
            self._num_dropped += 1
            return False
        try:
            self._pub.send_multipart(message.frames(), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._num_dropped += 1
            return False
        return True

    def skip_sends(self, count: int) -> None:
        """Fault injection: buffer the next ``count`` messages for replay but do not send them."""
        self._skip_sends += count

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != SEQ_NUM_BYTES:
                self._num_bad_replay_requests += 1
                logger.warning("ignoring a malformed replay request (%d frames)", len(frames))
                continue
            self._num_replay_requests += 1
            identity, start_seq = frames[0], int.from_bytes(frames[2], "big")
            # Copy first: publish() may append while this coroutine awaits a send.
            for message in [m for m in self._buffer if m.seq >= start_seq]:
                await router.send_multipart(self._reply(identity, message))
            end = Message(self._buffer[-1].topic if self._buffer else b"", END_SEQ, b"")
            await router.send_multipart(self._reply(identity, end))

    def _reply(self, identity: bytes, message: Message) -> list[bytes]:
        seq = encode_seq(message.seq)
        if self._reply_form == "legacy":
            return [identity, b"", seq, message.payload]
        return [identity, b"", message.topic, seq, message.payload]

    async def subscribe(self, endpoint: SubscriptionEndpoint) -> ZmqSubscription:
        if self._closed:
            raise ValueError("transport is closed")
        subscription = ZmqSubscription(
            self._context,
            endpoint,
            hwm=self._hwm,
            reconnect_ivl_ms=self._reconnect[0],
            reconnect_ivl_max_ms=self._reconnect[1],
        )
        subscription.start_monitor()
        self._subscriptions.append(subscription)
        return subscription

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._replay_task = self._replay_task, None
        await cancel_and_wait(task)
        for subscription in self._subscriptions:
            await subscription.aclose()
        self._subscriptions.clear()
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close()
        if self._own_context is not None:
            self._own_context.term()

    def stats(self) -> TransportStats:
        return TransportStats(
            kind=self.kind,
            num_published=self._num_published,
            num_dropped=self._num_dropped,
            num_buffered=len(self._buffer) if self._keep_buffer else 0,
            num_replay_requests=self._num_replay_requests,
            num_bad_replay_requests=self._num_bad_replay_requests,
            num_subscriptions=sum(1 for s in self._subscriptions if not s.closed),
        )

    @property
    def publish_address(self) -> str | None:
        return self._publish_address

    @property
    def replay_address(self) -> str | None:
        return self._replay_address


def _bind(sock: zmq.Socket[Any], endpoint: str) -> str:
    """Bind and return the resolved address (a wildcard port replaced by the real one)."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close()
        # pyzmq's message ends with "(addr=...)"; the address is named once, here.
        reason = zmq.strerror(exc.errno) if exc.errno else str(exc)
        raise EventStreamError(f"cannot bind {endpoint}: {reason}") from exc
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else str(last)
