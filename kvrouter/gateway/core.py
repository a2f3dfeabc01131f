"""What the gateway needs from the routing layer, as one small interface.

:class:`RoutingCore` is the seam between the HTTP side and the pure routing code: the
gateway hands it a prepared prompt (token ids and hashes, computed once) and the
workers in rotation, and gets back a :class:`RouteResult`. The real implementation,
:class:`kvrouter.gateway.kvcore.KvRoutingCore`, wraps ``KvIndexer`` +
``KvMetricsAggregator`` + ``KvScheduler``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvrouter.errors import RouterError
from kvrouter.events.model import WorkerKey
from kvrouter.gateway.overrides import RoutingOverrides
from kvrouter.gateway.prompts import PreparedPrompt
from kvrouter.index import IndexerStats
from kvrouter.load.aggregator import AggregatorStats
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.routing import Decision, SchedulerStats
from kvrouter.routing.queue import QueueStats

__all__ = ["CoreStats", "RouteResult", "RoutingCore"]


@dataclass(frozen=True, slots=True)
class RouteResult:
    """Where a request goes and why.

    ``decision`` is the scheduler's full decision; its per-candidate explanation is
    only formatted when someone asks (``explanation``), not on the request path.
    """

    worker: WorkerKey
    policy: str
    overlap_blocks: int
    request_blocks: int
    decision: Decision | None = None

    @property
    def explanation(self) -> tuple[str, ...]:
        """One line per candidate, e.g. ``Worker 2: 50% cache hit, ... (Selected)``."""
        return tuple(self.decision.explain()) if self.decision is not None else ()


@dataclass(frozen=True, slots=True)
class CoreStats:
    """What ``/metrics`` reads from the routing side at scrape time (frozen values of
    the scheduler, the indexer, the aggregator and the event feeds)."""

    scheduler: SchedulerStats
    index: IndexerStats | None
    aggregator: AggregatorStats | None
    index_size: dict[WorkerKey, int]
    predicted_active_blocks: dict[WorkerKey, int]
    predicted_prefill_tokens: dict[WorkerKey, int]
    metrics_age_s: dict[WorkerKey, float]
    events_applied: int
    event_errors: dict[str, int]
    queue: QueueStats | None = None
    # per worker: its events the index refused, and why the latest one was
    event_rejections: dict[WorkerKey, tuple[int, str | None]] = field(default_factory=dict)


class RoutingCore(Protocol):
    """Routing as the gateway sees it (pure, synchronous, fast)."""

    @property
    def block_size(self) -> int: ...

    def route(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        *,
        worker: WorkerKey | None = None,
        exclude: frozenset[WorkerKey] = frozenset(),
    ) -> RouteResult:
        """Choose a worker in rotation (``worker``: that one) and book the request.

        ``exclude``: workers that already failed this request; they are skipped for it
        but stay in rotation. Raises ``NoWorkerAvailable`` / ``AllWorkersBusy`` when
        none can take it.
        """
        ...

    @property
    def queue_enabled(self) -> bool:
        """Whether requests go through a router queue (:meth:`submit`)."""
        ...

    def submit(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        deliver: Callable[[RouteResult | RouterError], None],
    ) -> None:
        """Queue the request until some worker has room; ``deliver`` gets its route (it is
        then booked) or the error routing it raised. Raises ``AllWorkersBusy`` when the
        queue is full."""
        ...

    def cancel(self, request_id: str) -> bool:
        """Take a request that is still queued out of the queue."""
        ...

    def poll(self) -> None:
        """Housekeeping on a timer while requests are queued: route those that fit now."""
        ...

    def preview(
        self,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        *,
        worker: WorkerKey | None = None,
    ) -> RouteResult:
        """The decision :meth:`route` would make now, with no side effect on the state."""
        ...

    def on_first_token(self, request_id: str) -> None:
        """The request's first byte arrived: its prefill is done."""
        ...

    def on_finish(self, request_id: str, *, failed: bool = False) -> None:
        """The request ended (completion, error, disconnect, timeout); free its booking.
        ``failed``: the worker failed it before answering (its predictions go too)."""
        ...

    def add_worker(self, worker: WorkerKey, *, publishes_events: bool = True) -> None:
        """A worker joined (or rejoined) the rotation; ``publishes_events=False``: its
        cache is known only from predictions (approximate mode)."""
        ...

    def remove_worker(self, worker: WorkerKey) -> None:
        """A worker left the rotation: forget its blocks, bookings and metrics."""
        ...

    def update_metrics(self, metrics: ForwardPassMetrics) -> None:
        """Metrics a worker pushed (its ``worker_id`` / ``data_parallel_rank`` say whose)."""
        ...

    def update_metrics_text(
        self, worker: WorkerKey, text: str, *, engine_rank: int | None = None
    ) -> bool:
        """A scraped Prometheus page of ``worker``; ``False`` if nothing was recognised.
        ``engine_rank``: read only that data-parallel rank's series of a multi-rank page
        (``None``: the whole page is this worker's)."""
        ...

    def stats(self) -> CoreStats: ...

    def debug_state(self) -> dict[str, Any]:
        """A JSON-friendly summary for the dashboard."""
        ...
