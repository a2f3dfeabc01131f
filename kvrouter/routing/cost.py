"""Policies that weigh the cached prefix against load: ``kv`` (DESIGN 4's cost model),
``prefix_affinity`` (the same with cache misses weighed more) and ``score`` (the seed
rule).

Each scores every candidate, but only the workers that hold part of the prompt (or
have some of its blocks active) are scored in Python: for every other worker the cost
depends on its own load and the prompt's size alone, and is computed for the whole
fleet at once from the columns of a :class:`~kvrouter.routing.table.WorkerTable`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from kvrouter.errors import ConfigError
from kvrouter.routing.table import TIE_TOL, FloatArray, WorkerTable, decide, pick_tied
from kvrouter.routing.views import Decision, RequestView, WorkerView

__all__ = ["KvCostPolicy", "PrefixAffinityPolicy", "ScorePolicy"]


def _softmax_sample(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Sample an index, favouring low cost: softmax of ``-normalised_cost / temperature``.

    Costs are normalised to 0..1 (min..max) so the temperature means the same thing
    whatever the prompt length; equal costs give a uniform choice.
    """
    low, high = min(costs), max(costs)
    span = high - low
    if span <= TIE_TOL:
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


def _correct(
    costs: FloatArray,
    request: RequestView,
    table: WorkerTable,
    exact: Callable[[WorkerView, int, int], float],
) -> None:
    """Overwrite the cost of every candidate that holds part of the prompt (``overlaps``)
    or has some of its blocks active (``shared_active``) with ``exact(view, uncached,
    new)``."""
    overlaps = request.overlaps
    shared = request.shared_active
    if not overlaps and not shared:
        return
    bs = request.block_size
    num_tokens = request.num_tokens
    total_blocks = -(-num_tokens // bs)
    pos = table.positions
    for worker in overlaps.keys() | shared.keys():
        i = pos.get(worker)
        if i is None:
            continue  # not a candidate
        uncached = max(0, num_tokens - overlaps.get(worker, 0) * bs)
        new = max(0, total_blocks - shared.get(worker, 0))
        costs[i] = exact(table[i], uncached, new)


def kv_costs(request: RequestView, table: WorkerTable, overlap_weight: float) -> FloatArray:
    """Every candidate's ``kv`` cost, in table order."""
    bs = request.block_size
    num_tokens = request.num_tokens
    total_blocks = -(-num_tokens // bs)
    weight = overlap_weight / bs
    # No overlap, nothing shared: uncached = num_tokens, new = total_blocks. The
    # operations are those of the exact formula, in the same order, so both agree
    # bit for bit and ties are ties whichever way a cost was computed.
    base = weight * num_tokens + total_blocks
    costs: FloatArray = weight * table.prefill_tokens + table.active_blocks + base

    def exact(view: WorkerView, uncached: int, new: int) -> float:
        return weight * (view.prefill_tokens + uncached) + view.active_blocks + new

    _correct(costs, request, table, exact)
    return costs


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
        """Every worker's cost, in order."""
        return [float(c) for c in kv_costs(request, WorkerTable.of(workers), overlap_weight)]

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        o = request.overrides
        weight = _pick(o.overlap_weight if o else None, self.overlap_weight)
        temperature = _pick(o.temperature if o else None, self.temperature)
        table = WorkerTable.of(workers)
        costs = kv_costs(request, table, weight)
        if temperature > 0:
            chosen = _softmax_sample(costs.tolist(), temperature, self._rng)
        else:
            chosen = pick_tied(
                costs, higher_is_better=False, request=request, workers=table, rng=self._rng
            )
        return decide(self.name, request, table, chosen, scores=costs, score_name="cost")


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
        """Every worker's cost, in order."""
        return [float(c) for c in self.cost_array(request, WorkerTable.of(workers))]

    def cost_array(self, request: RequestView, table: WorkerTable) -> FloatArray:
        """Every candidate's cost, in table order."""
        bs = request.block_size
        num_tokens = request.num_tokens
        total_blocks = -(-num_tokens // bs)
        miss = self.cache_weight / bs
        dw = self.decode_weight
        # Same operations, same order as exact() with uncached = num_tokens and
        # new = total_blocks (see kv_costs).
        base = miss * num_tokens + dw * total_blocks
        costs: FloatArray = table.prefill_tokens / bs + dw * table.active_blocks + base

        def exact(view: WorkerView, uncached: int, new: int) -> float:
            return view.prefill_tokens / bs + miss * uncached + dw * (view.active_blocks + new)

        _correct(costs, request, table, exact)
        return costs

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        table = WorkerTable.of(workers)
        costs = self.cost_array(request, table)
        chosen = pick_tied(
            costs, higher_is_better=False, request=request, workers=table, rng=self._rng
        )
        return decide(self.name, request, table, chosen, scores=costs, score_name="cost")


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
        table = WorkerTable.of(workers)
        # Without a cached prefix the hit rate is 0: 0.0 * w_cache - load * w_load.
        scores: FloatArray = 0.0 * w_cache - table.load * w_load
        pos = table.positions
        for worker in request.overlaps:
            i = pos.get(worker)
            if i is not None:
                scores[i] = request.hit_rate(worker) * w_cache - table[i].load * w_load
        chosen = pick_tied(
            scores, higher_is_better=True, request=request, workers=table, rng=self._rng
        )
        return decide(self.name, request, table, chosen, scores=scores, score_name="score")


def _pick(override: float | None, default: float) -> float:
    return default if override is None else override


def _check_non_negative(**values: float) -> None:
    for key, value in values.items():
        if not value >= 0:  # also rejects NaN
            raise ConfigError(f"{key} must be >= 0, got {value}")
