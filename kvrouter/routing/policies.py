"""Routing policies: pure functions of ``(RequestView, Sequence[WorkerView]) -> Decision``.

The scheduler builds the views (cache overlaps, router-side load, engine metrics) and
removes busy workers; a policy only chooses. Policies that need randomness take a
``random.Random`` when they are made, so a seeded run is reproducible.

=================  ==========================================================
``random``         uniform over candidates
``round_robin``    candidates in worker order, one after the other
``direct``         the worker the caller named (``ScheduleRequest.worker``)
``power_of_two``   two random candidates, the less loaded one
``least_loaded``   the least loaded candidate
``kv``             the cost model, DESIGN 4 (default)
``score``          the seed rule ``hit_rate * weight_cache - load * weight_load``
``prefix_affinity`` the cost model with recomputed prefix tokens weighed more
``pkg.mod:func``   a user's ``func(matches, metrics) -> worker_id``
=================  ==========================================================

>>> policy = make_policy("score")
>>> req = RequestView("r1", num_tokens=64, num_blocks=4, overlaps={WorkerKey(2): 2},
...                   block_size=16)
>>> policy(req, [WorkerView(WorkerKey(2), reported_load=0.5)]).explain()
['Worker 2: 50% cache hit, 50% load -> score 0.00 (Selected)']
"""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from kvrouter.errors import ConfigError, InvalidRequest
from kvrouter.events.model import WorkerKey
from kvrouter.load.aggregator import AggregatedMetrics, EndpointMetrics

__all__ = [
    "MAX_ROWS",
    "POLICY_NAMES",
    "CandidateScore",
    "CustomPolicy",
    "Decision",
    "DirectPolicy",
    "KvCostPolicy",
    "LeastLoadedPolicy",
    "Policy",
    "PowerOfTwoPolicy",
    "PrefixAffinityPolicy",
    "RandomPolicy",
    "RequestView",
    "RoundRobinPolicy",
    "RoutingOverrides",
    "ScorePolicy",
    "WorkerView",
    "load_policy",
    "make_policy",
]

_TIE_TOL = 1e-9
MAX_ROWS = 16  # candidate rows a decision keeps


