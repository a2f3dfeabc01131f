"""The prefix_affinity policy: the cost model with misses weighed more, by hand."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.errors import ConfigError
from kvrouter.events.model import WorkerKey
from kvrouter.routing.policies import (
    POLICY_NAMES,
    KvCostPolicy,
    PrefixAffinityPolicy,
    RequestView,
    WorkerView,
    make_policy,
)

W1, W2, W3 = WorkerKey(1), WorkerKey(2), WorkerKey(3)


def _request(**overlaps: int) -> RequestView:
    # 64 tokens = 4 blocks of 16; overlaps given as w1=.., w3=..
    return RequestView(
        "r",
        num_tokens=64,
        num_blocks=4,
        overlaps={WorkerKey(int(k[1:])): v for k, v in overlaps.items()},
        block_size=16,
    )


def test_registered_and_made_by_name() -> None:
    assert "prefix_affinity" in POLICY_NAMES
    policy = make_policy("prefix_affinity", cache_weight=2.0, rng=random.Random(0))
    assert isinstance(policy, PrefixAffinityPolicy)
    assert policy.cache_weight == 2.0
    assert policy.decode_weight == 1.0
    with pytest.raises(ConfigError):
        make_policy("prefix_affinity", cache_weight=-1.0)
    with pytest.raises(ConfigError):
        make_policy("prefix_affinity", overlap_weight=1.0)


def test_cost_by_hand_and_the_cached_worker_wins() -> None:
    request = _request(w1=3)
    views = [
        WorkerView(W1, prefill_tokens=64, active_blocks=10),
        WorkerView(W2, prefill_tokens=0, active_blocks=4),
    ]
    # W1: 64/16 + 4*16/16 + (10 + 4) = 4 + 4 + 14 = 22
    # W2: 0 + 4*64/16 + (4 + 4) = 16 + 8 = 24
    decision = PrefixAffinityPolicy(cache_weight=4.0)(request, views)
    assert [c.score for c in decision.candidates] == [22.0, 24.0]
    assert decision.worker == W1
    assert decision.policy == "prefix_affinity"
    assert decision.score_name == "cost"
    # kv, charging a miss once, prefers the idle worker: W1 4+1+14=19, W2 4+8=12
    assert KvCostPolicy()(request, views).worker == W2


def test_load_still_wins_over_a_small_hit() -> None:
    request = _request(w1=1)
    views = [
        WorkerView(W1, prefill_tokens=16 * 40, active_blocks=0),
        WorkerView(W2, prefill_tokens=0, active_blocks=0),
    ]
    # W1: 40 + 4*48/16 + 4 = 56; W2: 0 + 16 + 4 = 20
    decision = PrefixAffinityPolicy(cache_weight=4.0)(request, views)
    assert [c.score for c in decision.candidates] == [56.0, 20.0]
    assert decision.worker == W2


def test_shared_active_blocks_are_not_new() -> None:
    request = RequestView(
        "r", num_tokens=64, num_blocks=4, overlaps={}, block_size=16, shared_active={W1: 4}
    )
    views = [WorkerView(W1, active_blocks=4), WorkerView(W2, active_blocks=1)]
    # W1: 0 + 2*64/16 + (4 + 0) = 12; W2: 0 + 8 + (1 + 4) = 13
    decision = PrefixAffinityPolicy(cache_weight=2.0)(request, views)
    assert [c.score for c in decision.candidates] == [12.0, 13.0]
    assert decision.worker == W1


def test_ties_go_to_the_smaller_tree() -> None:
    request = RequestView(
        "r", num_tokens=64, num_blocks=4, overlaps={}, block_size=16, tree_sizes={W1: 9, W2: 3}
    )
    decision = PrefixAffinityPolicy()(request, [WorkerView(W1), WorkerView(W2)])
    assert decision.candidates[0].score == decision.candidates[1].score
    assert decision.worker == W2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 4),  # overlap blocks
            st.integers(0, 2000),  # queued prefill tokens
            st.integers(0, 300),  # active blocks
            st.integers(0, 4),  # shared active blocks
        ),
        min_size=1,
        max_size=6,
    )
)
def test_with_unit_weights_it_ranks_exactly_as_kv(
    rows: list[tuple[int, int, int, int]],
) -> None:
    workers = [WorkerKey(i) for i in range(len(rows))]
    request = RequestView(
        "r",
        num_tokens=70,
        num_blocks=4,
        overlaps={w: r[0] for w, r in zip(workers, rows, strict=True) if r[0]},
        block_size=16,
        shared_active={w: r[3] for w, r in zip(workers, rows, strict=True) if r[3]},
    )
    views = [
        WorkerView(w, prefill_tokens=r[1], active_blocks=r[2])
        for w, r in zip(workers, rows, strict=True)
    ]
    affinity = PrefixAffinityPolicy(cache_weight=1.0, decode_weight=1.0).costs(request, views)
    kv = KvCostPolicy.costs(request, views, 1.0)
    assert affinity == pytest.approx(kv)
