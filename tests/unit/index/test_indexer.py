"""Exact-state tests of KvIndexer: events, matching, tiers, rejections, workers."""

from __future__ import annotations

import logging

import pytest

from kvrouter.events.model import Removed, RouterEvent, Stored, StoredBlock, WorkerKey
from kvrouter.hashing import compute_block_hashes
from kvrouter.index import REJECT_KINDS, IndexerStats, KvIndexer, OverlapScores

from .helpers import cleared, engine_hash, removed, stored

W1 = WorkerKey(1, 0)
W2 = WorkerKey(2, 0)
W1R1 = WorkerKey(1, 1)


def rejected(indexer: KvIndexer) -> dict[str, int]:
    return {kind: n for kind, n in indexer.stats().rejected.items() if n}


class FakeSource:
    def __init__(self) -> None:
        self.callbacks: list[object] = []

    def add_listener(self, callback: object) -> None:
        self.callbacks.append(callback)


def test_registers_with_listener() -> None:
    source = FakeSource()
    indexer = KvIndexer(source, block_size=16)
    assert source.callbacks == [indexer.apply_event]


def test_stored_chain_from_root_and_with_parent() -> None:
    indexer = KvIndexer()
    assert indexer.apply_event(stored(W1, 0, [], [10, 11]))
    assert indexer.apply_event(stored(W1, 1, [10, 11], [12]))
    assert indexer.find_matches([10, 11, 12, 13]).scores == {W1: 3}
    assert indexer.find_matches([10, 11, 99]).scores == {W1: 2}
    assert indexer.find_matches([11, 12]).scores == {}
    assert indexer.find_matches([]).scores == {}


def test_scores_per_worker_and_tree_sizes() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1, 2, 3, 4]))
    indexer.apply_event(stored(W2, 0, [], [1, 2]))
    indexer.apply_event(stored(W2, 1, [], [7]))
    scores = indexer.find_matches([1, 2, 3, 4, 5])
    assert scores == OverlapScores({W2: 2, W1: 4}, {}, {W1: 4, W2: 3})
    assert indexer.find_matches([7, 1]).scores == {W2: 1}
    assert indexer.tree_size(W1) == 4
    assert indexer.tree_size(WorkerKey(9)) == 0


def test_worker_holding_child_without_parent_scores_only_the_prefix() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1, 2, 3]))
    assert indexer.apply_event(removed(W1, 1, [[1, 2]]))
    # Block 3 is still held but no longer reachable from the start.
    assert indexer.find_matches([1, 2, 3]).scores == {W1: 1}
    assert indexer.stats().num_entries == 2


def test_removed_and_cleared() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1, 2]))
    indexer.apply_event(stored(W2, 0, [], [1, 2]))
    assert indexer.apply_event(removed(W1, 1, [[1, 2]]))
    assert indexer.find_matches([1, 2]).scores == {W1: 1, W2: 2}
    assert indexer.apply_event(cleared(W2, 1))
    assert indexer.find_matches([1, 2]).scores == {W1: 1}
    assert indexer.apply_event(removed(W1, 2, [[1]]))
    assert indexer.find_matches([1, 2]).scores == {}
    stats = indexer.stats()
    assert (stats.num_blocks, stats.num_entries, stats.num_workers) == (0, 0, 2)
    assert (stats.blocks_stored, stats.blocks_removed, stats.events_applied) == (4, 2, 5)


def test_dp_ranks_are_separate_caches() -> None:
    indexer = KvIndexer(block_size=2)
    indexer.apply_event(stored(W1, 0, [], [1]))
    indexer.apply_event(stored(W1R1, 0, [], [1, 2]))
    assert indexer.find_matches([1, 2]).scores == {W1: 1, W1R1: 2}
    assert indexer.workers() == [W1, W1R1]
    assert indexer.last_event_id(W1R1) == 0


