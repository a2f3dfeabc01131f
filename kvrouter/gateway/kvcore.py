"""The real :class:`~kvrouter.gateway.core.RoutingCore`: indexer + aggregator + scheduler.

The scheduler's worker set mirrors the gateway's rotation: a worker is added when it
joins and removed (with its index entries, bookings and metrics) when it leaves.

``/debug/explain`` routes a prompt without sending it: :meth:`KvScheduler.preview`
makes the decision ``schedule()`` would make, without booking it, recording predicted
cache entries or counting it, so the live state is left as it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kvrouter.clock import Clock, monotonic
from kvrouter.errors import NoWorkerAvailable, RouterError
from kvrouter.events.model import WorkerKey
from kvrouter.gateway.config import GatewayConfig
from kvrouter.gateway.core import CoreStats, RouteResult
from kvrouter.gateway.overrides import RoutingOverrides
from kvrouter.gateway.prompts import PreparedPrompt
from kvrouter.index import KvIndexer
from kvrouter.load.aggregator import EndpointMetrics, KvMetricsAggregator
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.routing import (
    BusyThresholds,
    Decision,
    KvScheduler,
    Policy,
    ScheduleRequest,
    make_policy,
)
from kvrouter.routing import RoutingOverrides as PolicyOverrides
from kvrouter.routing.queue import QueueConfig, QueueStats, RouterQueue

Deliver = Callable[[RouteResult | RouterError], None]

__all__ = ["KvRoutingCore", "build_policy"]


def build_policy(cfg: GatewayConfig) -> Policy:
    """The gateway's policy: ``router_policy`` when set (a name or ``pkg.mod:func``),
    else ``router_mode``, with the configured weights where the policy takes them."""
    name = cfg.router_policy or cfg.router_mode
    if ":" in name:
        return make_policy(name)
    params: dict[str, Any] = {}
    if name == "kv":
        params = {"overlap_weight": cfg.overlap_weight, "temperature": cfg.temperature}
    elif name == "score":
        params = {"weight_cache": cfg.weight_cache, "weight_load": cfg.weight_load}
    elif name == "prefix_affinity":
        params = {"cache_weight": cfg.cache_weight}
    return make_policy(name, **params)


class KvRoutingCore:
    """Routing for the gateway; see the module docstring."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        indexer: KvIndexer | None = None,
        aggregator: KvMetricsAggregator | None = None,
        clock: Clock = monotonic,
    ) -> None:
        self._clock = clock
        self.indexer = indexer or KvIndexer(
            block_size=cfg.block_size, clock=clock, predicted_ttl_s=cfg.predicted_ttl_s
        )
        self.aggregator = aggregator or KvMetricsAggregator(
            clock=clock, stale_after_s=max(5.0, 5 * cfg.metrics_scrape_interval_s)
        )
        busy = BusyThresholds(
            max_kv_usage=cfg.busy_kv_usage,
            max_waiting_requests=cfg.busy_queue_depth,
            retry_after_s=cfg.retry_after_s,
        )
        policy = build_policy(cfg)
        self.scheduler = KvScheduler(
            self.indexer,
            self.aggregator,
            policy=policy,
            block_size=cfg.block_size,
            clock=clock,
            busy=busy,
            predicted_ttl_s=cfg.predicted_ttl_s,
            request_expiry_s=cfg.request_timeout_s * 2,
            timer=time.perf_counter,
        )
        self.event_feed_stats: dict[str, int] = {}
        self.queue: RouterQueue[Deliver] | None = None
        if cfg.router_queue_threshold is not None:
            config = QueueConfig.scaled(
                cfg.router_queue_threshold,
                cfg.max_num_batched_tokens,
                cfg.router_queue_policy,
                cfg.router_queue_max_pending,
            )
            self.queue = RouterQueue(self.scheduler, config)

    @property
    def block_size(self) -> int:
        return self.scheduler.block_size

    # -- routing -------------------------------------------------------------------------
    def route(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        *,
        worker: WorkerKey | None = None,
        exclude: frozenset[WorkerKey] = frozenset(),
    ) -> RouteResult:
        """Schedule and book among the workers in rotation (``worker``: that one)."""
        request = self._request(request_id, prompt, overrides, worker, exclude)
        return _result(self.scheduler.schedule(request))

    @property
    def queue_enabled(self) -> bool:
        return self.queue is not None

    def submit(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        deliver: Deliver,
    ) -> None:
        """Route through the router queue: ``deliver`` gets the result (or the routing
        error) once the request is routed, possibly before this returns.

        Raises ``AllWorkersBusy`` when the queue is full. Without a queue, routes now.
        """
        request = self._request(request_id, prompt, overrides, None, frozenset())
        if self.queue is None:
            deliver(_result(self.scheduler.schedule(request)))
            return
        self.queue.submit(request, deliver)
        self._dispatch()

    def cancel(self, request_id: str) -> bool:
        """Take a request out of the router queue (its client left or gave up);
        ``False`` if it is not waiting there."""
        return self.queue is not None and self.queue.cancel(request_id) is not None

    def poll(self) -> None:
        """Route queued requests that fit now: bookings can also free room by expiring
        (``request_expiry_s``), which no event announces."""
        self._dispatch()

    def queue_stats(self) -> QueueStats | None:
        return None if self.queue is None else self.queue.stats()

    def _dispatch(self) -> None:
        queue = self.queue
        if queue is None or not len(queue):
            return
        for deliver, outcome in queue.dispatch():
            deliver(_result(outcome) if isinstance(outcome, Decision) else outcome)

    def preview(
        self,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        *,
        worker: WorkerKey | None = None,
    ) -> RouteResult:
        """The decision :meth:`route` would make now; nothing is booked or counted."""
        request = self._request("explain", prompt, overrides, worker, frozenset())
        return _result(self.scheduler.preview(request))

    def _request(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        overrides: RoutingOverrides,
        worker: WorkerKey | None,
        exclude: frozenset[WorkerKey],
    ) -> ScheduleRequest:
        if not self.scheduler.workers:
            raise NoWorkerAvailable("no worker is available")
        params = overrides.policy_params() if not overrides.is_empty else None
        return ScheduleRequest(
            request_id=request_id,
            local_hashes=prompt.local_hashes,
            seq_hashes=prompt.sequence_hashes,
            num_tokens=prompt.num_tokens,
            overrides=PolicyOverrides(**params) if params else None,
            worker=worker,
            exclude=exclude,
            num_sequences=prompt.num_sequences,
        )

    def on_first_token(self, request_id: str) -> None:
        if self.scheduler.on_first_token(request_id):
            self._dispatch()  # its prefill no longer counts: room for a queued request

    def on_finish(self, request_id: str, *, failed: bool = False) -> None:
        if self.scheduler.on_finish(request_id, failed=failed):
            self._dispatch()

    # -- workers ---------------------------------------------------------------------------
    def add_worker(self, worker: WorkerKey, *, publishes_events: bool = True) -> None:
        self.scheduler.add_worker(worker, publishes_events=publishes_events)
        self._dispatch()

    def remove_worker(self, worker: WorkerKey) -> None:
        # The scheduler also drops the worker's index entries and metrics.
        self.scheduler.remove_worker(worker.worker_id, worker.dp_rank)
        self._dispatch()

    def update_metrics(self, metrics: ForwardPassMetrics) -> None:
        self.aggregator.update(metrics)

    def update_metrics_text(
        self, worker: WorkerKey, text: str, *, engine_rank: int | None = None
    ) -> bool:
        return self.aggregator.update_from_prometheus(
            worker.worker_id, text, worker.dp_rank, engine_rank=engine_rank
        )

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> CoreStats:
        sched = self.scheduler.stats()
        index = self.indexer.stats()
        workers = self.scheduler.workers
        endpoints = self.aggregator.get_metrics().endpoints
        active = self.scheduler.active
        return CoreStats(
            scheduler=sched,
            index=index,
            aggregator=self.aggregator.stats(),
            index_size={w: self.indexer.tree_size(w) for w in workers},
            predicted_active_blocks={w: active.active_blocks(w) for w in workers},
            predicted_prefill_tokens={w: active.prefill_tokens(w) for w in workers},
            metrics_age_s={e.worker: e.age_s for e in endpoints},
            events_applied=index.events_applied,
            event_errors={**dict(index.rejected), **self.event_feed_stats},
            queue=self.queue_stats(),
            event_rejections={w: self.indexer.rejections(w) for w in workers},
        )

    def debug_state(self) -> dict[str, Any]:
        stats = self.stats()
        sched = stats.scheduler
        endpoints = {e.worker: e for e in self.aggregator.get_metrics().endpoints}
        return {
            "policy": self.scheduler.policy.name,
            "block_size": self.block_size,
            "index_blocks": stats.index.num_blocks if stats.index else 0,
            "decisions": sched.num_decisions,
            "overlap_blocks_total": sched.overlap_blocks_total,
            "prompt_blocks_total": sched.prompt_blocks_total,
            "workers": {
                str(w.worker_id): _worker_state(w, stats, endpoints.get(w), self.aggregator)
                for w in self.scheduler.workers
            },
        }


def _worker_state(
    w: WorkerKey, stats: CoreStats, endpoint: EndpointMetrics | None, agg: KvMetricsAggregator
) -> dict[str, Any]:
    return {
        "index_size": stats.index_size.get(w, 0),
        "active_blocks": stats.predicted_active_blocks.get(w, 0),
        "prefill_tokens": stats.predicted_prefill_tokens.get(w, 0),
        "metrics_age_s": stats.metrics_age_s.get(w),
        "load": agg.get_worker_load(w.worker_id, w.dp_rank),
        "kv_usage": endpoint.gpu_cache_usage_perc if endpoint is not None else None,
        "prefix_hit_rate": endpoint.gpu_prefix_cache_hit_rate if endpoint is not None else None,
        "waiting": endpoint.num_requests_waiting if endpoint is not None else None,
        "decisions": stats.scheduler.decisions_by_worker.get(w, 0),
    }


def _result(decision: Decision) -> RouteResult:
    return RouteResult(
        worker=decision.worker,
        policy=decision.policy,
        overlap_blocks=decision.overlap_blocks,
        request_blocks=decision.num_blocks,
        decision=decision,
    )
