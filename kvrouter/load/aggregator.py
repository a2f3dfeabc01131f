"""The router's view of every worker's load: latest metrics, with freshness.

Pure state: whoever owns the network (the gateway) calls :meth:`KvMetricsAggregator.update`
with pushed :class:`ForwardPassMetrics` or :meth:`KvMetricsAggregator.update_from_prometheus`
with a scraped ``/metrics`` page. Nothing here reads the wall clock; a clock is injected.

**Load** of an endpoint is its KV-cache usage, a fraction in 0..1
(``gpu_cache_usage_perc``; when an engine reports only block counts, active / total).
KV usage is what limits how many more requests an engine can batch, and it is what every
engine reports.

**Staleness.** An endpoint whose last report is older than ``stale_after_s`` is marked
``stale``. Its last values stay visible (for dashboards) but are not trusted as if fresh:
it is left out of ``load_avg`` / ``load_std``, and :meth:`AggregatedMetrics.get_worker_load`
reports it as at least as loaded as the average fresh endpoint, so a worker that stopped
reporting while idle does not attract all the traffic.

>>> from kvrouter.clock import ManualClock
>>> clock = ManualClock()
>>> agg = KvMetricsAggregator(clock=clock, stale_after_s=5.0)
>>> agg.update(ForwardPassMetrics(worker_id=1, gpu_cache_usage_perc=0.25))
>>> agg.get_worker_load(1)
0.25
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kvrouter.clock import Clock, monotonic
from kvrouter.events.model import WorkerKey
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.load.prometheus import EngineSnapshot, parse_engine_metrics

__all__ = [
    "AggregatedMetrics",
    "AggregatorStats",
    "EndpointMetrics",
    "KvMetricsAggregator",
    "MetricsSource",
]

logger = logging.getLogger(__name__)

SOURCE_PUSH = "push"
DEFAULT_STALE_AFTER_S = 10.0


class MetricsSource(Protocol):
    """Anything that pushes :class:`ForwardPassMetrics` to registered callbacks."""

    def add_listener(self, callback: Callable[[ForwardPassMetrics], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """The latest metrics of one endpoint (a worker and its data-parallel rank)."""

    worker_id: int
    dp_rank: int
    request_active_slots: int
    request_total_slots: int
    num_requests_waiting: int
    kv_active_blocks: int
    kv_total_blocks: int
    gpu_cache_usage_perc: float
    gpu_prefix_cache_hit_rate: float
    age_s: float
    stale: bool
    source: str  # "push", "prometheus:vllm" or "prometheus:sglang"

    @property
    def worker(self) -> WorkerKey:
        return WorkerKey(self.worker_id, self.dp_rank)

    @property
    def load(self) -> float:
        """KV usage as reported (0..1); see the module docstring for stale endpoints."""
        return self.gpu_cache_usage_perc


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return mean, math.sqrt(var)


@dataclass(frozen=True, slots=True)
class AggregatedMetrics:
    """Every endpoint's latest metrics at one moment; ``load_*`` over fresh endpoints only."""

    endpoints: tuple[EndpointMetrics, ...]
    load_avg: float
    load_std: float

    @classmethod
    def from_endpoints(cls, endpoints: Iterable[EndpointMetrics]) -> AggregatedMetrics:
        items = tuple(sorted(endpoints, key=lambda e: (e.worker_id, e.dp_rank)))
        mean, std = _mean_std([e.load for e in items if not e.stale])
        return cls(items, mean, std)

    def get(self, worker: WorkerKey) -> EndpointMetrics | None:
        """The endpoint of ``worker`` or ``None``."""
        for endpoint in self.endpoints:
            if endpoint.worker == worker:
                return endpoint
        return None

    def endpoint_load(self, endpoint: EndpointMetrics) -> float:
        """The load to act on: the reported one, or at least ``load_avg`` when stale."""
        if endpoint.stale:
            return max(endpoint.load, self.load_avg)
        return endpoint.load

    def get_worker_load(self, worker_id: int, dp_rank: int | None = None) -> float:
        """Load (KV usage, 0..1) of ``worker_id``: the mean over its data-parallel ranks
        (or of one rank). A worker with no metrics counts as average (``load_avg``)."""
        loads = [
            self.endpoint_load(e)
            for e in self.endpoints
            if e.worker_id == worker_id and (dp_rank is None or e.dp_rank == dp_rank)
        ]
        if not loads:
            return self.load_avg
        return math.fsum(loads) / len(loads)