def test_find_matches_for_request_hashes_tokens_and_takes_best_rank() -> None:
    indexer = KvIndexer(block_size=2)
    tokens = [5, 6, 7, 8, 9]
    local = compute_block_hashes(tokens, 2)
    indexer.apply_event(stored(W1, 0, [], local[:1]))
    indexer.apply_event(stored(W1R1, 0, [], local))
    indexer.apply_event(stored(W2, 0, [], compute_block_hashes(tokens, 2, salt="lora-a")))
    assert indexer.find_matches_for_request(tokens) == {1: 2}
    assert indexer.find_matches_for_request(tokens, salt="lora-a") == {2: 2}


def test_same_block_twice_is_idempotent_and_duplicate_content_is_counted() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1]))
    assert indexer.apply_event(stored(W1, 1, [], [1]))  # same engine hash again
    assert indexer.stats().num_entries == 1
    # Another engine hash for the same content (e.g. a second KV cache group).
    other = Stored(None, (StoredBlock(12345, 1),))
    assert indexer.apply_event(RouterEvent(1, 0, 2, other))
    assert indexer.apply_event(removed(W1, 3, [[1]]))
    assert indexer.find_matches([1]).scores == {W1: 1}
    assert indexer.apply_event(RouterEvent(1, 0, 4, Removed((12345,))))
    assert indexer.find_matches([1]).scores == {}


def test_engine_hash_reused_for_other_content_replaces_the_block() -> None:
    indexer = KvIndexer()
    indexer.apply_event(RouterEvent(1, 0, 0, Stored(None, (StoredBlock(5, 100),))))
    indexer.apply_event(RouterEvent(1, 0, 1, Stored(None, (StoredBlock(5, 200),))))
    assert indexer.find_matches([100]).scores == {}
    assert indexer.find_matches([200]).scores == {W1: 1}
    assert indexer.stats().num_blocks == 1


# ---------------------------------------------------------------- tiers


def test_tiers_are_kept_apart() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1, 2]))
    indexer.apply_event(stored(W2, 0, [], [1, 2, 3], medium="CPU"))
    scores = indexer.find_matches([1, 2, 3])
    assert scores.scores == {W1: 2}
    assert scores.tiers == {"CPU": {W2: 3}}
    assert scores.tree_sizes == {W1: 2}
    stats = indexer.stats()
    assert stats.entries_by_medium == {"CPU": 3, "GPU": 2}
    assert (stats.num_blocks, stats.num_entries) == (5, 5)


def test_removed_on_one_medium_leaves_the_other() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1, 2]))
    indexer.apply_event(stored(W1, 1, [], [1, 2], medium="CPU"))
    assert indexer.apply_event(removed(W1, 2, [[1, 2]], medium="GPU"))
    scores = indexer.find_matches([1, 2])
    assert (scores.scores, scores.tiers) == ({W1: 1}, {"CPU": {W1: 2}})
    # The GPU hash is gone, so removing it again is unknown there.
    assert not indexer.apply_event(removed(W1, 3, [[1, 2]], medium="GPU"))
    assert indexer.find_matches([1, 2]).tiers == {"CPU": {W1: 2}}


def test_offloaded_block_may_chain_on_a_device_parent() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1]))
    parent = engine_hash(W1, [1], "GPU")
    assert indexer.apply_event(stored(W1, 1, [1], [2], medium="CPU", parent_engine_hash=parent))
    assert indexer.find_matches([1, 2]).tiers == {}  # CPU lacks block 1
    assert indexer.apply_event(stored(W1, 2, [], [1], medium="CPU"))
    assert indexer.find_matches([1, 2]).tiers == {"CPU": {W1: 2}}


def test_cleared_drops_every_medium() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1]))
    indexer.apply_event(stored(W1, 1, [], [1], medium="DISK"))
    indexer.apply_event(cleared(W1, 2))
    scores = indexer.find_matches([1])
    assert (scores.scores, scores.tiers, indexer.stats().num_blocks) == ({}, {}, 0)


# ----------------------------------------------------------- rejections


