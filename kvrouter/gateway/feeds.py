"""KV event feeds of the gateway's workers, over :class:`KvEventSubscriber`.

A worker configured with ``kv_events`` (and optionally ``replay``) gets one stream;
removing the worker stops it and forgets its blocks. Workers without events are routed
in approximate mode (the scheduler's predicted entries only).
"""

from __future__ import annotations

from kvrouter.gateway.registry import WorkerState
from kvrouter.transport.base import EventTransport
from kvrouter.transport.subscriber import (
    EventIndex,
    KvEventSubscriber,
    SubscriberStats,
    WorkerEndpoint,
)

__all__ = ["SubscriberFeeds"]


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
