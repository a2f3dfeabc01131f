"""Straightforward reference policies: one Python-level row per worker, a full stable
sort, a walk over the ranking for ties.

This is how ``kv``, ``prefix_affinity``, ``score`` and ``least_loaded`` chose before
they were vectorised; the equivalence tests hold the real policies to it, decision
for decision and random draw for random draw.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from kvrouter.routing.cost import _softmax_sample
from kvrouter.routing.views import MAX_ROWS, CandidateScore, Decision, RequestView, WorkerView

_TIE_TOL = 1e-9


def kv_costs(request: RequestView, workers: Sequence[WorkerView], weight: float) -> list[float]:
    """Every worker's ``kv`` cost; a worker with no overlap and nothing shared uses the
    prompt-wide terms (the same floating-point operations as before)."""
    bs = request.block_size
    num_tokens = request.num_tokens
    total_blocks = -(-num_tokens // bs)
    w = weight / bs
    base = w * num_tokens + total_blocks
    out = []
    for v in workers:
        worker = v.worker
        if worker in request.overlaps or worker in request.shared_active:
            uncached = max(0, num_tokens - request.overlaps.get(worker, 0) * bs)
            new = max(0, total_blocks - request.shared_active.get(worker, 0))
            out.append(w * (v.prefill_tokens + uncached) + v.active_blocks + new)
        else:
            out.append(w * v.prefill_tokens + v.active_blocks + base)
    return out


def affinity_costs(
    request: RequestView, workers: Sequence[WorkerView], cache_weight: float, dw: float
) -> list[float]:
    """Every worker's ``prefix_affinity`` cost (same operations as before)."""
    bs = request.block_size
    num_tokens = request.num_tokens
    total_blocks = -(-num_tokens // bs)
    miss = cache_weight / bs
    base = miss * num_tokens + dw * total_blocks
    out = []
    for v in workers:
        worker = v.worker
        if worker in request.overlaps or worker in request.shared_active:
            uncached = max(0, num_tokens - request.overlaps.get(worker, 0) * bs)
            new = max(0, total_blocks - request.shared_active.get(worker, 0))
            out.append(v.prefill_tokens / bs + miss * uncached + dw * (v.active_blocks + new))
        else:
            out.append(v.prefill_tokens / bs + dw * v.active_blocks + base)
    return out


def ranked(values: Sequence[float], higher_is_better: bool) -> list[int]:
    return sorted(range(len(values)), key=values.__getitem__, reverse=higher_is_better)


def pick_tied(
    values: Sequence[float],
    order: Sequence[int],
    request: RequestView,
    workers: Sequence[WorkerView],
    rng: random.Random,
) -> int:
    best = values[order[0]]
    tied = []
    for i in order:
        if abs(values[i] - best) > _TIE_TOL:
            break
        tied.append(i)
    if len(tied) == 1:
        return tied[0]
    tied.sort()
    tree = [request.tree_sizes.get(workers[i].worker, 0) for i in tied]
    smallest = min(tree)
    tied = [i for i, t in zip(tied, tree, strict=True) if t == smallest]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def decide(
    policy: str,
    request: RequestView,
    workers: Sequence[WorkerView],
    chosen: int,
    scores: Sequence[float],
    score_name: str,
    order: Sequence[int],
) -> Decision:
    if len(workers) <= MAX_ROWS:
        shown = list(range(len(workers)))
    else:
        best = [i for i in order[:MAX_ROWS] if i != chosen][: MAX_ROWS - 1]
        shown = sorted([chosen, *best])
    bs = request.block_size
    rows = tuple(
        CandidateScore(
            worker=workers[i].worker,
            overlap_blocks=request.overlap(workers[i].worker),
            hit_rate=request.hit_rate(workers[i].worker),
            load=workers[i].load,
            prefill_blocks=(workers[i].prefill_tokens + request.uncached_tokens(workers[i].worker))
            / bs,
            decode_blocks=float(workers[i].active_blocks + request.new_blocks(workers[i].worker)),
            score=scores[i],
            selected=i == chosen,
        )
        for i in shown
    )
    worker = workers[chosen].worker
    return Decision(
        request_id=request.request_id,
        worker=worker,
        policy=policy,
        candidates=rows,
        score_name=score_name,
        num_blocks=request.num_blocks,
        overlap_blocks=request.overlap(worker),
        num_candidates=len(workers),
    )


def kv(
    request: RequestView,
    workers: Sequence[WorkerView],
    rng: random.Random,
    overlap_weight: float = 1.0,
    temperature: float = 0.0,
) -> Decision:
    o = request.overrides
    if o is not None and o.overlap_weight is not None:
        overlap_weight = o.overlap_weight
    if o is not None and o.temperature is not None:
        temperature = o.temperature
    costs = kv_costs(request, workers, overlap_weight)
    order = ranked(costs, higher_is_better=False)
    if temperature > 0:
        chosen = _softmax_sample(costs, temperature, rng)
    else:
        chosen = pick_tied(costs, order, request, workers, rng)
    return decide("kv", request, workers, chosen, costs, "cost", order)


def prefix_affinity(
    request: RequestView,
    workers: Sequence[WorkerView],
    rng: random.Random,
    cache_weight: float = 16.0,
    decode_weight: float = 1.0,
) -> Decision:
    costs = affinity_costs(request, workers, cache_weight, decode_weight)
    order = ranked(costs, higher_is_better=False)
    chosen = pick_tied(costs, order, request, workers, rng)
    return decide("prefix_affinity", request, workers, chosen, costs, "cost", order)


def score(
    request: RequestView,
    workers: Sequence[WorkerView],
    rng: random.Random,
    weight_cache: float = 1.0,
    weight_load: float = 1.0,
) -> Decision:
    o = request.overrides
    if o is not None and o.weight_cache is not None:
        weight_cache = o.weight_cache
    if o is not None and o.weight_load is not None:
        weight_load = o.weight_load
    scores = [request.hit_rate(v.worker) * weight_cache - v.load * weight_load for v in workers]
    order = ranked(scores, higher_is_better=True)
    chosen = pick_tied(scores, order, request, workers, rng)
    return decide("score", request, workers, chosen, scores, "score", order)


def least_loaded(
    request: RequestView, workers: Sequence[WorkerView], rng: random.Random
) -> Decision:
    keys = [(v.load, v.prefill_tokens, v.active_blocks) for v in workers]
    best = min(keys)
    tied = [i for i, k in enumerate(keys) if k == best]
    chosen = tied[0] if len(tied) == 1 else rng.choice(tied)
    loads = [v.load for v in workers]
    order = ranked(loads, higher_is_better=False)
    return decide("least_loaded", request, workers, chosen, loads, "load", order)
