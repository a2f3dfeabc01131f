"""Feeds of the gateway's workers: KV events, and pushed load metrics.

A worker configured with ``kv_events`` (and optionally ``replay``) gets one event
stream (:class:`SubscriberFeeds`, over :class:`KvEventSubscriber`); removing the worker
stops it and forgets its blocks. Workers without events are routed in approximate mode
(the scheduler's predicted entries only).

A worker configured with ``metrics`` (the ZeroMQ endpoint of its
``WorkerMetricsPublisher``) pushes its load (:class:`MetricsFeeds`, over
:class:`MetricsSubscriber`) and is not scraped; the others are scraped over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable

from kvrouter.gateway.registry import WorkerState
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.transport.base import EventTransport
from kvrouter.transport.metrics import MetricsStreamStats, MetricsSubscriber
from kvrouter.transport.subscriber import (
    EventIndex,
    KvEventSubscriber,
    SubscriberStats,
    WorkerEndpoint,
)

__all__ = ["MetricsFeeds", "SubscriberFeeds"]


class SubscriberFeeds:
    """The :class:`~kvrouter.gateway.service.EventFeeds` of a live gateway."""

    def __init__(
        self, index: EventIndex, *, block_size: int, transport: EventTransport | None = None
    ) -> None:
        self._subscriber = KvEventSubscriber(index, block_size=block_size, transport=transport)
        self._started = False

    async def start_feed(self, state: WorkerState) -> None:
        spec = state.spec
        if not spec.kv_events:
            return
        if not self._started:
            self._started = True
            await self._subscriber.start()
        self._subscriber.add_endpoint(
            WorkerEndpoint(
                worker_id=state.worker_id,
                address=spec.kv_events,
                replay_address=spec.replay,
                dp_rank=spec.dp_rank,
            )
        )

    async def stop_feed(self, worker_id: int) -> None:
        await self._subscriber.remove_endpoint(worker_id, forget=True)

    async def aclose(self) -> None:
        await self._subscriber.aclose()

    def stats(self) -> SubscriberStats:
        return self._subscriber.stats()


class MetricsFeeds:
    """Pushed load metrics of the workers that have a ``metrics`` endpoint.

    Every snapshot goes to ``on_metrics`` with the worker id (and rank) of the endpoint
    it came from, never the one it claims. The ZeroMQ socket is opened on the first
    feed, so a gateway whose workers are all scraped opens none.
    """

    def __init__(
        self,
        on_metrics: Callable[[ForwardPassMetrics], object],
        *,
        transport: EventTransport | None = None,
    ) -> None:
        self._on_metrics = on_metrics
        self._transport = transport
        self._subscriber: MetricsSubscriber | None = None

    async def start_feed(self, state: WorkerState) -> None:
        spec = state.spec
        if not spec.metrics:
            return
        subscriber = self._subscriber
        if subscriber is None:
            subscriber = MetricsSubscriber(transport=self._transport)
            subscriber.add_listener(self._on_metrics)
            await subscriber.start()
            self._subscriber = subscriber
        subscriber.add_endpoint(
            WorkerEndpoint(worker_id=state.worker_id, address=spec.metrics, dp_rank=spec.dp_rank)
        )

    async def stop_feed(self, worker_id: int) -> None:
        if self._subscriber is not None:
            await self._subscriber.remove_endpoint(worker_id)

    async def aclose(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.aclose()

    def stats(self) -> tuple[MetricsStreamStats, ...]:
        return self._subscriber.stats() if self._subscriber is not None else ()