def test_stale_and_duplicate_event_ids_are_rejected(caplog: pytest.LogCaptureFixture) -> None:
    indexer = KvIndexer()
    assert indexer.apply_event(stored(W1, 5, [], [1]))
    with caplog.at_level(logging.WARNING, logger="kvrouter.index.indexer"):
        assert not indexer.apply_event(stored(W1, 5, [], [2]))
        assert not indexer.apply_event(stored(W1, 3, [], [3]))
    assert rejected(indexer) == {"stale_event_id": 2}
    assert indexer.find_matches([2]).scores == {}
    assert indexer.last_event_id(W1) == 5
    assert [r.getMessage() for r in caplog.records] == [
        "worker 1 rank 0 event 5 rejected (stale_event_id): last applied id is 5",
        "worker 1 rank 0 event 3 rejected (stale_event_id): last applied id is 5",
    ]
    # Ids are per worker.
    assert indexer.apply_event(stored(W2, 0, [], [4]))


def test_event_id_gap_is_counted_not_rejected() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1]))
    assert indexer.apply_event(stored(W1, 7, [], [2]))
    assert indexer.stats().event_id_gaps == 1


def test_block_size_mismatch_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    indexer = KvIndexer(block_size=16)
    with caplog.at_level(logging.WARNING):
        assert not indexer.apply_event(stored(W1, 0, [], [1], block_size=32))
    assert indexer.apply_event(stored(W1, 1, [], [2], block_size=16))
    assert rejected(indexer) == {"block_size_mismatch": 1}
    assert indexer.find_matches([1]).scores == {}
    assert "worker 1 rank 0 event 0" in caplog.records[0].getMessage()
    assert "block size 32, the index uses 16" in caplog.records[0].getMessage()
    count, why = indexer.rejections(W1)
    assert count == 1 and why is not None
    assert why.startswith("block_size_mismatch: block size 32, the index uses 16")
    assert indexer.rejections(WorkerKey(9, 0)) == (0, None)


def test_a_flood_of_rejections_is_counted_but_logged_sparingly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    indexer = KvIndexer(block_size=16)
    with caplog.at_level(logging.WARNING):
        for i in range(2500):
            assert not indexer.apply_event(stored(W1, i, [], [1], block_size=32))
    assert rejected(indexer) == {"block_size_mismatch": 2500}
    assert indexer.rejections(W1)[0] == 2500
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 10 + 2  # the first ten, then the 1000th and the 2000th
    assert "one in 1000 is logged" in messages[9]
    assert messages[-1].endswith(
        "(2000 from this worker so far; from now on one in 1000 is logged)"
    )


def test_unknown_parent_is_rejected_and_the_batch_goes_on() -> None:
    indexer = KvIndexer()
    events = [
        stored(W1, 0, [], [1]),
        stored(W1, 1, [8], [9]),  # parent [8] never stored
        stored(W1, 2, [1], [2]),
    ]
    assert indexer.apply_events(events) == 2
    assert rejected(indexer) == {"unknown_parent": 1}
    assert indexer.find_matches([1, 2]).scores == {W1: 2}
    assert indexer.stats().num_entries == 2
    assert indexer.last_event_id(W1) == 2


def test_unknown_removed_hash_applies_the_rest() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1, 2]))
    assert not indexer.apply_event(removed(W1, 1, [[1, 2], [7], [8]]))
    stats = indexer.stats()
    assert rejected(indexer) == {"unknown_removed": 1}
    assert (stats.unknown_removed_blocks, stats.blocks_removed, stats.num_entries) == (2, 1, 1)
    assert indexer.find_matches([1, 2]).scores == {W1: 1}
    # Nothing known at all for a worker never seen: still no corruption.
    assert not indexer.apply_event(removed(W2, 0, [[1]]))
    assert indexer.find_matches([1]).scores == {W1: 1}


def test_stats_is_a_frozen_value() -> None:
    indexer = KvIndexer()
    stats = indexer.stats()
    assert isinstance(stats, IndexerStats)
    assert set(stats.rejected) == set(REJECT_KINDS)
    with pytest.raises(AttributeError):
        stats.num_blocks = 3  # type: ignore[misc]


