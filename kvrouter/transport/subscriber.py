"""Router side: :class:`KvEventSubscriber` feeds every worker's KV events into the index.

One background task per worker endpoint (vLLM, SGLang, or our own publisher)::

    frames -> parse [topic, seq, payload] -> sequence check -> VllmEventDecoder
           -> RouterEvent(worker_id, dp_rank, event_id, data) -> index.apply_event

Sequence check, per endpoint (``applied``: last seq applied; ``live``: last seq seen
on the live stream, which only grows while the publisher process lives)::

    seq <= live                 publisher restarted: reset the worker, start from 0
    seq <= applied              already applied through a replay: skip, if its payload
                                is the one replayed; else the publisher restarted
    seq == applied + 1          apply
    seq >  applied + 1          gap: replay [applied + 1, ...] from the replay socket;
                                if the replay does not start there (no longer buffered),
                                fails, times out or there is no replay socket: reset
                                the worker, then apply what there is
    first message, seq > 0      joined late: replay from 0, apply what there is

Before its first message, a stream with a replay socket catches up on its own: once
connected it asks for a replay from 0. A publisher sends nothing to a subscriber that
has not finished connecting, so without this the blocks a worker cached before the
router subscribed (or while it connected) would reach the index only with the
worker's next event, which an idle worker may not send for a long time.

A reset drops the worker's blocks from the index (``reset_worker``): a stale index
costs cache hits, a wrong one misroutes. Malformed messages are counted by kind,
logged with the worker and seq, and skipped; the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from kvrouter.errors import DecodeError, EventStreamError
from kvrouter.events.model import RouterEvent, WorkerKey
from kvrouter.events.vllm import VllmEventDecoder
from kvrouter.lifecycle import AsyncLifecycle, cancel_and_wait
from kvrouter.lograte import warn_sparingly
from kvrouter.transport.base import (
    EventTransport,
    Malformed,
    Message,
    Subscription,
    SubscriptionEndpoint,
    parse_frames,
)

__all__ = [
    "EventIndex",
    "KvEventSubscriber",
    "StreamStats",
    "SubscriberStats",
    "WorkerEndpoint",
]

logger = logging.getLogger(__name__)


class EventIndex(Protocol):
    """What the subscriber needs from the index (:class:`~kvrouter.index.KvIndexer` fits)."""

    def apply_event(self, event: RouterEvent, /) -> object: ...

    def reset_worker(self, worker: WorkerKey, /) -> object: ...

    def remove_worker(self, worker_id: int, dp_rank: int | None = None, /) -> object: ...


@dataclass(frozen=True, slots=True)
class WorkerEndpoint:
    """One worker's KV event stream.

    ``dp_rank``: force this rank on every event (``None``: take the batch's rank).
    ``replay_address``: the publisher's ROUTER socket (``None``: gaps reset the worker).
    """

    worker_id: int
    address: str
    replay_address: str | None = None
    dp_rank: int | None = None
    topic: bytes = b""

    @property
    def key(self) -> tuple[int, int | None]:
        return (self.worker_id, self.dp_rank)

    def subscription_endpoint(self) -> SubscriptionEndpoint:
        return SubscriptionEndpoint(self.address, self.replay_address, self.topic)


@dataclass(frozen=True, slots=True)
class StreamStats:
    """Counters of one endpoint's stream."""

    worker_id: int
    dp_rank: int | None
    address: str
    replay_address: str | None
    connected: bool
    last_seq: int | None  # last seq applied to the index (None: none yet)
    num_messages: int
    num_events: int
    num_rejected_events: int  # the index said no (counted there by reason)
    num_gaps: int
    num_replays_ok: int
    num_replays_failed: int
    num_resets: int
    num_restarts: int
    num_late_joins: int
    num_reconnects: int
    decode_errors: Mapping[str, int]  # kind -> count
    num_skipped_events: int = 0  # events of KV cache groups not indexed (hybrid models)
    kv_group: int | None = None  # the KV cache group indexed, once the worker named one
    last_decode_error: str | None = None  # "kind: reason" of the latest malformed message


@dataclass(frozen=True, slots=True)
class SubscriberStats:
    """Every stream's counters plus totals."""

    streams: tuple[StreamStats, ...]
    num_messages: int
    num_events: int
    num_gaps: int
    num_resets: int
    num_decode_errors: int
    num_skipped_events: int = 0


@dataclass(eq=False, slots=True)
class _Stream:
    """Mutable per-endpoint state; only the endpoint's own task writes it."""

    endpoint: WorkerEndpoint
    decoder: VllmEventDecoder  # one per publisher: it learns the publisher's KV groups
    task: asyncio.Task[None] | None = None
    subscription: Subscription | None = None
    applied: int = -1  # last seq applied (-1: none since start or restart)
    live: int | None = None  # last seq seen on the live stream
    # seq -> hash of the payload applied from a replay, for seqs ahead of ``live``: a
    # live message with such a seq is the same message again, or a new publisher's.
    replayed: dict[int, int] = field(default_factory=dict)
    ranks: set[int] = field(default_factory=set)
    num_messages: int = 0
    num_events: int = 0
    num_rejected: int = 0
    num_gaps: int = 0
    num_replays_ok: int = 0
    num_replays_failed: int = 0
    num_resets: int = 0
    num_restarts: int = 0
    num_late_joins: int = 0
    num_reconnects: int = 0
    decode_errors: Counter[str] = field(default_factory=Counter)
    last_decode_error: str | None = None

    def snapshot(self) -> StreamStats:
        ep = self.endpoint
        sub = self.subscription
        decoded = self.decoder.stats()
        return StreamStats(
            worker_id=ep.worker_id,
            dp_rank=ep.dp_rank,
            address=ep.address,
            replay_address=ep.replay_address,
            connected=sub is not None and sub.connected,
            last_seq=self.applied if self.applied >= 0 else None,
            num_messages=self.num_messages,
            num_events=self.num_events,
            num_rejected_events=self.num_rejected,
            num_gaps=self.num_gaps,
            num_replays_ok=self.num_replays_ok,
            num_replays_failed=self.num_replays_failed,
            num_resets=self.num_resets,
            num_restarts=self.num_restarts,
            num_late_joins=self.num_late_joins,
            num_reconnects=self.num_reconnects,
            decode_errors=MappingProxyType(dict(self.decode_errors)),
            num_skipped_events=decoded.num_skipped_events,
            kv_group=decoded.group,
            last_decode_error=self.last_decode_error,
        )


class KvEventSubscriber(AsyncLifecycle):
    """Subscribe to many workers' KV event streams and apply them to an index.

    ``transport``: how to reach publishers (default: a subscribe-only ZeroMQ transport
    the subscriber owns; a transport passed in stays the caller's).

    >>> from kvrouter.index import KvIndexer
    >>> subscriber = KvEventSubscriber(KvIndexer(block_size=16), block_size=16, endpoints=[
    ...     WorkerEndpoint(1, "tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")])
    >>> async with subscriber: ...                    # doctest: +SKIP
    """

    def __init__(
        self,
        index: EventIndex,
        *,
        block_size: int,
        transport: EventTransport | None = None,
        endpoints: Iterable[WorkerEndpoint] = (),
        replay_timeout_s: float = 2.0,
        backoff_s: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self._index = index
        self._block_size = block_size
        self._owns_transport = transport is None
        if transport is None:
            from kvrouter.transport.zmq_transport import ZmqTransport

            transport = ZmqTransport()
        self._transport = transport
        self._replay_timeout_s = replay_timeout_s
        self._backoff_s = backoff_s
        self._streams: dict[tuple[int, int | None], _Stream] = {}
        self._event_ids: dict[WorkerKey, int] = {}
        self._started = False
        self._closed = False
        for endpoint in endpoints:
            self.add_endpoint(endpoint)

    # --------------------------------------------------------------- endpoints

    def add_endpoint(self, endpoint: WorkerEndpoint) -> None:
        """Start following ``endpoint`` (now if started, else on :meth:`start`)."""
        if self._closed:
            raise ValueError("subscriber is closed")
        if endpoint.key in self._streams:
            raise ValueError(
                f"worker {endpoint.worker_id} rank {endpoint.dp_rank} is already subscribed"
            )
        stream = _Stream(endpoint, VllmEventDecoder(self._block_size))
        self._streams[endpoint.key] = stream
        if self._started:
            self._launch(stream)

    async def remove_endpoint(
        self, worker_id: int, dp_rank: int | None = None, *, forget: bool = True
    ) -> int:
        """Stop following a worker (one endpoint, or all of the worker's when ``dp_rank``
        is None); with ``forget`` its blocks leave the index. Returns endpoints removed."""
        keys = [
            key
            for key in self._streams
            if key[0] == worker_id and (dp_rank is None or key[1] == dp_rank)
        ]
        for key in keys:
            stream = self._streams.pop(key)
            await self._stop(stream)
            if forget:
                ranks = stream.ranks or {stream.endpoint.dp_rank or 0}
                for rank in sorted(ranks):
                    self._index.remove_worker(worker_id, rank)
        return len(keys)

    def endpoints(self) -> list[WorkerEndpoint]:
        """Every endpoint followed."""
        return [stream.endpoint for stream in self._streams.values()]

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start one task per endpoint; idempotent."""
        if self._closed:
            raise ValueError("subscriber is closed")
        if self._started:
            return
        self._started = True
        await self._transport.start()
        for stream in self._streams.values():
            self._launch(stream)

    async def aclose(self) -> None:
        """Cancel every stream task, close subscriptions (and an owned transport)."""
        if self._closed:
            return
        self._closed = True
        streams = list(self._streams.values())
        for stream in streams:
            await self._stop(stream)
        cancelled = sum(1 for stream in streams if stream.task is not None)
        logger.debug("KV event subscriber closed; %d stream tasks cancelled", cancelled)
        if self._owns_transport:
            await self._transport.aclose()

    def stats(self) -> SubscriberStats:
        """A frozen snapshot of every stream's counters."""
        streams = tuple(stream.snapshot() for stream in self._streams.values())
        return SubscriberStats(
            streams=streams,
            num_messages=sum(s.num_messages for s in streams),
            num_events=sum(s.num_events for s in streams),
            num_gaps=sum(s.num_gaps for s in streams),
            num_resets=sum(s.num_resets for s in streams),
            num_decode_errors=sum(sum(s.decode_errors.values()) for s in streams),
            num_skipped_events=sum(s.num_skipped_events for s in streams),
        )

    def _launch(self, stream: _Stream) -> None:
        ep = stream.endpoint
        name = f"kv-events-{ep.worker_id}-{ep.dp_rank}"
        stream.task = asyncio.create_task(self._follow(stream), name=name)

    async def _stop(self, stream: _Stream) -> None:
        await cancel_and_wait(stream.task)

    # --------------------------------------------------------------- receiving

    async def _follow(self, stream: _Stream) -> None:
        """Receive forever; on a broken connection, resubscribe with exponential backoff."""

        async def on_frames(frames: list[bytes]) -> None:
            await self._on_frames(stream, frames)

        def on_broken() -> None:
            stream.num_reconnects += 1

        async def on_subscribed(subscription: Subscription) -> None:
            await self._catch_up(stream, subscription)

        await follow(
            self._transport,
            stream,
            on_frames,
            backoff_s=self._backoff_s,
            what="events",
            on_broken=on_broken,
            on_subscribed=on_subscribed,
        )

    async def _catch_up(self, stream: _Stream, subscription: Subscription) -> None:
        """Nothing applied yet: once connected, replay what the publisher holds."""
        if stream.applied >= 0 or stream.endpoint.replay_address is None:
            return
        await subscription.wait_connected()
        replayed = await subscription.replay(0, self._replay_timeout_s)
        # No answer (the publisher's replay socket is not up yet, say) costs nothing:
        # the first live message asks again, as a late join.
        if replayed:
            stream.num_late_joins += 1
            stream.num_replays_ok += 1
            self._apply_in_order(stream, replayed, tolerate=True)

    async def _on_frames(self, stream: _Stream, frames: list[bytes]) -> None:
        """Handle one received message (the sequence check of the module docstring)."""
        message = parse_frames(frames)
        if isinstance(message, Malformed):
            self._count_malformed(stream, message.kind, None, message.reason)
            return
        stream.num_messages += 1
        seq = message.seq
        if (stream.live is not None and seq <= stream.live) or (
            seq <= stream.applied and stream.replayed.pop(seq, None) != hash(message.payload)
        ):
            self._on_restart(stream, seq)
        stream.live = seq
        if seq <= stream.applied:
            return
        stream.replayed.clear()  # the live stream is past every replayed seq
        if seq == stream.applied + 1:
            self._apply(stream, message)
            return
        await self._repair(stream, message)

    def _on_restart(self, stream: _Stream, seq: int) -> None:
        stream.num_restarts += 1
        logger.warning(
            "worker %d: publisher restarted (seq %d after %s); resetting its blocks",
            stream.endpoint.worker_id,
            seq,
            stream.applied if stream.live is None else stream.live,
        )
        self._reset(stream)
        stream.applied = -1
        stream.live = None
        stream.replayed.clear()

    async def _repair(self, stream: _Stream, message: Message) -> None:
        late_join = stream.applied < 0
        start = stream.applied + 1
        if late_join:
            stream.num_late_joins += 1
        else:
            stream.num_gaps += 1
            logger.info(
                "worker %d: gap, seq %d..%d missing; asking for a replay",
                stream.endpoint.worker_id,
                start,
                message.seq - 1,
            )
        subscription = stream.subscription
        replayed = None
        if subscription is not None:
            replayed = await subscription.replay(start, self._replay_timeout_s)
        holes = self._apply_in_order(stream, [*(replayed or ()), message], late_join)
        if stream.endpoint.replay_address is None:
            return
        if replayed is not None and not holes:
            stream.num_replays_ok += 1
        else:
            stream.num_replays_failed += 1

    def _apply_in_order(self, stream: _Stream, messages: list[Message], tolerate: bool) -> int:
        """Apply messages newer than ``applied`` in seq order; returns how many holes were
        found (each resets the worker unless ``tolerate``: there was nothing to keep)."""
        holes = 0
        for message in sorted(messages, key=lambda m: m.seq):
            if message.seq <= stream.applied:
                continue
            if message.seq != stream.applied + 1:
                holes += 1
                if not tolerate:
                    logger.warning(
                        "worker %d: seq %d..%d lost for good; resetting its blocks",
                        stream.endpoint.worker_id,
                        stream.applied + 1,
                        message.seq - 1,
                    )
                    self._reset(stream)
            self._apply(stream, message)
            stream.replayed[message.seq] = hash(message.payload)
        return holes

    def _apply(self, stream: _Stream, message: Message) -> None:
        stream.applied = message.seq
        worker_id = stream.endpoint.worker_id
        try:
            batch = stream.decoder.decode(message.payload)
        except DecodeError as exc:
            self._count_malformed(stream, "batch", message.seq, str(exc))
            return
        for error in batch.errors:
            self._count_malformed(stream, error.kind, message.seq, str(error))
        forced = stream.endpoint.dp_rank
        dp_rank = batch.dp_rank if forced is None else forced
        stream.ranks.add(dp_rank)
        key = WorkerKey(worker_id, dp_rank)
        event_id = self._event_ids.get(key, -1)
        apply_event = self._index.apply_event
        for data in batch.events:
            event_id += 1
            if apply_event(RouterEvent(worker_id, dp_rank, event_id, data)) is False:
                stream.num_rejected += 1
        self._event_ids[key] = event_id
        stream.num_events += len(batch.events)

    def _reset(self, stream: _Stream) -> None:
        stream.num_resets += 1
        ranks = stream.ranks or {stream.endpoint.dp_rank or 0}
        for rank in sorted(ranks):
            self._index.reset_worker(WorkerKey(stream.endpoint.worker_id, rank))

    def _count_malformed(self, stream: _Stream, kind: str, seq: int | None, reason: str) -> None:
        stream.decode_errors[kind] += 1
        stream.last_decode_error = f"{kind}: {reason}"
        warn_sparingly(
            logger,
            sum(stream.decode_errors.values()),
            "worker %d: malformed message (%s) at seq %s: %s",
            stream.endpoint.worker_id,
            kind,
            "?" if seq is None else seq,
            reason,
        )


class _Followed(Protocol):
    endpoint: WorkerEndpoint
    subscription: Subscription | None


async def follow(
    transport: EventTransport,
    stream: _Followed,
    on_frames: Callable[[list[bytes]], Awaitable[None]],
    *,
    backoff_s: tuple[float, float],
    what: str,
    on_broken: Callable[[], None] = lambda: None,
    on_subscribed: Callable[[Subscription], Awaitable[None]] | None = None,
) -> None:
    """Feed every message of ``stream.endpoint`` to ``on_frames``, forever; a failed or
    broken subscription is retried with exponential backoff (``backoff_s`` = min, max).
    ``on_subscribed`` runs on each new subscription before its first message."""
    min_s, max_s = backoff_s
    delay_s = min_s
    worker_id = stream.endpoint.worker_id
    while True:
        try:
            subscription = await transport.subscribe(stream.endpoint.subscription_endpoint())
        except EventStreamError as exc:
            logger.warning("worker %d %s: cannot subscribe: %s", worker_id, what, exc)
        else:
            stream.subscription = subscription
            try:
                if on_subscribed is not None:
                    await on_subscribed(subscription)
                while True:
                    await on_frames(await subscription.recv())
                    delay_s = min_s
            except EventStreamError as exc:
                on_broken()
                logger.warning("worker %d %s: stream broke: %s", worker_id, what, exc)
            finally:
                stream.subscription = None
                await subscription.aclose()
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, max_s)