@dataclass(frozen=True, slots=True)
class RoutingOverrides:
    """Per-request changes to a policy's parameters; ``None`` keeps the policy's own."""

    overlap_weight: float | None = None
    temperature: float | None = None
    weight_cache: float | None = None
    weight_load: float | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RoutingOverrides:
        """Build from e.g. a request body's ``{"temperature": 0.5}``; unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"unknown routing override(s) {unknown}; valid: {sorted(known)}")
        values: dict[str, float | None] = {}
        for key, value in data.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise InvalidRequest(f"routing override {key!r} must be a number, got {value!r}")
            values[key] = None if value is None else float(value)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a policy may know about the request."""

    request_id: str
    num_tokens: int
    num_blocks: int  # full blocks (the hashed ones)
    overlaps: Mapping[WorkerKey, int]  # cached prefix blocks per worker (device tier)
    block_size: int
    overrides: RoutingOverrides | None = None
    target: WorkerKey | None = None  # the named worker of a direct request
    # Blocks of this request already held by in-flight requests on the worker (they
    # would not add to its active blocks).
    shared_active: Mapping[WorkerKey, int] = field(default_factory=dict)
    # Blocks the index holds per worker (ties go to the smaller cache); read only on ties.
    tree_sizes: Mapping[WorkerKey, int] = field(default_factory=dict)

    def overlap(self, worker: WorkerKey) -> int:
        return self.overlaps.get(worker, 0)

    def hit_rate(self, worker: WorkerKey) -> float:
        """Matched blocks / request blocks (0 for a prompt shorter than one block)."""
        return self.overlap(worker) / self.num_blocks if self.num_blocks else 0.0

    def uncached_tokens(self, worker: WorkerKey) -> int:
        return max(0, self.num_tokens - self.overlap(worker) * self.block_size)

    def new_blocks(self, worker: WorkerKey) -> int:
        """Blocks this request would add to the worker's active blocks."""
        total = -(-self.num_tokens // self.block_size)  # a partial tail block counts
        return max(0, total - self.shared_active.get(worker, 0))


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What a policy may know about one candidate worker."""

    worker: WorkerKey
    metrics: EndpointMetrics | None = None
    prefill_tokens: int = 0  # router-side: queued prompt tokens of in-flight requests
    active_blocks: int = 0  # router-side: deduplicated blocks of in-flight requests
    total_blocks: int | None = None
    reported_load: float | None = None  # the aggregator's load (stale-adjusted), 0..1
    busy: bool = False
    busy_reasons: tuple[str, ...] = ()

    @property
    def load(self) -> float:
        """KV usage 0..1: the router's own estimate or the engine's, whichever is higher.

        The router's estimate is current; the engine's includes what the router does
        not see (other routers, decode growth) but lags.
        """
        own = self.active_blocks / self.total_blocks if self.total_blocks else 0.0
        return max(own, self.reported_load or 0.0)


@dataclass(frozen=True, slots=True)
class CandidateScore:
    """One row of a decision: how a policy saw one candidate."""

    worker: WorkerKey
    overlap_blocks: int
    hit_rate: float
    load: float
    prefill_blocks: float
    decode_blocks: float
    score: float | None  # None: the policy does not score (random, round robin, direct)
    selected: bool


def _worker_label(worker: WorkerKey) -> str:
    if worker.dp_rank:
        return f"Worker {worker.worker_id} (dp {worker.dp_rank})"
    return f"Worker {worker.worker_id}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen worker and why."""

    request_id: str
    worker: WorkerKey
    policy: str
    candidates: tuple[CandidateScore, ...]
    score_name: str | None  # "cost" (lower wins), "score" (higher wins), "load" or None
    num_blocks: int
    overlap_blocks: int
    # Candidates considered; ``candidates`` holds rows for at most MAX_ROWS of them (the
    # chosen one and the best others).
    num_candidates: int = 0

    def explain(self) -> list[str]:
        """One line per candidate, e.g.
        ``Worker 2: 50% cache hit, 50% load -> score 0.00 (Selected)``."""
        lines = [self._line(row) for row in self.candidates]
        hidden = self.num_candidates - len(self.candidates)
        if hidden > 0:
            lines.append(f"... and {hidden} more candidates")
        return lines

    def _line(self, row: CandidateScore) -> str:
        text = f"{_worker_label(row.worker)}: {row.hit_rate:.0%} cache hit, {row.load:.0%} load"
        if self.score_name == "cost":
            text += f", {row.prefill_blocks:.1f} prefill + {row.decode_blocks:.1f} decode blocks"
        if row.score is not None and self.score_name is not None:
            text += f" -> {self.score_name} {row.score:.2f}"
        return text + (" (Selected)" if row.selected else "")

    def summary(self) -> str:
        """One log line: the choice and every candidate."""
        rows = "; ".join(self._line(row) for row in self.candidates)
        return (
            f"request={self.request_id} policy={self.policy} worker={self.worker.worker_id}"
            f" dp={self.worker.dp_rank} overlap={self.overlap_blocks}/{self.num_blocks} [{rows}]"
        )


class Policy(Protocol):
    """A routing policy; ``workers`` is never empty and holds no busy worker."""

    @property
    def name(self) -> str: ...

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision: ...


def _row(
    request: RequestView, view: WorkerView, score: float | None, selected: bool
) -> CandidateScore:
    worker = view.worker
    bs = request.block_size
    return CandidateScore(
        worker=worker,
        overlap_blocks=request.overlap(worker),
        hit_rate=request.hit_rate(worker),
        load=view.load,
        prefill_blocks=(view.prefill_tokens + request.uncached_tokens(worker)) / bs,
        decode_blocks=float(view.active_blocks + request.new_blocks(worker)),
        score=score,
        selected=selected,
    )


def _shown(
    num: int,
    chosen: int,
    scores: Sequence[float | None] | None,
    score_name: str | None,
    order: Sequence[int] | None,
) -> list[int]:
    """Indexes of the rows a decision keeps: all of a small fleet; of a large one, the
    chosen worker and the best others (rows cost more to build than the choice)."""
    if num <= MAX_ROWS:
        return list(range(num))
    if order is None:
        if scores is None:
            order = range(MAX_ROWS)
        else:
            values = [0.0 if s is None else s for s in scores]
            order = _ranked(values, higher_is_better=score_name == "score")
    best = [i for i in order[:MAX_ROWS] if i != chosen][: MAX_ROWS - 1]
    return sorted([chosen, *best])


def _decide(
    policy: str,
    request: RequestView,
    views: Sequence[WorkerView],
    chosen: int,
    *,
    scores: Sequence[float | None] | None = None,
    score_name: str | None = None,
    order: Sequence[int] | None = None,
) -> Decision:
    rows = tuple(
        _row(request, views[i], None if scores is None else scores[i], i == chosen)
        for i in _shown(len(views), chosen, scores, score_name, order)
    )
    worker = views[chosen].worker
    return Decision(
        request_id=request.request_id,
        worker=worker,
        policy=policy,
        candidates=rows,
        score_name=score_name,
        num_blocks=request.num_blocks,
        overlap_blocks=request.overlap(worker),
        num_candidates=len(views),
    )


def _ranked(values: Sequence[float], higher_is_better: bool) -> list[int]:
    """Indexes from best to worst (one C-level sort; ties keep worker order)."""
    return sorted(range(len(values)), key=values.__getitem__, reverse=higher_is_better)


def _pick_tied(
    values: Sequence[float],
    order: Sequence[int],
    request: RequestView,
    views: Sequence[WorkerView],
    rng: random.Random,
) -> int:
    """Among the best-ranked indexes that tie: the smallest tree, then random."""
    best = values[order[0]]
    tied = []
    for i in order:
        if abs(values[i] - best) > _TIE_TOL:
            break
        tied.append(i)
    if len(tied) == 1:
        return tied[0]
    tied.sort()
    sizes = request.tree_sizes
    tree = [sizes.get(views[i].worker, 0) for i in tied]
    smallest = min(tree)
    tied = [i for i, t in zip(tied, tree, strict=True) if t == smallest]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


class RandomPolicy:
    """Uniformly random."""

    name = "random"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        return _decide(self.name, request, workers, self._rng.randrange(len(workers)))


class RoundRobinPolicy:
    """Candidates in worker order, one after the other (skipping busy ones)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        order = sorted(range(len(workers)), key=lambda i: workers[i].worker)
        chosen = order[self._next % len(order)]
        self._next += 1
        return _decide(self.name, request, workers, chosen)


class DirectPolicy:
    """The worker the caller named; an unknown worker is the caller's error."""

    name = "direct"

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        if request.target is None:
            raise InvalidRequest("direct routing needs a target worker")
        for i, view in enumerate(workers):
            if view.worker == request.target:
                return _decide(self.name, request, workers, i)
        raise InvalidRequest(f"unknown worker {request.target} for direct routing")


def _load_key(view: WorkerView) -> tuple[float, int, int]:
    # Fraction first; without totals or metrics, raw router-side counts decide.
    return (view.load, view.prefill_tokens, view.active_blocks)


class PowerOfTwoPolicy:
    """Two random candidates; the less loaded one wins (ties: the first drawn)."""

    name = "power_of_two"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        if len(workers) == 1:
            return _decide(
                self.name, request, workers, 0, scores=[workers[0].load], score_name="load"
            )
        a, b = self._rng.sample(range(len(workers)), 2)
        pair = [workers[a], workers[b]]
        chosen = 1 if _load_key(pair[1]) < _load_key(pair[0]) else 0
        return _decide(
            self.name, request, pair, chosen, scores=[v.load for v in pair], score_name="load"
        )


class LeastLoadedPolicy:
    """The least loaded candidate (ties: random)."""

    name = "least_loaded"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        keys = [_load_key(v) for v in workers]
        best = min(keys)
        tied = [i for i, k in enumerate(keys) if k == best]
        chosen = tied[0] if len(tied) == 1 else self._rng.choice(tied)
        return _decide(
            self.name, request, workers, chosen, scores=[v.load for v in workers], score_name="load"
        )


def _softmax_sample(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Sample an index, favouring low cost: softmax of ``-normalised_cost / temperature``.

    Costs are normalised to 0..1 (min..max) so the temperature means the same thing
    whatever the prompt length; equal costs give a uniform choice.
    """
    low, high = min(costs), max(costs)
    span = high - low
    if span <= _TIE_TOL:
        return rng.randrange(len(costs))
    logits = [-((c - low) / span) / temperature for c in costs]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    point = rng.random() * math.fsum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if point < acc:
            return i
    return len(weights) - 1


class KvCostPolicy:
    """DESIGN 4's cost model; the lowest cost wins.

    ``cost = overlap_weight * prefill_blocks + decode_blocks`` where
    ``prefill_blocks = (worker's queued prefill tokens + this request's uncached tokens)
    / block_size`` and ``decode_blocks = worker's active blocks + this request's new
    blocks``. Ties go to the worker with the smaller cache (index tree), then random.
    With ``temperature > 0`` a worker is sampled from a softmax over normalised costs.
    """

    name = "kv"

    def __init__(
        self,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        _check_non_negative(overlap_weight=overlap_weight, temperature=temperature)
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self._rng = rng or random.Random()

    def cost(self, request: RequestView, view: WorkerView, overlap_weight: float) -> float:
        """The cost of one worker (for reading; ``__call__`` computes all at once)."""
        return self.costs(request, [view], overlap_weight)[0]

    @staticmethod
    def costs(
        request: RequestView, workers: Sequence[WorkerView], overlap_weight: float
    ) -> list[float]:
        """Every worker's cost. This runs over the whole fleet for every request, so the
        common case (no overlap, nothing shared) is one comprehension and only workers
        that hold some of the prompt are recomputed."""
        bs = request.block_size
        num_tokens = request.num_tokens
        total_blocks = -(-num_tokens // bs)
        weight = overlap_weight / bs
        base = weight * num_tokens + total_blocks
        costs = [weight * v.prefill_tokens + v.active_blocks + base for v in workers]
        overlaps = request.overlaps
        shared = request.shared_active
        if overlaps or shared:
            pos = dict(zip([v.worker for v in workers], range(len(workers)), strict=True))
            for worker in overlaps.keys() | shared.keys():
                i = pos.get(worker)
                if i is None:
                    continue  # not a candidate
                view = workers[i]
                uncached = max(0, num_tokens - overlaps.get(worker, 0) * bs)
                new = max(0, total_blocks - shared.get(worker, 0))
                costs[i] = weight * (view.prefill_tokens + uncached) + view.active_blocks + new
        return costs

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        o = request.overrides
        weight = _pick(o.overlap_weight if o else None, self.overlap_weight)
        temperature = _pick(o.temperature if o else None, self.temperature)
        costs = self.costs(request, workers, weight)
        order = _ranked(costs, higher_is_better=False)
        if temperature > 0:
            chosen = _softmax_sample(costs, temperature, self._rng)
        else:
            chosen = _pick_tied(costs, order, request, workers, self._rng)
        return _decide(
            self.name, request, workers, chosen, scores=costs, score_name="cost", order=order
        )


class PrefixAffinityPolicy:
    """The cost model, with the prompt tokens a worker would have to recompute weighed
    ``cache_weight`` times; the lowest cost wins (ties: smaller tree, then random).

    ``cost = (queued_prefill_tokens + cache_weight * uncached_tokens) / block_size
    + decode_weight * decode_blocks``. With both weights 1 it ranks workers exactly as
    ``kv`` does. Why weigh a miss more: a prompt prefix recomputed on a worker that did
    not hold it delays that request *and* takes prefill capacity from every request
    queued behind it there, while ``kv`` charges only the former. When the fleet is
    near or past its prefill capacity the second effect dominates, and keeping a
    conversation on the worker that holds its prefix is what keeps queues short.
    """

    name = "prefix_affinity"

    def __init__(
        self,
        cache_weight: float = 16.0,
        decode_weight: float = 1.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        _check_non_negative(cache_weight=cache_weight, decode_weight=decode_weight)
        self.cache_weight = cache_weight
        self.decode_weight = decode_weight
        self._rng = rng or random.Random()

    def costs(self, request: RequestView, workers: Sequence[WorkerView]) -> list[float]:
        """Every worker's cost (the common case, no overlap, is one comprehension)."""
        bs = request.block_size
        num_tokens = request.num_tokens
        total_blocks = -(-num_tokens // bs)
        miss = self.cache_weight / bs
        dw = self.decode_weight
        base = miss * num_tokens + dw * total_blocks
        costs = [v.prefill_tokens / bs + dw * v.active_blocks + base for v in workers]
        overlaps = request.overlaps
        shared = request.shared_active
        if overlaps or shared:
            pos = dict(zip([v.worker for v in workers], range(len(workers)), strict=True))
            for worker in overlaps.keys() | shared.keys():
                i = pos.get(worker)
                if i is None:
                    continue  # not a candidate
                view = workers[i]
                uncached = max(0, num_tokens - overlaps.get(worker, 0) * bs)
                new = max(0, total_blocks - shared.get(worker, 0))
                costs[i] = (
                    view.prefill_tokens / bs + miss * uncached + dw * (view.active_blocks + new)
                )
        return costs

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        costs = self.costs(request, workers)
        order = _ranked(costs, higher_is_better=False)
        chosen = _pick_tied(costs, order, request, workers, self._rng)
        return _decide(
            self.name, request, workers, chosen, scores=costs, score_name="cost", order=order
        )


class ScorePolicy:
    """The seed rule: ``score = cache_hit_rate * weight_cache - load * weight_load``;
    the highest score wins (ties: smaller tree, then random)."""

    name = "score"

    def __init__(
        self,
        weight_cache: float = 1.0,
        weight_load: float = 1.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        _check_non_negative(weight_cache=weight_cache, weight_load=weight_load)
        self.weight_cache = weight_cache
        self.weight_load = weight_load
        self._rng = rng or random.Random()

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        o = request.overrides
        w_cache = _pick(o.weight_cache if o else None, self.weight_cache)
        w_load = _pick(o.weight_load if o else None, self.weight_load)
        scores = [request.hit_rate(v.worker) * w_cache - v.load * w_load for v in workers]
        order = _ranked(scores, higher_is_better=True)
        chosen = _pick_tied(scores, order, request, workers, self._rng)
        return _decide(
            self.name, request, workers, chosen, scores=scores, score_name="score", order=order
        )


CustomRouter = Callable[[dict[int, int], AggregatedMetrics], "int | WorkerKey"]


class CustomPolicy:
    """Wraps a user's ``func(matches, metrics) -> worker_id`` as a policy.

    ``matches`` is ``{worker_id: matched_blocks}`` over the candidates (the best rank of
    a data-parallel worker); ``metrics`` is an :class:`AggregatedMetrics` of the
    candidates, with ``get_worker_load(worker_id)``. Returning a ``WorkerKey`` picks a
    rank; a bare ``worker_id`` gets its rank with the longest match, then the lowest load.
    """

    def __init__(self, func: CustomRouter, name: str | None = None) -> None:
        self._func = func
        self.name: str = name or str(getattr(func, "__qualname__", "custom"))

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        matches: dict[int, int] = {}
        for view in workers:
            wid = view.worker.worker_id
            matches[wid] = max(matches.get(wid, 0), request.overlap(view.worker))
        metrics = AggregatedMetrics.from_endpoints(v.metrics for v in workers if v.metrics)
        answer = self._func(matches, metrics)
        return _decide(self.name, request, workers, self._index_of(answer, request, workers))

    def _index_of(self, answer: object, request: RequestView, workers: Sequence[WorkerView]) -> int:
        if isinstance(answer, WorkerKey):
            found = [i for i, v in enumerate(workers) if v.worker == answer]
        elif isinstance(answer, int) and not isinstance(answer, bool):
            found = [i for i, v in enumerate(workers) if v.worker.worker_id == answer]
        else:
            found = []
        if not found:
            raise ConfigError(f"policy {self.name} returned {answer!r}, which is not a candidate")
        return min(found, key=lambda i: (-request.overlap(workers[i].worker), workers[i].load))


def load_policy(path: str) -> CustomPolicy:
    """Import ``"package.module:function"`` (or ``"package.module.function"``) as a policy."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"policy path {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import policy module {module_name!r}: {exc}") from exc
    func = getattr(module, attr, None)
    if not callable(func):
        raise ConfigError(f"{module_name!r} has no callable {attr!r}")
    return CustomPolicy(func, name=path)


def _pick(override: float | None, default: float) -> float:
    return default if override is None else override


def _check_non_negative(**values: float) -> None:
    for key, value in values.items():
        if not value >= 0:  # also rejects NaN
            raise ConfigError(f"{key} must be >= 0, got {value}")


_FACTORIES: dict[str, Callable[..., Policy]] = {
    "random": RandomPolicy,
    "round_robin": RoundRobinPolicy,
    "direct": DirectPolicy,
    "power_of_two": PowerOfTwoPolicy,
    "least_loaded": LeastLoadedPolicy,
    "kv": KvCostPolicy,
    "score": ScorePolicy,
    "prefix_affinity": PrefixAffinityPolicy,
}
_TAKES_RNG = frozenset({"random", "power_of_two", "least_loaded", "kv", "score", "prefix_affinity"})
POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_policy(name: str, *, rng: random.Random | None = None, **params: Any) -> Policy:
    """A policy by name, e.g. ``make_policy("kv", overlap_weight=2.0)``.

    A name with a ``:`` is a user's function (:func:`load_policy`). Unknown names and
    parameters raise :class:`~kvrouter.errors.ConfigError` (a ``ValueError``).
    """
    if ":" in name:
        if params:
            raise ConfigError(f"custom policy {name!r} takes no parameters, got {sorted(params)}")
        return load_policy(name)
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown policy {name!r}; valid: {', '.join(POLICY_NAMES)}")
    if name in _TAKES_RNG:
        params["rng"] = rng
    try:
        return factory(**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for policy {name!r}: {exc}") from exc
