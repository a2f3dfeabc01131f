"""The router's ``/metrics``: a Prometheus collector built from ``stats()`` at scrape time.

No component creates metric objects; :class:`GatewayCollector` reads the frozen stats of
the gateway, the scheduler, the indexer, the aggregator and the event feeds each time
Prometheus scrapes, and yields metric families from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from kvrouter.events.model import WorkerKey
from kvrouter.gateway.core import CoreStats
from kvrouter.gateway.registry import WorkerInfo
from kvrouter.gateway.stats import GatewayStats
from kvrouter.routing.stats import Histogram
from kvrouter.transport.subscriber import SubscriberStats

__all__ = ["CONTENT_TYPE", "GatewayCollector", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_P = "kvrouter_"


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    buckets = [
        ("+Inf" if bound == float("inf") else repr(float(bound)), float(count))
        for bound, count in hist.cumulative()
    ]
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], buckets, sum_value=hist.total)
    return family


def _worker_labels(key: WorkerKey) -> list[str]:
    return [str(key.worker_id), str(key.dp_rank)]


class GatewayCollector:
    """Yields every router metric from the sources' current ``stats()``."""

    def __init__(
        self,
        gateway_stats: Callable[[], GatewayStats],
        core_stats: Callable[[], CoreStats],
        workers: Callable[[], list[WorkerInfo]],
        feed_stats: Callable[[], SubscriberStats | None] = lambda: None,
    ) -> None:
        self._gateway_stats = gateway_stats
        self._core_stats = core_stats
        self._workers = workers
        self._feed_stats = feed_stats

    def collect(self) -> Iterator[Metric]:
        yield from self._gateway(self._gateway_stats())
        yield from self._core(self._core_stats())
        yield from self._worker_health(self._workers())
        yield from self._events(self._core_stats(), self._feed_stats())

    def _gateway(self, stats: GatewayStats) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            _P + "requests",
            "HTTP requests answered, by route and status",
            labels=["route", "status"],
        )
        for (route, status), n in sorted(stats.num_requests.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        yield GaugeMetricFamily(
            _P + "requests_in_flight", "Requests being proxied now", value=stats.num_in_flight
        )
        yield CounterMetricFamily(
            _P + "retries", "Requests retried on another worker", value=stats.num_retries
        )
        upstream = CounterMetricFamily(
            _P + "upstream_errors", "Worker failures seen by the gateway", labels=["kind"]
        )
        for kind, n in sorted(stats.num_upstream_errors.items()):
            upstream.add_metric([kind], n)
        yield upstream
        yield CounterMetricFamily(
            _P + "batch_prompts",
            "Prompts of batch completions, each routed as a request of its own",
            value=stats.num_batch_prompts,
        )
        yield CounterMetricFamily(
            _P + "client_disconnects",
            "Requests whose client went away before the end",
            value=stats.num_disconnects,
        )
        decisions = CounterMetricFamily(
            _P + "decisions", "Routing decisions by policy and worker", labels=["policy", "worker"]
        )
        for (policy, worker), n in sorted(stats.num_decisions.items()):
            decisions.add_metric([policy, str(worker)], n)
        yield decisions

    def _core(self, stats: CoreStats) -> Iterator[Metric]:
        sched = stats.scheduler
        yield _histogram(
            _P + "decision_overlap_ratio",
            "Cached prefix blocks / prompt blocks on the chosen worker",
            sched.overlap_ratio,
        )
        yield _histogram(
            _P + "decision_latency_seconds", "Time to choose a worker", sched.decision_latency_s
        )
        yield CounterMetricFamily(
            _P + "short_prompts",
            "Prompts shorter than one block (routed by load alone)",
            value=sched.num_short_prompts,
        )
        yield CounterMetricFamily(
            _P + "busy_rejects",
            "Requests refused because every worker was busy",
            value=sched.num_busy_rejects,
        )
        if stats.queue is not None:
            queue = stats.queue
            yield GaugeMetricFamily(
                _P + "router_queue_pending",
                "Requests waiting in the router queue now",
                value=queue.pending,
            )
            for name, text, count in (
                ("queued", "Requests that waited in the router queue", queue.num_queued),
                ("cancelled", "Requests that left the router queue unrouted", queue.num_cancelled),
                (
                    "refused",
                    "Requests refused because the router queue was full",
                    queue.num_refused,
                ),
            ):
                yield CounterMetricFamily(_P + "router_queue_" + name, text, value=count)
        labels = ["worker", "dp_rank"]
        gauges = (
            ("index_blocks", "Blocks the index holds for each worker", stats.index_size),
            (
                "predicted_active_blocks",
                "Router-side active KV blocks of each worker",
                stats.predicted_active_blocks,
            ),
            (
                "predicted_prefill_tokens",
                "Router-side queued prefill tokens of each worker",
                stats.predicted_prefill_tokens,
            ),
            (
                "worker_metrics_age_seconds",
                "Age of each worker's latest load metrics",
                stats.metrics_age_s,
            ),
        )
        for name, doc, values in gauges:
            family = GaugeMetricFamily(_P + name, doc, labels=labels)
            for key, value in sorted(values.items()):
                family.add_metric(_worker_labels(key), value)
            yield family
        if stats.index is not None:
            index = stats.index
            yield GaugeMetricFamily(
                _P + "index_size_blocks", "Distinct blocks in the index", value=index.num_blocks
            )
            yield GaugeMetricFamily(
                _P + "index_predicted_entries",
                "Predicted (worker, block) cache entries alive now",
                value=index.num_predicted,
            )
            predicted = CounterMetricFamily(
                _P + "index_predictions",
                "Predicted cache entries by what became of them: added, superseded by a "
                "KV event, expired, pruned, withdrawn after a failed request",
                labels=["outcome"],
            )
            for outcome, count in (
                ("added", index.predicted_added),
                ("superseded", index.predicted_superseded),
                ("expired", index.predicted_expired),
                ("pruned", index.predicted_pruned),
                ("withdrawn", index.predicted_withdrawn),
            ):
                predicted.add_metric([outcome], count)
            yield predicted

    def _worker_health(self, workers: list[WorkerInfo]) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            _P + "worker_healthy", "1 when the worker is in rotation", labels=["worker", "url"]
        )
        for info in workers:
            family.add_metric([str(info.worker_id), info.url], 1.0 if info.healthy else 0.0)
        yield family

    def _events(self, core: CoreStats, feeds: SubscriberStats | None) -> Iterator[Metric]:
        yield CounterMetricFamily(
            _P + "kv_events_applied", "KV events applied to the index", value=core.events_applied
        )
        errors = CounterMetricFamily(
            _P + "kv_event_errors", "KV events rejected or undecodable, by kind", labels=["kind"]
        )
        merged = dict(core.event_errors)
        if feeds is not None:
            for stream in feeds.streams:
                for kind, n in stream.decode_errors.items():
                    merged[kind] = merged.get(kind, 0) + n
            merged["gap"] = merged.get("gap", 0) + feeds.num_gaps
        for kind, n in sorted(merged.items()):
            errors.add_metric([kind], n)
        yield errors
        yield CounterMetricFamily(
            _P + "kv_events_skipped",
            "KV events of cache groups the index does not follow (hybrid models' "
            "sliding-window and Mamba groups)",
            value=feeds.num_skipped_events if feeds is not None else 0,
        )


def render_metrics(collector: GatewayCollector) -> bytes:
    """The Prometheus text page of ``collector`` (a registry of its own, no globals)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    output: bytes = generate_latest(registry)
    return output
