"""Feeds of the gateway's workers: KV events, and pushed load metrics.

A worker configured with ``kv_events`` (and optionally ``replay``) gets one event
stream (:class:`SubscriberFeeds`, over :class:`KvEventSubscriber`); removing the worker
stops it and forgets its blocks. Workers without events are routed in approximate mode
(the scheduler's predicted entries only).

Endpoints are ZeroMQ addresses (``tcp://host:port``) or NATS subjects
(``nats://host:port/subject``, replay on ``subject.replay`` unless ``replay`` names
another subject).

A worker configured with ``metrics`` (the endpoint of its ``WorkerMetricsPublisher``)
pushes its load (:class:`MetricsFeeds`, over
:class:`MetricsSubscriber`) and is not scraped; the others are scraped over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable

from kvrouter.gateway.registry import WorkerState
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.transport.base import EventTransport
from kvrouter.transport.metrics import MetricsStreamStats, MetricsSubscriber
from kvrouter.transport.nats_transport import NatsTransport, is_nats_endpoint, split_nats_endpoint
from kvrouter.transport.subscriber import (
    EventIndex,
    KvEventSubscriber,
    SubscriberStats,
    WorkerEndpoint,
)

__all__ = ["MetricsFeeds", "SubscriberFeeds"]


class SubscriberFeeds:
    """The :class:`~kvrouter.gateway.service.EventFeeds` of a live gateway.

    ZeroMQ endpoints share one subscriber; ``nats://host:port/subject`` endpoints get
    one subscriber (and NATS connection) per server, opened on the first such worker.
    """

    def __init__(
        self, index: EventIndex, *, block_size: int, transport: EventTransport | None = None
    ) -> None:
        self._index = index
        self._block_size = block_size
        self._subscriber = KvEventSubscriber(index, block_size=block_size, transport=transport)
        self._started = False
        self._nats: dict[str, tuple[EventTransport, KvEventSubscriber]] = {}

    async def start_feed(self, state: WorkerState) -> None:
        spec = state.spec
        if not spec.kv_events:
            return
        replay: str | None
        if is_nats_endpoint(spec.kv_events):
            server, address = split_nats_endpoint(spec.kv_events)
            replay = split_nats_endpoint(spec.replay)[1] if spec.replay else address + ".replay"
            subscriber = await self._nats_subscriber(server)
        else:
            address, replay = spec.kv_events, spec.replay
            subscriber = self._subscriber
            if not self._started:
                self._started = True
                await subscriber.start()
        subscriber.add_endpoint(
            WorkerEndpoint(
                worker_id=state.worker_id,
                address=address,
                replay_address=replay,
                dp_rank=spec.dp_rank,
            )
        )

    async def _nats_subscriber(self, server: str) -> KvEventSubscriber:
        found = self._nats.get(server)
        if found is None:
            transport = NatsTransport(server)
            subscriber = KvEventSubscriber(
                self._index, block_size=self._block_size, transport=transport
            )
            await subscriber.start()
            found = self._nats[server] = (transport, subscriber)
        return found[1]

    def _subscribers(self) -> list[KvEventSubscriber]:
        return [self._subscriber, *(subscriber for _, subscriber in self._nats.values())]

    async def stop_feed(self, worker_id: int) -> None:
        for subscriber in self._subscribers():
            await subscriber.remove_endpoint(worker_id, forget=True)

    async def aclose(self) -> None:
        for subscriber in self._subscribers():
            await subscriber.aclose()
        for transport, _ in self._nats.values():
            await transport.aclose()

    def stats(self) -> SubscriberStats:
        parts = [subscriber.stats() for subscriber in self._subscribers()]
        return SubscriberStats(
            streams=tuple(stream for part in parts for stream in part.streams),
            num_messages=sum(p.num_messages for p in parts),
            num_events=sum(p.num_events for p in parts),
            num_gaps=sum(p.num_gaps for p in parts),
            num_resets=sum(p.num_resets for p in parts),
            num_decode_errors=sum(p.num_decode_errors for p in parts),
            num_skipped_events=sum(p.num_skipped_events for p in parts),
        )


class MetricsFeeds:
    """Pushed load metrics of the workers that have a ``metrics`` endpoint.

    Every snapshot goes to ``on_metrics`` with the worker id (and rank) of the endpoint
    it came from, never the one it claims. The ZeroMQ socket is opened on the first
    feed, so a gateway whose workers are all scraped opens none; ``nats://`` endpoints
    get one subscriber (and connection) per NATS server.
    """

    def __init__(
        self,
        on_metrics: Callable[[ForwardPassMetrics], object],
        *,
        transport: EventTransport | None = None,
    ) -> None:
        self._on_metrics = on_metrics
        self._transport = transport
        self._subscribers: dict[str | None, MetricsSubscriber] = {}  # None: ZeroMQ
        self._nats_transports: list[EventTransport] = []

    async def start_feed(self, state: WorkerState) -> None:
        spec = state.spec
        if not spec.metrics:
            return
        server: str | None = None
        address = spec.metrics
        if is_nats_endpoint(address):
            server, address = split_nats_endpoint(address)
        subscriber = self._subscribers.get(server)
        if subscriber is None:
            transport = self._transport
            if server is not None:
                transport = NatsTransport(server)
                self._nats_transports.append(transport)
            subscriber = MetricsSubscriber(transport=transport)
            subscriber.add_listener(self._on_metrics)
            await subscriber.start()
            self._subscribers[server] = subscriber
        subscriber.add_endpoint(
            WorkerEndpoint(worker_id=state.worker_id, address=address, dp_rank=spec.dp_rank)
        )

    async def stop_feed(self, worker_id: int) -> None:
        for subscriber in self._subscribers.values():
            await subscriber.remove_endpoint(worker_id)

    async def aclose(self) -> None:
        for subscriber in self._subscribers.values():
            await subscriber.aclose()
        for transport in self._nats_transports:
            await transport.aclose()

    def stats(self) -> tuple[MetricsStreamStats, ...]:
        return tuple(s for subscriber in self._subscribers.values() for s in subscriber.stats())
