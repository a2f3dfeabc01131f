"""The vectorised policies choose exactly as the straightforward reference does.

Random fleets (small value ranges, so ties are common; sizes on both sides of
MAX_ROWS), seeded random number generators: the decisions must be equal field for
field, and both generators must have made the same draws.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.clock import ManualClock
from kvrouter.errors import AllWorkersBusy
from kvrouter.events.model import WorkerKey
from kvrouter.index import KvIndexer
from kvrouter.load.aggregator import KvMetricsAggregator
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.routing.policies import (
    MAX_ROWS,
    Decision,
    KvCostPolicy,
    LeastLoadedPolicy,
    Policy,
    PrefixAffinityPolicy,
    RequestView,
    RoutingOverrides,
    ScorePolicy,
    WorkerTable,
    WorkerView,
)
from kvrouter.routing.scheduler import BusyThresholds, KvScheduler, ScheduleRequest
from tests.unit.routing import reference

BLOCK_SIZE = 16
# Loads that tie exactly, within the tie tolerance (1e-9), and just outside it.
LOADS = [None, 0.0, 0.25, 0.25 + 1e-12, 0.25 + 3e-9, 0.5]
Reference = Callable[[RequestView, Sequence[WorkerView], random.Random], Decision]


@dataclass(frozen=True)
class Fleet:
    request: RequestView
    views: list[WorkerView]


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    num = draw(st.integers(1, 2 * MAX_ROWS + 8))
    keys = [WorkerKey(i // 2, i % 2) for i in range(num + 3)]  # 3 non-candidates
    views = [
        WorkerView(
            key,
            prefill_tokens=draw(st.sampled_from([0, 16, 40, 100])),
            active_blocks=draw(st.integers(0, 5)),
            total_blocks=draw(st.sampled_from([None, 8, 16])),
            reported_load=draw(st.sampled_from(LOADS)),
        )
        for key in keys[:num]
    ]
    num_tokens = draw(st.sampled_from([0, 5, 64, 70]))
    num_blocks = num_tokens // BLOCK_SIZE
    some = st.lists(st.sampled_from(keys), max_size=12, unique=True)
    overlaps = {k: draw(st.integers(0, num_blocks)) for k in draw(some)}
    shared = {k: draw(st.integers(0, 5)) for k in draw(some)}
    trees = {k: draw(st.integers(0, 2)) for k in draw(some)}
    overrides = draw(
        st.sampled_from(
            [
                None,
                RoutingOverrides(overlap_weight=0.3),
                RoutingOverrides(temperature=0.5),
                RoutingOverrides(weight_cache=2.0, weight_load=0.7),
            ]
        )
    )
    request = RequestView(
        "r",
        num_tokens=num_tokens,
        num_blocks=num_blocks,
        overlaps=overlaps,
        block_size=BLOCK_SIZE,
        overrides=overrides,
        shared_active=shared,
        tree_sizes=trees,
    )
    return Fleet(request, views)


def _cases(seed: int) -> list[tuple[Policy, Reference]]:
    rng = random.Random(seed)
    return [
        (KvCostPolicy(rng=rng), reference.kv),
        (
            KvCostPolicy(overlap_weight=0.7, temperature=0.3, rng=rng),
            lambda r, w, g: reference.kv(r, w, g, overlap_weight=0.7, temperature=0.3),
        ),
        (PrefixAffinityPolicy(rng=rng), reference.prefix_affinity),
        (
            PrefixAffinityPolicy(cache_weight=3.0, decode_weight=0.5, rng=rng),
            lambda r, w, g: reference.prefix_affinity(r, w, g, cache_weight=3.0, decode_weight=0.5),
        ),
        (ScorePolicy(rng=rng), reference.score),
        (ScorePolicy(weight_cache=0.0, weight_load=0.0, rng=rng), _score_zero),
        (LeastLoadedPolicy(rng=rng), reference.least_loaded),
    ]


def _score_zero(r: RequestView, w: Sequence[WorkerView], g: random.Random) -> Decision:
    return reference.score(r, w, g, weight_cache=0.0, weight_load=0.0)


def _stale_table(views: list[WorkerView]) -> WorkerTable:
    """A table built from other load and then brought up to date row by row, as the
    scheduler does."""
    table = WorkerTable(WorkerView(v.worker, prefill_tokens=7, active_blocks=99) for v in views)
    for view in reversed(views):
        table.update(view)
    return table


@settings(max_examples=200, deadline=None)
@given(fleet=fleets(), seed=st.integers(0, 2**16))
def test_policies_decide_as_the_reference(fleet: Fleet, seed: int) -> None:
    inputs: list[Sequence[WorkerView]] = [
        fleet.views,
        WorkerTable(fleet.views),
        _stale_table(fleet.views),
    ]
    for index, (_, ref) in enumerate(_cases(seed)):
        for workers in inputs:
            policy = _cases(seed)[index][0]  # a fresh policy, seeded alike
            ours, theirs = random.Random(seed), random.Random(seed)
            policy._rng = ours  # type: ignore[attr-defined]
            for _ in range(3):  # repeated calls keep drawing alike
                got = policy(fleet.request, workers)
                want = ref(fleet.request, fleet.views, theirs)
                assert got == want
            assert ours.getstate() == theirs.getstate()


def test_many_ties_on_a_large_fleet_draw_alike() -> None:
    # 1,024 idle workers, two hold the prompt equally: a tie on the tree sizes too.
    views = [WorkerView(WorkerKey(i), total_blocks=100) for i in range(1024)]
    request = RequestView(
        "r",
        num_tokens=64,
        num_blocks=4,
        overlaps={WorkerKey(5): 4, WorkerKey(900): 4, WorkerKey(77): 2},
        block_size=16,
        tree_sizes={WorkerKey(5): 3, WorkerKey(900): 3},
    )
    table = WorkerTable(views)
    picks = set()
    for seed in range(40):
        got = KvCostPolicy(rng=random.Random(seed))(request, table)
        want = reference.kv(request, views, random.Random(seed))
        assert got == want
        picks.add(got.worker)
    assert picks == {WorkerKey(5), WorkerKey(900)}
    # Without a cached prefix, all 1,024 tie: the rows are the chosen one and the
    # first 15 others in worker order.
    idle = RequestView("r", num_tokens=64, num_blocks=4, overlaps={}, block_size=16)
    got = KvCostPolicy(rng=random.Random(1))(idle, table)
    assert got == reference.kv(idle, views, random.Random(1))
    assert len(got.candidates) == MAX_ROWS
    assert got.num_candidates == 1024


# -- the scheduler keeps its candidate table in step ---------------------------------


class _ReferencePolicy:
    """Runs a reference policy on a plain list copy of the candidates."""

    def __init__(self, name: str, ref: Reference, rng: random.Random) -> None:
        self.name = name
        self._ref = ref
        self._rng = rng

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        return self._ref(request, list(workers), self._rng)


class _RebuildingScheduler(KvScheduler):
    """Rebuilds every view and the candidate table for every request."""

    def _update_views(self) -> None:
        self._views_valid = False
        super()._update_views()


def _scheduler(
    policy: Policy | str, seed: int, cls: type[KvScheduler] = KvScheduler
) -> tuple[KvScheduler, KvMetricsAggregator]:
    clock = ManualClock()
    aggregator = KvMetricsAggregator(clock=clock)
    sched = cls(
        KvIndexer(block_size=BLOCK_SIZE, clock=clock),
        aggregator,
        policy=policy,
        block_size=BLOCK_SIZE,
        clock=clock,
        rng=random.Random(seed),
        busy=BusyThresholds(max_prefill_tokens=40),
    )
    for i in range(MAX_ROWS + 6):
        sched.add_worker(WorkerKey(i), total_blocks=64)
    return sched, aggregator


def _run(sched: KvScheduler, aggregator: KvMetricsAggregator, seed: int) -> list[object]:
    """Random schedule / first token / finish / metrics steps; what each step returned."""
    rng = random.Random(seed)
    prompts = [[p] * (BLOCK_SIZE * 2) + [p * 100 + i for i in range(20)] for p in range(3)]
    live: list[str] = []
    out: list[object] = []
    for step in range(150):
        action = rng.random()
        if action < 0.5 or not live:
            request_id = f"r{step}"
            prompt = rng.choice(prompts)[: rng.randrange(1, 53)]
            try:
                out.append(sched.schedule(ScheduleRequest(request_id, token_ids=prompt)))
                live.append(request_id)
            except AllWorkersBusy as exc:
                out.append(str(exc))
        elif action < 0.7:
            out.append(sched.on_first_token(rng.choice(live)))
        elif action < 0.9:
            out.append(sched.on_finish(live.pop(rng.randrange(len(live)))))
        else:
            usage = rng.choice([0.0, 0.3, 0.6])
            aggregator.update(
                ForwardPassMetrics(worker_id=rng.randrange(4), gpu_cache_usage_perc=usage)
            )
    return out


def test_scheduler_decides_as_the_reference_on_fresh_lists() -> None:
    names: dict[str, Reference] = {
        "kv": reference.kv,
        "prefix_affinity": reference.prefix_affinity,
        "score": reference.score,
        "least_loaded": reference.least_loaded,
    }
    for seed in range(4):
        for name, ref in names.items():
            ours, agg_ours = _scheduler(name, seed)
            policy = _ReferencePolicy(name, ref, random.Random(seed))
            theirs, agg_theirs = _scheduler(policy, seed, _RebuildingScheduler)
            got = _run(ours, agg_ours, seed)
            assert got == _run(theirs, agg_theirs, seed)
            sizes = {x.num_candidates for x in got if isinstance(x, Decision)}
            # Large-fleet rows, and workers that went busy and came back.
            assert max(sizes) == MAX_ROWS + 6
            assert min(sizes) < MAX_ROWS + 6
