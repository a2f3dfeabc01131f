"""The scheduler: the mechanism around a routing policy.

For each request :meth:`KvScheduler.schedule`

1. hashes the prompt once (unless the caller already did),
2. asks the indexer which workers hold how much of its prefix,
3. builds a :class:`WorkerView` per registered worker (router-side active load from
   :class:`ActiveSequences`, engine metrics from the aggregator),
4. drops busy workers (KV usage, queued prefill tokens, waiting requests over a
   threshold); none left: :class:`~kvrouter.errors.AllWorkersBusy`,
5. runs the policy, and
6. books the decision: the request's load goes to :class:`ActiveSequences`, and its
   blocks become *predicted* entries of the chosen worker in the indexer, so the next
   request with the same new prefix sees it there before the engine's KV events arrive.

The caller then reports :meth:`on_first_token` (prefill done) and, always, exactly once
or more, :meth:`on_finish` (completion, error, disconnect, timeout).

>>> from kvrouter.clock import ManualClock
>>> sched = KvScheduler(None, policy="round_robin", block_size=4, clock=ManualClock())
>>> sched.add_worker(WorkerKey(0)); sched.add_worker(WorkerKey(1))
>>> sched.schedule(ScheduleRequest("a", token_ids=[1, 2, 3, 4, 5])).worker
WorkerKey(worker_id=0, dp_rank=0)
>>> sched.on_finish("a")
True
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol

from kvrouter.clock import Clock, monotonic
from kvrouter.errors import AllWorkersBusy, InvalidRequest, NoWorkerAvailable
from kvrouter.events.model import WorkerKey
from kvrouter.hashing import Salt, compute_sequence_hashes, hash_request
from kvrouter.load.aggregator import AggregatedMetrics, EndpointMetrics, KvMetricsAggregator
from kvrouter.routing.active import ActiveSequences, ActiveStats
from kvrouter.routing.policies import (
    Decision,
    Policy,
    RequestView,
    RoutingOverrides,
    WorkerView,
    make_policy,
)
from kvrouter.routing.stats import Histogram, HistogramBuilder
from kvrouter.routing.table import WorkerTable

__all__ = [
    "BusyThresholds",
    "IndexerLike",
    "KvScheduler",
    "ScheduleRequest",
    "SchedulerStats",
]

logger = logging.getLogger(__name__)

# Overlap as a fraction of the prompt's blocks.
OVERLAP_BOUNDS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
LATENCY_BOUNDS_S = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3)


class _Scores(Protocol):
    @property
    def scores(self) -> Mapping[WorkerKey, int]: ...


class IndexerLike(Protocol):
    """The part of :class:`kvrouter.index.KvIndexer` the scheduler uses."""

    def find_matches(self, local_hashes: Sequence[int]) -> _Scores: ...

    def find_matches_sequence(self, sequence_hashes: Sequence[int]) -> _Scores: ...

    def add_predicted(
        self, worker: WorkerKey, local_hashes: Sequence[int], *, ttl_s: float | None = None
    ) -> object: ...

    def add_predicted_sequence(
        self,
        worker: WorkerKey,
        sequence_hashes: Sequence[int],
        *,
        ttl_s: float | None = None,
        max_blocks: int | None = None,
    ) -> Any:  # an opaque booking for withdraw_prediction, or None
        ...

    def withdraw_prediction(self, booking: Any, /) -> object: ...

    def remove_worker(self, worker_id: int, dp_rank: int | None = None) -> object: ...

    def tree_size(self, worker: WorkerKey) -> int: ...


@dataclass(frozen=True, slots=True)
class ScheduleRequest:
    """One request to route. Give ``token_ids``, or ``local_hashes`` (and then
    ``num_tokens``; ``seq_hashes`` are derived when missing)."""

    request_id: str
    token_ids: Sequence[int] | None = None
    local_hashes: Sequence[int] | None = None
    seq_hashes: Sequence[int] | None = None
    num_tokens: int | None = None
    salt: Salt = None  # changes every block's hash (a LoRA adapter)
    cache_salt: str | None = None  # changes the first block's (vLLM's cache_salt)
    overrides: RoutingOverrides | None = None
    worker: WorkerKey | int | None = None  # direct routing
    policy: str | None = None  # a registered policy name or "pkg.mod:func"
    # Workers not to use for this request only (e.g. they failed it once); they stay in
    # rotation for every other request. Ignored for direct routing (``worker``).
    exclude: frozenset[WorkerKey] = frozenset()
    # Sequences the engine runs for it (OpenAI's ``n``): each holds its own tail block,
    # and each is booked as prefilling the uncached prompt (an upper bound: exact when
    # they start together, before any of it is cached, as in the simulated engine).
    num_sequences: int = 1


@dataclass(frozen=True, slots=True)
class BusyThresholds:
    """A worker over any of these is not a candidate; ``None`` disables a check.

    ``max_kv_usage`` compares with the worker's load (0..1, the higher of the router's
    estimate and the engine's report); ``max_prefill_tokens`` with the prompt tokens the
    router has sent it that are still being prefilled; ``max_waiting_requests`` with the
    engine's reported queue (fresh metrics only).
    """

    max_kv_usage: float | None = None
    max_prefill_tokens: int | None = None
    max_waiting_requests: int | None = None
    retry_after_s: float = 1.0


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_workers: int
    num_decisions: int
    decisions_by_policy: Mapping[str, int]
    decisions_by_worker: Mapping[WorkerKey, int]
    overlap_ratio: Histogram  # matched blocks / prompt blocks, per decision
    overlap_blocks_total: int
    prompt_blocks_total: int
    decision_latency_s: Histogram
    num_short_prompts: int  # shorter than one block: routed by load alone
    num_busy_rejects: int
    num_no_worker: int
    num_first_tokens: int
    num_finished: int
    active: ActiveStats


@dataclass(slots=True)
class _Worker:
    total_blocks: int | None
    publishes_events: bool = True


class _TreeSizes(Mapping[WorkerKey, int]):
    """Index tree sizes, read from the indexer only when a policy breaks a tie."""

    __slots__ = ("_indexer", "_workers")

    def __init__(self, indexer: IndexerLike, workers: Mapping[WorkerKey, object]) -> None:
        self._indexer = indexer
        self._workers = workers

    def __getitem__(self, worker: WorkerKey) -> int:
        return self._indexer.tree_size(worker)

    def __iter__(self) -> Iterator[WorkerKey]:
        return iter(self._workers)

    def __len__(self) -> int:
        return len(self._workers)


class KvScheduler:
    """Routes requests to workers; see the module docstring.

    ``indexer`` may be ``None`` (no cache awareness: every overlap is 0). ``timer``
    measures decision latency; it defaults to ``clock`` (pass ``time.perf_counter`` live).
    ``explain_every`` > 0 logs one decision in that many at INFO, as one line.

    Worker views are cached and rebuilt only when a worker's router-side load or the
    metrics snapshot changes; the candidates are a :class:`WorkerTable` whose rows are
    updated in place, so policies score a large fleet with a few vectorised operations
    plus Python-level work for the workers that hold part of the prompt.
    The metrics snapshot is re-read when the aggregator changed (at most every
    ``metrics_min_interval_s``; raise it for large fleets that push often) and at least
    every ``metrics_max_age_s`` (so staleness is noticed).
    """

    def __init__(
        self,
        indexer: IndexerLike | None,
        aggregator: KvMetricsAggregator | None = None,
        *,
        policy: Policy | str = "kv",
        block_size: int = 16,
        clock: Clock = monotonic,
        rng: random.Random | None = None,
        busy: BusyThresholds | None = None,
        predict_cache: bool = True,
        predicted_ttl_s: float | None = None,
        request_expiry_s: float | None = None,
        timer: Clock | None = None,
        explain_every: int = 0,
        keep_recent: int = 64,
        metrics_min_interval_s: float = 0.0,
        metrics_max_age_s: float = 0.25,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.indexer = indexer
        self.aggregator = aggregator
        self.block_size = block_size
        self._clock = clock
        self._timer = timer or clock
        self._rng = rng or random.Random()
        self._busy = busy or BusyThresholds()
        self._predict = predict_cache
        self._predicted_ttl_s = predicted_ttl_s
        self._explain_every = explain_every
        self.active = ActiveSequences(clock=clock, expiry_s=request_expiry_s)
        # The predicted cache entries each request in flight booked, to withdraw if it
        # fails before the worker computed anything.
        self._predictions: dict[str, Any] = {}
        self._policies: dict[str, Policy] = {}
        self.policy = self._resolve_policy(policy)
        self._workers: dict[WorkerKey, _Worker] = {}
        self._order: list[tuple[WorkerKey, _Worker]] = []
        # Cached views, in worker order; see _current_views().
        self._views: list[WorkerView] = []
        self._candidates = WorkerTable()
        self._pos: dict[WorkerKey, int] = {}
        self._views_valid = False
        self._views_active: ActiveSequences | None = None
        self._views_active_version = -1
        self._views_epoch = -1
        self._tree_sizes = _TreeSizes(indexer, self._workers) if indexer is not None else None
        self._metrics: AggregatedMetrics | None = None
        self._metrics_by_worker: dict[WorkerKey, EndpointMetrics] = {}
        self._metrics_version = -1
        self._metrics_read_s = float("-inf")
        self._metrics_epoch = 0
        self._metrics_min_interval_s = metrics_min_interval_s
        self._metrics_max_age_s = metrics_max_age_s
        self._recent: deque[Decision] = deque(maxlen=keep_recent)
        self._by_policy: Counter[str] = Counter()
        self._by_worker: Counter[WorkerKey] = Counter()
        self._overlap = HistogramBuilder(OVERLAP_BOUNDS)
        self._latency = HistogramBuilder(LATENCY_BOUNDS_S)
        self._overlap_blocks = 0
        self._prompt_blocks = 0
        self._num_decisions = 0
        self._num_short = 0
        self._num_busy = 0
        self._num_no_worker = 0
        self._num_first_tokens = 0
        self._num_finished = 0

    # -- workers -----------------------------------------------------------------

    def add_worker(
        self,
        worker: WorkerKey | int,
        total_blocks: int | None = None,
        *,
        publishes_events: bool = True,
    ) -> None:
        """Register a worker (again: updates its settings).

        ``publishes_events=False`` marks a worker whose cache is known only from the
        router's own predictions (approximate mode): every routed block is predicted and
        refreshed, and no more are kept than the worker's KV capacity (``total_blocks``,
        else the ``kv_total_blocks`` its metrics report), oldest out first. For a worker
        that publishes KV events, the prefix it already holds is known from its events,
        so only the request's new blocks are predicted.
        """
        self._workers[_key(worker)] = _Worker(total_blocks, publishes_events)
        self._order = sorted(self._workers.items())
        self._views_valid = False

    def remove_worker(self, worker_id: int, dp_rank: int | None = None) -> int:
        """Forget a worker (all ranks, or one): its requests, cache entries and metrics."""
        keys = [
            k
            for k in self._workers
            if k.worker_id == worker_id and (dp_rank is None or k.dp_rank == dp_rank)
        ]
        for key in keys:
            del self._workers[key]
            self.active.remove_worker(key)
        self._order = sorted(self._workers.items())
        self._views_valid = False
        if self.indexer is not None:
            self.indexer.remove_worker(worker_id, dp_rank)
        if self.aggregator is not None:
            self.aggregator.remove_worker(worker_id, dp_rank)
        return len(keys)

    @property
    def workers(self) -> tuple[WorkerKey, ...]:
        return tuple(sorted(self._workers))

    # -- the request lifecycle ------------------------------------------------------

    def schedule(self, request: ScheduleRequest) -> Decision:
        """Choose a worker and book the request on it; see the module docstring.

        Raises :class:`NoWorkerAvailable` (no workers), :class:`AllWorkersBusy`,
        :class:`InvalidRequest` (no prompt, unknown direct worker, duplicate id).
        """
        start = self._timer()
        if request.request_id in self.active:
            raise InvalidRequest(f"request {request.request_id!r} is already scheduled")
        view, decision, local, seq = self._decide(request, count=True)
        self._book(view, decision, local, seq, max(1, request.num_sequences))
        self._record(decision, self._timer() - start)
        return decision

    def min_prefill_tokens(self) -> int | float:
        """The fewest prompt tokens still being prefilled on any worker (``-inf`` with no
        workers): the router queue's measure of free capacity. Bookings past the request
        expiry are freed first, so a lost request cannot hold a worker's room forever."""
        if not self._workers:
            return float("-inf")
        self.active.expire()
        prefill = self.active.prefill_tokens
        return min(prefill(key) for key in self._workers)

    def uncached_tokens(self, request: ScheduleRequest) -> int:
        """The request's prompt tokens that no worker holds now (by the index): the
        work it brings wherever it goes, as the router queue's ``wspt`` order uses it."""
        _local, seq, num_tokens = self._hash(request)
        best = 0
        if seq and self.indexer is not None:
            scores = self.indexer.find_matches_sequence(seq).scores
            workers = self._workers
            best = max((n for w, n in scores.items() if w in workers), default=0)
        return max(0, num_tokens - best * self.block_size)

    def preview(self, request: ScheduleRequest) -> Decision:
        """The decision :meth:`schedule` would make now, without booking or counting it
        (explanations, dry runs). Stateful policies (round robin, sampling) still advance."""
        return self._decide(request, count=False)[1]

    def _decide(
        self, request: ScheduleRequest, *, count: bool
    ) -> tuple[RequestView, Decision, Sequence[int], Sequence[int]]:
        local, seq, num_tokens = self._hash(request)
        if not self._workers:
            self._num_no_worker += count
            raise NoWorkerAvailable("no workers registered")
        target = None if request.worker is None else _key(request.worker)
        if target is not None and target not in self._workers:
            raise InvalidRequest(f"unknown worker {target} for direct routing")
        overlaps, views, candidates = self._build_views(seq, target)
        if request.exclude and target is None:
            candidates, views = _without(request.exclude, candidates, views)
            if not views:
                self._num_no_worker += count
                raise NoWorkerAvailable("every worker is excluded for this request")
        if not candidates:
            self._num_busy += count
            raise AllWorkersBusy(_busy_message(views), retry_after_s=self._busy.retry_after_s)
        view = RequestView(
            request_id=request.request_id,
            num_tokens=num_tokens,
            num_blocks=len(local),
            overlaps=overlaps,
            block_size=self.block_size,
            overrides=request.overrides,
            target=target,
            shared_active=self.active.shared_blocks(seq),
            tree_sizes=self._tree_sizes if self._tree_sizes is not None else {},
        )
        decision = self._policy_for(request, target)(view, candidates)
        return view, decision, local, seq

    def on_first_token(self, request_id: str) -> bool:
        """The request's first token arrived: its prefill is done (idempotent)."""
        done = self.active.mark_prefill_done(request_id)
        self._num_first_tokens += done
        return done

    def on_finish(self, request_id: str, *, failed: bool = False) -> bool:
        """The request ended, however it ended (idempotent; unknown ids are ignored).

        ``failed``: the worker refused or lost it before answering, so the cache entries
        predicted for it there are withdrawn (they would draw its prefix to that worker).
        """
        booking = self._predictions.pop(request_id, None)
        if failed and booking is not None and self.indexer is not None:
            self.indexer.withdraw_prediction(booking)
        freed = self.active.free(request_id)
        self._num_finished += freed
        return freed

    # -- steps of schedule() ------------------------------------------------------------

    def _hash(self, request: ScheduleRequest) -> tuple[Sequence[int], Sequence[int], int]:
        if request.local_hashes is not None:
            local = request.local_hashes
            seq = request.seq_hashes
            if seq is None:
                seq = compute_sequence_hashes(local)
            if len(seq) != len(local):
                raise InvalidRequest("local_hashes and seq_hashes differ in length")
            num_tokens = request.num_tokens
            if num_tokens is None:
                num_tokens = len(request.token_ids) if request.token_ids is not None else 0
            return local, seq, max(num_tokens, len(local) * self.block_size)
        if request.token_ids is None:
            raise InvalidRequest("a request needs token_ids or local_hashes")
        local, seq = hash_request(
            request.token_ids, self.block_size, salt=request.salt, cache_salt=request.cache_salt
        )
        return local, seq, len(request.token_ids)

    def _build_views(
        self, seq: Sequence[int], target: WorkerKey | None
    ) -> tuple[dict[WorkerKey, int], Sequence[WorkerView], Sequence[WorkerView]]:
        overlaps: dict[WorkerKey, int] = {}
        if seq and self.indexer is not None:
            scores = self.indexer.find_matches_sequence(seq).scores
            workers = self._workers
            overlaps = {w: n for w, n in scores.items() if w in workers}
        self._refresh_metrics()
        self._update_views()
        if target is not None:
            view = self._views[self._pos[target]]
            return overlaps, [view], [] if view.busy else [view]
        return overlaps, self._views, self._candidates

    def _refresh_metrics(self) -> None:
        agg = self.aggregator
        if agg is None:
            return
        now = self._clock()
        age = now - self._metrics_read_s
        changed = agg.version != self._metrics_version
        if (changed and age < self._metrics_min_interval_s) or (
            not changed and age < self._metrics_max_age_s
        ):
            return
        self._metrics = metrics = agg.get_metrics()
        self._metrics_by_worker = {e.worker: e for e in metrics.endpoints}
        self._metrics_version = agg.version
        self._metrics_read_s = now
        self._metrics_epoch += 1

    def _update_views(self) -> None:
        """Bring the cached views up to date: all of them after a metrics refresh or a
        change of workers, otherwise only those whose router-side load changed."""
        active = self.active
        changed: list[WorkerKey] | None = None
        if (
            self._views_valid
            and self._views_active is active
            and self._views_epoch == self._metrics_epoch
        ):
            changed = active.changed_since(self._views_active_version)
        if changed is None:
            self._views = [self._view(key, state) for key, state in self._order]
            self._pos = {key: i for i, (key, _) in enumerate(self._order)}
            self._candidates = WorkerTable(v for v in self._views if not v.busy)
        elif changed:
            self._update_changed(set(changed))
        self._views_valid = True
        self._views_active = active
        self._views_active_version = active.current_version
        self._views_epoch = self._metrics_epoch

    def _update_changed(self, changed: set[WorkerKey]) -> None:
        """Rebuild the views of ``changed`` workers; the candidate table changes row by
        row unless a worker became busy or stopped being busy."""
        views, pos, workers, table = self._views, self._pos, self._workers, self._candidates
        regroup = False
        for key in changed:
            index = pos.get(key)
            if index is None:
                continue
            old = views[index]
            view = views[index] = self._view(key, workers[key])
            if old.busy != view.busy:
                regroup = True
            elif not view.busy:
                table.update(view)
        if regroup:
            self._candidates = WorkerTable(v for v in views if not v.busy)

    def _view(self, key: WorkerKey, state: _Worker) -> WorkerView:
        load = self.active.load(key)
        endpoint = self._metrics_by_worker.get(key)
        metrics = self._metrics
        reported = metrics.endpoint_load(endpoint) if metrics and endpoint else None
        total = _total_blocks(state, endpoint)
        view = WorkerView(
            worker=key,
            metrics=endpoint,
            prefill_tokens=load.prefill_tokens,
            active_blocks=load.active_blocks,
            total_blocks=total,
            reported_load=reported,
        )
        reasons = self._busy_reasons(view)
        if not reasons:
            return view
        return replace(view, busy=True, busy_reasons=reasons)

    def _busy_reasons(self, view: WorkerView) -> tuple[str, ...]:
        busy = self._busy
        reasons: list[str] = []
        if busy.max_kv_usage is not None and view.load > busy.max_kv_usage:
            reasons.append(f"kv usage {view.load:.0%} > {busy.max_kv_usage:.0%}")
        if busy.max_prefill_tokens is not None and view.prefill_tokens > busy.max_prefill_tokens:
            reasons.append(f"prefill tokens {view.prefill_tokens} > {busy.max_prefill_tokens}")
        m = view.metrics
        limit = busy.max_waiting_requests
        if limit is not None and m is not None and not m.stale and m.num_requests_waiting > limit:
            reasons.append(f"waiting requests {m.num_requests_waiting} > {limit}")
        return tuple(reasons)

    def _resolve_policy(self, policy: Policy | str) -> Policy:
        if not isinstance(policy, str):
            return policy
        made = self._policies.get(policy)
        if made is None:
            made = self._policies[policy] = make_policy(policy, rng=self._rng)
        return made

    def _policy_for(self, request: ScheduleRequest, target: WorkerKey | None) -> Policy:
        if target is not None:
            return self._resolve_policy("direct")
        if request.policy is not None:
            return self._resolve_policy(request.policy)
        return self.policy

    def _book(
        self,
        view: RequestView,
        decision: Decision,
        local: Sequence[int],
        seq: Sequence[int],
        num_sequences: int = 1,
    ) -> None:
        worker = decision.worker
        partial_tail = 1 if view.num_tokens % self.block_size else 0
        self.active.add_request(
            view.request_id,
            worker,
            seq,
            view.uncached_tokens(worker) * num_sequences,
            num_private_blocks=partial_tail * num_sequences,
        )
        if self._predict and local and self.indexer is not None:
            state = self._workers.get(worker)
            start, capacity = 0, None
            if state is not None and state.publishes_events:
                start = view.overlap(worker)  # its events tell what it holds
            elif state is not None:  # approximate mode: no more than fits
                capacity = _total_blocks(state, self._metrics_by_worker.get(worker))
            if start < len(seq):
                booking = self.indexer.add_predicted_sequence(
                    worker, seq[start:], ttl_s=self._predicted_ttl_s, max_blocks=capacity
                )
                if booking is not None:
                    predictions = self._predictions
                    predictions[view.request_id] = booking
                    if len(predictions) > 2 * len(self.active) + 1024:
                        self._forget_lost_predictions()

    def _forget_lost_predictions(self) -> None:
        """Let go of the bookings of requests that left without :meth:`on_finish` (the
        active set expired them); their entries stay until their own expiry."""
        active = self.active
        self._predictions = {r: b for r, b in self._predictions.items() if r in active}

    def _record(self, decision: Decision, latency_s: float) -> None:
        self._num_decisions += 1
        self._by_policy[decision.policy] += 1
        self._by_worker[decision.worker] += 1
        self._latency.observe(max(0.0, latency_s))
        self._recent.append(decision)
        if decision.num_blocks == 0:
            self._num_short += 1
        else:
            self._overlap.observe(decision.overlap_blocks / decision.num_blocks)
            self._overlap_blocks += decision.overlap_blocks
            self._prompt_blocks += decision.num_blocks
        every = self._explain_every
        if every > 0 and self._num_decisions % every == 0:
            logger.info("routing decision %s latency_us=%.1f", decision.summary(), latency_s * 1e6)

    # -- introspection -------------------------------------------------------------------

    def recent_decisions(self) -> list[Decision]:
        """The last decisions (``keep_recent`` of them), oldest first."""
        return list(self._recent)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_workers=len(self._workers),
            num_decisions=self._num_decisions,
            decisions_by_policy=MappingProxyType(dict(self._by_policy)),
            decisions_by_worker=MappingProxyType(dict(self._by_worker)),
            overlap_ratio=self._overlap.value(),
            overlap_blocks_total=self._overlap_blocks,
            prompt_blocks_total=self._prompt_blocks,
            decision_latency_s=self._latency.value(),
            num_short_prompts=self._num_short,
            num_busy_rejects=self._num_busy,
            num_no_worker=self._num_no_worker,
            num_first_tokens=self._num_first_tokens,
            num_finished=self._num_finished,
            active=self.active.stats(),
        )


def _key(worker: WorkerKey | int) -> WorkerKey:
    return worker if isinstance(worker, WorkerKey) else WorkerKey(worker, 0)


def _without(
    exclude: frozenset[WorkerKey], candidates: Sequence[WorkerView], views: Sequence[WorkerView]
) -> tuple[list[WorkerView], list[WorkerView]]:
    """``candidates`` and ``views`` less the excluded workers (new lists: the cached
    ones are shared between requests)."""
    return (
        [v for v in candidates if v.worker not in exclude],
        [v for v in views if v.worker not in exclude],
    )


def _busy_message(views: Sequence[WorkerView]) -> str:
    parts = [f"{v.worker.worker_id}.{v.worker.dp_rank}: {', '.join(v.busy_reasons)}" for v in views]
    return "all workers are busy (" + "; ".join(parts) + ")"


def _total_blocks(state: _Worker, endpoint: EndpointMetrics | None) -> int | None:
    """A worker's KV capacity in blocks: as configured, else as its metrics report."""
    if state.total_blocks is not None:
        return state.total_blocks
    if endpoint is not None and endpoint.kv_total_blocks > 0:
        return endpoint.kv_total_blocks
    return None
