"""The real :class:`~kvrouter.gateway.core.RoutingCore`: indexer + aggregator + scheduler.

The scheduler's worker set mirrors the gateway's rotation: a worker is added when it
joins and removed (with its index entries, bookings and metrics) when it leaves.

``/debug/explain`` routes a prompt without sending it: a second scheduler shares the
indexer, the aggregator and the live active-sequence table, does not record predicted
cache entries, and frees its booking at once, so the live state is left as it was.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from kvrouter.clock import Clock, monotonic
from kvrouter.errors import NoWorkerAvailable
from kvrouter.events.model import WorkerKey
from kvrouter.gateway.config import GatewayConfig
from kvrouter.gateway.core import CoreStats, RouteResult
from kvrouter.gateway.overrides import RoutingOverrides
from kvrouter.gateway.prompts import PreparedPrompt
from kvrouter.index import KvIndexer
from kvrouter.load.aggregator import KvMetricsAggregator
from kvrouter.routing import (
    BusyThresholds,
    Decision,
    KvScheduler,
    Policy,
    ScheduleRequest,
    make_policy,
)
from kvrouter.routing import RoutingOverrides as PolicyOverrides

__all__ = ["KvRoutingCore", "build_policy"]

_explain_ids = itertools.count()


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
        self._explainer = KvScheduler(
            self.indexer,
            self.aggregator,
            policy=policy,
            block_size=cfg.block_size,
            clock=clock,
            busy=busy,
            predict_cache=False,
            timer=time.perf_counter,
        )
        # Shared on purpose: an explanation must see the live router-side load.
        self._explainer.active = self.scheduler.active
        self.event_feed_stats: dict[str, int] = {}

    @property
    def block_size(self) -> int:
        return self.scheduler.block_size

    # -- routing -------------------------------------------------------------------------
    def route(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        candidates: Sequence[WorkerKey],
        overrides: RoutingOverrides,
        *,
        book: bool = True,
    ) -> RouteResult:
        """Schedule among the workers in rotation; ``candidates`` of one worker pins it."""
        if not candidates:
            raise NoWorkerAvailable("no worker is available")
        target = candidates[0] if overrides.worker_id is not None else None
        params = overrides.policy_params()
        request = ScheduleRequest(
            request_id=request_id if book else f"explain-{next(_explain_ids)}",
            local_hashes=prompt.local_hashes,
            seq_hashes=prompt.sequence_hashes,
            num_tokens=len(prompt.token_ids),
            overrides=PolicyOverrides(**params) if params else None,
            worker=target,
        )
        scheduler = self.scheduler if book else self._explainer
        decision = scheduler.schedule(request)
        if not book:
            self._explainer.on_finish(request.request_id)
        return _result(decision)

    def on_first_token(self, request_id: str) -> None:
        self.scheduler.on_first_token(request_id)

    def on_finish(self, request_id: str) -> None:
        self.scheduler.on_finish(request_id)

    # -- workers ---------------------------------------------------------------------------
    def add_worker(self, worker: WorkerKey) -> None:
        self.scheduler.add_worker(worker)
        self._explainer.add_worker(worker)

    def remove_worker(self, worker: WorkerKey) -> None:
        # The scheduler also drops the worker's index entries and metrics.
        self.scheduler.remove_worker(worker.worker_id, worker.dp_rank)
        self._explainer.remove_worker(worker.worker_id, worker.dp_rank)

    def update_metrics_text(self, worker: WorkerKey, text: str) -> bool:
        return self.aggregator.update_from_prometheus(worker.worker_id, text, worker.dp_rank)

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
        )

    def debug_state(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            "policy": self.scheduler.policy.name,
            "block_size": self.block_size,
            "index_blocks": stats.index.num_blocks if stats.index else 0,
            "decisions": stats.scheduler.num_decisions,
            "workers": {
                str(w.worker_id): {
                    "index_size": stats.index_size.get(w, 0),
                    "active_blocks": stats.predicted_active_blocks.get(w, 0),
                    "prefill_tokens": stats.predicted_prefill_tokens.get(w, 0),
                    "metrics_age_s": stats.metrics_age_s.get(w),
                    "load": self.aggregator.get_worker_load(w.worker_id, w.dp_rank),
                }
                for w in self.scheduler.workers
            },
        }


def _result(decision: Decision) -> RouteResult:
    return RouteResult(
        worker=decision.worker,
        policy=decision.policy,
        overlap_blocks=decision.overlap_blocks,
        request_blocks=decision.num_blocks,
        explanation=tuple(decision.explain()),
    )
