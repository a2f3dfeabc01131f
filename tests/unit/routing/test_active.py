"""ActiveSequences: per-worker prefill tokens and deduplicated blocks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.clock import ManualClock
from kvrouter.events.model import WorkerKey
from kvrouter.routing.active import ActiveSequences, ActiveStats, WorkerLoad

W0, W1 = WorkerKey(0), WorkerKey(1)


def test_blocks_are_shared_by_sequence_hash_and_reference_counted() -> None:
    active = ActiveSequences(clock=ManualClock())
    active.add_request("a", W0, [1, 2, 3], num_prefill_tokens=48, num_private_blocks=1)
    active.add_request("b", W0, [1, 2, 4], num_prefill_tokens=16)
    active.add_request("c", W1, [1, 2], num_prefill_tokens=32)
    assert active.load(W0) == WorkerLoad(prefill_tokens=64, active_blocks=5, num_requests=2)
    assert active.load(W1) == WorkerLoad(prefill_tokens=32, active_blocks=2, num_requests=1)
    assert active.num_shared_blocks(W0, [1, 2, 9]) == 2
    assert active.num_shared_blocks(W1, [3]) == 0
    assert active.free("a")
    assert active.load(W0) == WorkerLoad(prefill_tokens=16, active_blocks=3, num_requests=1)
    assert not active.free("a")  # idempotent
    assert active.worker_of("b") == W0
    assert "a" not in active and "b" in active


def test_prefill_done_once() -> None:
    active = ActiveSequences(clock=ManualClock())
    active.add_request("a", W0, [1, 2], num_prefill_tokens=32)
    assert active.mark_prefill_done("a")
    assert not active.mark_prefill_done("a")
    assert not active.mark_prefill_done("missing")
    assert active.load(W0) == WorkerLoad(0, 2, 1)
    assert active.free("a")
    assert active.load(W0) == WorkerLoad(0, 0, 0)


def test_misuse_raises() -> None:
    active = ActiveSequences(clock=ManualClock())
    active.add_request("a", W0, [1], num_prefill_tokens=16)
    with pytest.raises(ValueError, match="already active"):
        active.add_request("a", W1, [1], num_prefill_tokens=16)
    with pytest.raises(ValueError, match=">= 0"):
        active.add_request("b", W1, [1], num_prefill_tokens=-1)
    with pytest.raises(ValueError, match="expiry_s"):
        ActiveSequences(expiry_s=0)


def test_expiry_frees_lost_requests() -> None:
    clock = ManualClock()
    active = ActiveSequences(clock=clock, expiry_s=10.0)
    active.add_request("old", W0, [1, 2], num_prefill_tokens=32)
    clock.advance(6.0)
    active.add_request("young", W0, [1, 3], num_prefill_tokens=16)
    clock.advance(4.0)  # "old" is exactly 10 s old
    assert active.expire() == 1
    assert "old" not in active and "young" in active
    assert active.load(W0) == WorkerLoad(16, 2, 1)
    clock.advance(6.0)
    active.add_request("new", W1, [5], num_prefill_tokens=16)  # adding expires too
    assert "young" not in active
    assert active.stats() == ActiveStats(
        num_requests=1,
        num_prefill_tokens=16,
        num_active_blocks=1,
        num_workers=1,
        num_added=3,
        num_freed=0,
        num_expired=2,
    )
    assert not active.free("old")  # the late completion is harmless


def test_remove_worker_drops_its_requests() -> None:
    active = ActiveSequences(clock=ManualClock())
    active.add_request("a", W0, [1], num_prefill_tokens=16)
    active.add_request("b", W1, [1], num_prefill_tokens=16)
    assert active.remove_worker(W0) == 1
    assert active.load(W0) == WorkerLoad(0, 0, 0)
    assert active.stats().num_requests == 1


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(0, 9),  # request id
            st.integers(0, 2),  # worker
            st.lists(st.integers(0, 6), max_size=6),  # seq hashes, drawn from a small pool
            st.integers(0, 500),  # prefill tokens
            st.integers(0, 2),  # private blocks
        ),
        st.tuples(st.just("prefill"), st.integers(0, 9)),
        st.tuples(st.just("free"), st.integers(0, 9)),
        st.tuples(st.just("tick"), st.integers(0, 5)),
    ),
    max_size=60,
)


# Prompts over the same small pool of hashes: a query's first block is often held at
# another position of some request's chain, and the held sets are not prefix-closed.
_QUERIES: tuple[list[int], ...] = ([0, 1, 2, 3], [3, 4], [6, 0, 1], [5], [])


def _naive_shared(model: dict[str, list[Any]], seq: list[int]) -> dict[WorkerKey, int]:
    """shared_blocks() by visiting every worker: held = the union of its chains; the
    first block not held, found by the same bisection."""
    held_by: dict[WorkerKey, set[int]] = {}
    for worker, hashes, *_ in model.values():
        held_by.setdefault(worker, set()).update(hashes)
    out = {}
    for worker, held in held_by.items():
        if not seq or seq[0] not in held:
            continue
        lo, hi = 1, len(seq)
        while lo < hi:
            mid = (lo + hi) // 2
            if seq[mid] in held:
                lo = mid + 1
            else:
                hi = mid
        out[worker] = lo
    return out


@settings(max_examples=150, deadline=None)
@given(ops=_ops, expiry=st.sampled_from([None, 7.0]))
def test_matches_a_naive_model_and_returns_to_zero(
    ops: list[tuple[Any, ...]], expiry: float | None
) -> None:
    clock = ManualClock()
    active = ActiveSequences(clock=clock, expiry_s=expiry)
    # naive model: request id -> [worker, hashes, prefill, private, started]
    model: dict[str, list[Any]] = {}

    def expire_model() -> None:
        if expiry is not None:
            for rid in [r for r, v in model.items() if v[4] <= clock() - expiry]:
                del model[rid]

    for op in ops:
        if op[0] == "add":
            _, rid, w, hashes, prefill, private = op
            expire_model()
            if f"r{rid}" in model:
                with pytest.raises(ValueError):
                    active.add_request(f"r{rid}", WorkerKey(w), hashes, prefill)
                continue
            active.add_request(f"r{rid}", WorkerKey(w), hashes, prefill, num_private_blocks=private)
            model[f"r{rid}"] = [WorkerKey(w), set(hashes), prefill, private, clock()]
        elif op[0] == "prefill":
            done = active.mark_prefill_done(f"r{op[1]}")
            req = model.get(f"r{op[1]}")
            assert done == (req is not None and req[2] > 0)
            if req is not None:
                req[2] = 0
        elif op[0] == "free":
            assert active.free(f"r{op[1]}") == (model.pop(f"r{op[1]}", None) is not None)
        else:
            clock.advance(op[1])
        for w in range(3):
            reqs = [v for v in model.values() if v[0] == WorkerKey(w)]
            blocks = set().union(*(v[1] for v in reqs)) if reqs else set()
            expected = WorkerLoad(
                prefill_tokens=sum(v[2] for v in reqs),
                active_blocks=len(blocks) + sum(v[3] for v in reqs),
                num_requests=len(reqs),
            )
            if op[0] != "tick":  # ticks expire lazily, on the next mutation
                assert active.load(WorkerKey(w)) == expected
        if op[0] != "tick":
            for query in _QUERIES:
                assert active.shared_blocks(query) == _naive_shared(model, query)
    for rid in range(10):
        active.free(f"r{rid}")
    stats = active.stats()
    assert (
        stats.num_requests,
        stats.num_prefill_tokens,
        stats.num_active_blocks,
        stats.num_workers,
    ) == (0, 0, 0, 0)
    assert stats.num_added == stats.num_freed + stats.num_expired


def test_shared_blocks_walks_the_prefix_once() -> None:
    active = ActiveSequences(clock=ManualClock())
    active.add_request("a", W0, [1, 2, 3], num_prefill_tokens=0)
    active.add_request("b", W1, [1, 2], num_prefill_tokens=0)
    active.add_request("c", W1, [1, 2, 5], num_prefill_tokens=0)
    assert active.shared_blocks([1, 2, 3, 4]) == {W0: 3, W1: 2}
    assert active.shared_blocks([1, 2, 5]) == {W0: 2, W1: 3}
    assert active.shared_blocks([9, 1]) == {}  # block 0 held by nobody: nothing after it
    assert active.num_shared_blocks(W1, [1, 2, 5]) == 3
    # Block 2 is held (as the second block of chains) but starts none: still found.
    assert active.shared_blocks([2, 3]) == {W0: 2, W1: 1}
    active.free("a")
    assert active.shared_blocks([1, 2, 3]) == {W1: 2}
    assert active.shared_blocks([3]) == {}


def test_change_journal() -> None:
    active = ActiveSequences(clock=ManualClock())
    v0 = active.current_version
    assert active.changed_since(v0) == []
    active.add_request("a", W0, [1], num_prefill_tokens=16)
    v1 = active.current_version
    active.add_request("b", W1, [1], num_prefill_tokens=16)
    active.mark_prefill_done("a")
    assert active.changed_since(v0) == [W0, W1, W0]
    assert active.changed_since(v1) == [W1, W0]
    assert active.version(W0) == active.current_version
    for i in range(9000):  # the journal is trimmed; very old versions cannot be answered
        active.add_request(f"x{i}", W1, [], num_prefill_tokens=0)
        active.free(f"x{i}")
    assert active.changed_since(v0) is None
    assert active.changed_since(active.current_version - 1) == [W1]