# -------------------------------------------------------------- workers


def test_reset_worker_leaves_others_and_forgets_event_id() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 10, [], [1, 2]))
    indexer.apply_event(stored(W2, 3, [], [1, 2]))
    indexer.reset_worker(W1)
    assert indexer.find_matches([1, 2]).scores == {W2: 2}
    assert indexer.last_event_id(W1) is None
    assert indexer.last_event_id(W2) == 3
    assert indexer.apply_event(stored(W1, 0, [], [1]))  # a restarted publisher
    assert indexer.find_matches([1, 2]).scores == {W1: 1, W2: 2}


def test_remove_worker_one_rank_or_all() -> None:
    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1]))
    indexer.apply_event(stored(W1R1, 0, [], [1]))
    indexer.apply_event(stored(W2, 0, [], [1]))
    indexer.remove_worker(1, dp_rank=1)
    assert indexer.workers() == [W1, W2]
    indexer.remove_worker(1)
    assert indexer.workers() == [W2]
    assert indexer.find_matches([1]).scores == {W2: 1}
    assert indexer.last_event_id(W1) is None
    # The freed slot is reused without leaking the old worker's blocks.
    w3 = WorkerKey(3, 0)
    indexer.apply_event(stored(w3, 0, [], [5]))
    assert indexer.find_matches([1]).scores == {W2: 1}
    assert indexer.find_matches([5]).scores == {w3: 1}


def test_many_workers_dropping_out_at_different_depths() -> None:
    indexer = KvIndexer()
    chain = list(range(1, 41))
    for w in range(300):
        depth = 1 + w % 40
        indexer.apply_event(stored(WorkerKey(w), 0, [], chain[:depth]))
    scores = indexer.find_matches(chain).scores
    assert scores == {WorkerKey(w): 1 + w % 40 for w in range(300)}


def test_constructor_validates_settings() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KvIndexer(block_size=0)
    with pytest.raises(ValueError, match="predicted_ttl_s"):
        KvIndexer(predicted_ttl_s=0.0)
    with pytest.raises(ValueError, match="max_predicted_blocks"):
        KvIndexer(max_predicted_blocks=0)


def test_signed_local_hashes_mean_their_unsigned_value() -> None:
    indexer = KvIndexer()
    indexer.apply_event(
        RouterEvent(1, 0, 0, Stored(None, (StoredBlock(1, -1), StoredBlock(2, -2))))
    )
    u64 = 1 << 64
    assert indexer.find_matches([-1, -2]).scores == {W1: 2}
    assert indexer.find_matches([u64 - 1, u64 - 2]).scores == {W1: 2}
    assert indexer.find_matches([u64 - 1, 5]).scores == {W1: 1}


def test_cached_worker_groups_follow_slot_reuse() -> None:
    indexer = KvIndexer()
    for w in range(6):
        indexer.apply_event(stored(WorkerKey(w), 0, [], [1]))
    assert indexer.find_matches([1]).scores == {WorkerKey(w): 1 for w in range(6)}
    indexer.remove_worker(0)
    indexer.apply_event(stored(WorkerKey(9), 0, [], [1]))  # takes slot 0
    expected = {WorkerKey(w): 1 for w in (1, 2, 3, 4, 5, 9)}
    assert indexer.find_matches([1]).scores == expected


def test_find_matches_sequence_takes_precomputed_hashes() -> None:
    from kvrouter.hashing import compute_sequence_hashes

    indexer = KvIndexer()
    indexer.apply_event(stored(W1, 0, [], [1, 2, 3]))
    indexer.apply_event(stored(W2, 0, [], [1, 2], medium="CPU"))
    by_sequence = indexer.find_matches_sequence(compute_sequence_hashes([1, 2, 9]))
    assert by_sequence == OverlapScores({W1: 2}, {"CPU": {W2: 2}}, {W1: 3})
    assert indexer.find_matches_sequence([]) == OverlapScores({}, {}, {})