@dataclass(frozen=True, slots=True)
class AggregatorStats:
    num_endpoints: int
    num_stale: int
    num_pushed: int
    num_scrapes: int
    num_unrecognised_scrapes: int
    num_malformed_lines: int


@dataclass(slots=True)
class _Entry:
    """Mutable latest state of one endpoint."""

    metrics: ForwardPassMetrics
    updated_s: float
    source: str
    # vLLM prefix-cache counters of the previous scrape, for the hit-rate delta.
    prev_queries: float | None = None
    prev_hits: float | None = None


def _hit_rate_from_counters(
    prev: _Entry | None, queries: float | None, hits: float | None
) -> float | None:
    if queries is None or hits is None:
        return None
    if prev is None or prev.prev_queries is None or prev.prev_hits is None:
        # First scrape: the lifetime ratio is the best estimate there is.
        return hits / queries if queries > 0 else None
    d_queries = queries - prev.prev_queries
    d_hits = hits - prev.prev_hits
    if d_queries < 0 or d_hits < 0:
        # Counters went down: the engine restarted; everything since is the delta.
        d_queries, d_hits = queries, hits
    if d_queries <= 0:
        return None  # no new queries: keep the previous rate
    return min(1.0, max(0.0, d_hits / d_queries))


class KvMetricsAggregator:
    """Latest metrics of every endpoint, with freshness; see the module docstring.

    ``source``, when given, is any object with ``add_listener(callback)``; the aggregator
    registers :meth:`update` with it.
    """

    def __init__(
        self,
        source: MetricsSource | None = None,
        *,
        clock: Clock = monotonic,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, got {stale_after_s}")
        self._clock = clock
        self._stale_after_s = stale_after_s
        self._entries: dict[WorkerKey, _Entry] = {}
        self._num_pushed = 0
        self._num_scrapes = 0
        self._num_unrecognised = 0
        self._num_malformed = 0
        self._version = 0
        if source is not None:
            source.add_listener(self.update)

    @property
    def stale_after_s(self) -> float:
        return self._stale_after_s

    @property
    def version(self) -> int:
        """Changes whenever an endpoint is updated or removed (readers cache on it)."""
        return self._version

    def update(self, metrics: ForwardPassMetrics) -> None:
        """Record pushed metrics of ``(metrics.worker_id, metrics.data_parallel_rank)``."""
        key = WorkerKey(metrics.worker_id, metrics.data_parallel_rank)
        self._entries[key] = _Entry(metrics, self._clock(), SOURCE_PUSH)
        self._num_pushed += 1
        self._version += 1

    def update_from_prometheus(
        self, worker_id: int, text: str, dp_rank: int = 0, *, engine_rank: int | None = None
    ) -> bool:
        """Record a scraped ``/metrics`` page; ``False`` if it had no known series.

        Malformed lines are skipped and counted in :meth:`stats`. ``engine_rank``: the
        page is a server of several data-parallel ranks and this worker is that one (see
        :func:`~kvrouter.load.prometheus.parse_engine_metrics`); ``None``: all of it.
        """
        snap = parse_engine_metrics(text, engine_rank)
        self._num_scrapes += 1
        self._num_malformed += snap.num_malformed
        if snap.num_malformed:
            logger.warning(
                "worker %d dp %d: skipped %d malformed metrics lines",
                worker_id,
                dp_rank,
                snap.num_malformed,
            )
        if snap.engine is None:
            self._num_unrecognised += 1
            logger.warning("worker %d dp %d: no vLLM or SGLang metrics found", worker_id, dp_rank)
            return False
        key = WorkerKey(worker_id, dp_rank)
        self._entries[key] = self._entry_from_snapshot(key, snap, self._entries.get(key))
        self._version += 1
        return True

    def _entry_from_snapshot(
        self, key: WorkerKey, snap: EngineSnapshot, prev: _Entry | None
    ) -> _Entry:
        old = prev.metrics if prev is not None else None
        hit_rate = snap.cache_hit_rate
        if hit_rate is None:
            hit_rate = _hit_rate_from_counters(
                prev, snap.prefix_cache_queries, snap.prefix_cache_hits
            )
        if hit_rate is None:
            hit_rate = old.gpu_prefix_cache_hit_rate if old is not None else 0.0
        usage = snap.kv_usage if snap.kv_usage is not None else 0.0
        total_blocks = snap.kv_total_blocks or 0
        metrics = ForwardPassMetrics(
            worker_id=key.worker_id,
            request_active_slots=snap.num_requests_running or 0,
            # Engines do not export max_num_seqs on /metrics; keep what a push said.
            request_total_slots=old.request_total_slots if old is not None else 0,
            num_requests_waiting=snap.num_requests_waiting or 0,
            kv_active_blocks=round(usage * total_blocks),
            kv_total_blocks=total_blocks,
            gpu_cache_usage_perc=usage,
            gpu_prefix_cache_hit_rate=hit_rate,
            data_parallel_rank=key.dp_rank,
        )
        entry = _Entry(metrics, self._clock(), f"prometheus:{snap.engine}")
        if snap.prefix_cache_queries is not None and snap.prefix_cache_hits is not None:
            entry.prev_queries = snap.prefix_cache_queries
            entry.prev_hits = snap.prefix_cache_hits
        return entry

    def remove_worker(self, worker_id: int, dp_rank: int | None = None) -> int:
        """Forget a worker (every rank, or one); returns how many endpoints were dropped."""
        keys = [
            k
            for k in self._entries
            if k.worker_id == worker_id and (dp_rank is None or k.dp_rank == dp_rank)
        ]
        for key in keys:
            del self._entries[key]
            self._version += 1
        return len(keys)

    def _endpoint(self, key: WorkerKey, entry: _Entry, now: float) -> EndpointMetrics:
        m = entry.metrics
        age_s = max(0.0, now - entry.updated_s)
        usage = m.gpu_cache_usage_perc
        if usage == 0.0 and m.kv_total_blocks > 0:
            usage = m.kv_active_blocks / m.kv_total_blocks
        return EndpointMetrics(
            worker_id=key.worker_id,
            dp_rank=key.dp_rank,
            request_active_slots=m.request_active_slots,
            request_total_slots=m.request_total_slots,
            num_requests_waiting=m.num_requests_waiting,
            kv_active_blocks=m.kv_active_blocks,
            kv_total_blocks=m.kv_total_blocks,
            gpu_cache_usage_perc=usage,
            gpu_prefix_cache_hit_rate=m.gpu_prefix_cache_hit_rate,
            age_s=age_s,
            stale=age_s > self._stale_after_s,
            source=entry.source,
        )

    def get_endpoint(self, worker: WorkerKey) -> EndpointMetrics | None:
        """The latest metrics of one endpoint, or ``None`` if it never reported."""
        entry = self._entries.get(worker)
        return None if entry is None else self._endpoint(worker, entry, self._clock())

    def get_metrics(self) -> AggregatedMetrics:
        """Every endpoint's latest metrics, with age and staleness as of now."""
        now = self._clock()
        return AggregatedMetrics.from_endpoints(
            self._endpoint(key, entry, now) for key, entry in self._entries.items()
        )

    def get_worker_load(self, worker_id: int, dp_rank: int | None = None) -> float:
        """Shortcut for ``get_metrics().get_worker_load(worker_id, dp_rank)``."""
        return self.get_metrics().get_worker_load(worker_id, dp_rank)

    def stats(self) -> AggregatorStats:
        metrics = self.get_metrics()
        return AggregatorStats(
            num_endpoints=len(metrics.endpoints),
            num_stale=sum(1 for e in metrics.endpoints if e.stale),
            num_pushed=self._num_pushed,
            num_scrapes=self._num_scrapes,
            num_unrecognised_scrapes=self._num_unrecognised,
            num_malformed_lines=self._num_malformed,
        )
