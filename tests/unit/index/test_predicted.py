"""Predicted entries (approximate mode): TTL, refresh, supersession, pruning order."""

from __future__ import annotations

import pytest

from kvrouter.clock import ManualClock
from kvrouter.events.model import WorkerKey
from kvrouter.hashing import compute_sequence_hashes
from kvrouter.index import KvIndexer

from .helpers import cleared, removed, stored

W1 = WorkerKey(1, 0)
W2 = WorkerKey(2, 0)


def make(clock: ManualClock, **kwargs: float) -> KvIndexer:
    return KvIndexer(block_size=16, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_predicted_blocks_count_and_expire_after_ttl() -> None:
    clock = ManualClock()
    indexer = make(clock, predicted_ttl_s=10.0)
    indexer.add_predicted(W1, [1, 2, 3])
    scores = indexer.find_matches([1, 2, 3, 4])
    assert (scores.scores, scores.tree_sizes) == ({W1: 3}, {W1: 3})
    clock.advance(9.999)
    assert indexer.find_matches([1, 2]).scores == {W1: 2}
    clock.advance(0.001)  # expiry is inclusive: now >= added + ttl
    assert indexer.find_matches([1, 2]).scores == {}
    stats = indexer.stats()
    assert (stats.num_predicted, stats.predicted_added, stats.predicted_expired) == (0, 3, 3)
    assert stats.num_blocks == 0


def test_explicit_ttl_and_refresh() -> None:
    clock = ManualClock()
    indexer = make(clock, predicted_ttl_s=100.0)
    indexer.add_predicted(W1, [1, 2], ttl_s=5.0)
    clock.advance(4.0)
    indexer.add_predicted(W1, [1], ttl_s=5.0)  # block 1 now lives until t=9
    clock.advance(1.0)
    assert indexer.find_matches([1, 2]).scores == {W1: 1}
    clock.advance(4.0)
    assert indexer.find_matches([1, 2]).scores == {}
    with pytest.raises(ValueError, match="ttl_s"):
        indexer.add_predicted(W1, [1], ttl_s=0.0)


def test_predicted_and_real_blocks_combine_in_one_walk() -> None:
    clock = ManualClock()
    indexer = make(clock)
    indexer.apply_event(stored(W1, 0, [], [1, 2]))
    indexer.add_predicted(W1, [1, 2, 3, 4])
    assert indexer.stats().num_predicted == 2  # blocks 1, 2 are real already
    assert indexer.find_matches([1, 2, 3, 4]).scores == {W1: 4}
    clock.advance(200.0)
    assert indexer.find_matches([1, 2, 3, 4]).scores == {W1: 2}


def test_real_event_supersedes_prediction() -> None:
    clock = ManualClock()
    indexer = make(clock, predicted_ttl_s=5.0)
    indexer.add_predicted(W1, [1, 2])
    indexer.apply_event(stored(W1, 0, [], [1, 2]))
    stats = indexer.stats()
    assert (stats.num_predicted, stats.predicted_superseded, stats.num_entries) == (0, 2, 2)
    clock.advance(10.0)
    assert indexer.find_matches([1, 2]).scores == {W1: 2}
    # And a real removal removes it for good.
    indexer.apply_event(removed(W1, 1, [[1, 2]]))
    assert indexer.find_matches([1, 2]).scores == {W1: 1}


def test_predictions_are_per_worker_and_dropped_by_clear_and_reset() -> None:
    clock = ManualClock()
    indexer = make(clock)
    indexer.add_predicted(W1, [1, 2])
    indexer.add_predicted(W2, [1])
    assert indexer.find_matches([1, 2]).scores == {W1: 2, W2: 1}
    indexer.apply_event(cleared(W1, 0))
    assert indexer.find_matches([1, 2]).scores == {W2: 1}
    indexer.reset_worker(W2)
    assert indexer.find_matches([1, 2]).scores == {}
    indexer.add_predicted(W2, [1])
    indexer.remove_worker(2)
    stats = indexer.stats()
    assert (stats.num_predicted, stats.num_blocks, stats.num_workers) == (0, 0, 1)


def test_pruning_drops_oldest_first_to_the_target_ratio() -> None:
    clock = ManualClock()
    indexer = make(clock, max_predicted_blocks=10, prune_target_ratio=0.5)
    for i in range(10):  # ten one-block prompts, oldest first
        indexer.add_predicted(W1, [100 + i])
        clock.advance(1.0)
    indexer.add_predicted(W1, [100])  # refreshed: now the youngest
    assert indexer.stats().num_predicted == 10
    indexer.add_predicted(W2, [200])  # 11 > 10: prune down to 5
    alive = {i for i in range(10) if indexer.find_matches([100 + i]).scores}
    assert alive == {0, 7, 8, 9}
    assert indexer.find_matches([200]).scores == {W2: 1}
    stats = indexer.stats()
    assert (stats.num_predicted, stats.predicted_pruned) == (5, 6)


def test_stale_heap_entries_are_compacted() -> None:
    clock = ManualClock()
    indexer = make(clock)
    for _ in range(1500):  # each refresh leaves a stale heap entry
        indexer.add_predicted(W1, [1])
    assert len(indexer._pred_heap) <= 2 * 1 + 1024
    clock.advance(121.0)
    assert indexer.find_matches([1]).scores == {}


def test_predicted_keys_are_sequence_hashes() -> None:
    # A prediction and a real chain of the same local hashes are the same blocks.
    clock = ManualClock()
    indexer = make(clock)
    indexer.add_predicted(W1, [7, 8])
    assert sorted(indexer._gpu_nodes) == sorted(compute_sequence_hashes([7, 8]))
