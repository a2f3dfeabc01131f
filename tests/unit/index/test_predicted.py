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


def test_pruning_drops_oldest_first_down_to_the_bound() -> None:
    clock = ManualClock()
    indexer = make(clock, max_predicted_blocks=10)
    for i in range(10):  # ten one-block prompts, oldest first
        indexer.add_predicted(W1, [100 + i])
        clock.advance(1.0)
    indexer.add_predicted(W1, [100])  # refreshed: now the youngest
    assert indexer.stats().num_predicted == 10
    indexer.add_predicted(W2, [200])  # 11 > 10: the oldest one goes
    alive = {i for i in range(10) if indexer.find_matches([100 + i]).scores}
    assert alive == {0, 2, 3, 4, 5, 6, 7, 8, 9}
    indexer.add_predicted(W2, [200, 300, 400])  # 2 new, 200 refreshed: 2 more go
    alive = {i for i in range(10) if indexer.find_matches([100 + i]).scores}
    assert alive == {0, 4, 5, 6, 7, 8, 9}
    assert indexer.find_matches([200, 300, 400]).scores == {W2: 3}
    stats = indexer.stats()
    assert (stats.num_predicted, stats.predicted_pruned) == (10, 3)


def test_a_prompt_longer_than_the_bound_keeps_its_tail() -> None:
    # Within one call the blocks are inserted in prompt order, so the head goes first.
    clock = ManualClock()
    indexer = make(clock, max_predicted_blocks=4)
    seq = compute_sequence_hashes([1, 2, 3, 4, 5, 6])
    indexer.add_predicted_sequence(W1, seq)
    assert sorted(indexer._gpu_nodes) == sorted(seq[2:])
    assert indexer.find_matches_sequence(seq).scores == {}  # its first blocks are gone
    stats = indexer.stats()
    assert (stats.num_predicted, stats.predicted_added, stats.predicted_pruned) == (4, 6, 2)


def test_sequence_and_local_forms_book_the_same_entries() -> None:
    clock = ManualClock()
    by_local = make(clock)
    by_sequence = make(clock)
    by_local.add_predicted(W1, [5, 6, 7], ttl_s=3.0)
    by_sequence.add_predicted_sequence(W1, compute_sequence_hashes([5, 6, 7]), ttl_s=3.0)
    assert by_local._gpu_nodes == by_sequence._gpu_nodes
    assert by_local.find_matches([5, 6, 7]) == by_sequence.find_matches([5, 6, 7])
    clock.advance(3.0)
    assert by_sequence.find_matches([5]).scores == {}
    with pytest.raises(ValueError, match="ttl_s"):
        by_sequence.add_predicted_sequence(W1, [1], ttl_s=-1.0)


def test_refreshed_bookings_let_their_keys_go() -> None:
    clock = ManualClock()
    indexer = make(clock)
    for _ in range(60):  # each call refreshes the one block of the previous one
        indexer.add_predicted(W1, [1])
        clock.advance(1.5)  # past the refresh slack (1% of the 120 s TTL)
    assert indexer.stats().num_predicted == 1
    assert len(indexer._bookings) == 1
    released = [booking for _, _, booking in indexer._booking_heap if not booking.live]
    assert len(released) == 59
    assert all(booking.keys == () for booking in released)
    clock.advance(121.0)
    assert indexer.find_matches([1]).scores == {}
    assert (len(indexer._booking_heap), len(indexer._bookings)) == (0, 0)


def test_a_fresh_prediction_is_not_rebooked() -> None:
    # A hot prefix booked by every request: within 1% of the TTL nothing is rewritten.
    clock = ManualClock()
    indexer = make(clock)
    indexer.add_predicted(W1, [1, 2])
    for _ in range(1500):
        clock.advance(0.0008)  # 1.2 s in all: still within the slack of 1.2 s
        indexer.add_predicted(W1, [1, 2, 3])  # 3 is new and gets its own booking
    assert (len(indexer._booking_heap), len(indexer._bookings)) == (2, 2)
    stats = indexer.stats()
    assert (stats.num_predicted, stats.predicted_added) == (3, 3)
    clock.advance(0.5)  # now 1.7 s after the first booking: it is refreshed
    indexer.add_predicted(W1, [1, 2])
    assert [len(b.keys) for b in indexer._bookings] == [1, 2]  # 3's booking, then 1 and 2
    clock.advance(118.8)  # t = 120.5: the first two bookings have expired
    assert indexer.find_matches([1, 2]).scores == {W1: 2}  # refreshed at t = 1.7
    assert indexer.find_matches([3]).scores == {}


def test_a_shorter_prediction_does_not_shorten_a_longer_one() -> None:
    clock = ManualClock()
    indexer = make(clock)
    indexer.add_predicted(W1, [1], ttl_s=100.0)
    indexer.add_predicted(W1, [1], ttl_s=5.0)
    clock.advance(50.0)
    assert indexer.find_matches([1]).scores == {W1: 1}
    clock.advance(50.0)
    assert indexer.find_matches([1]).scores == {}


def test_mostly_refreshed_booking_is_compacted_and_keeps_its_order() -> None:
    clock = ManualClock()
    indexer = make(clock, max_predicted_blocks=12)
    first = list(range(1000, 1010))
    indexer.add_predicted_sequence(W1, first)
    clock.advance(2.0)  # past the refresh slack
    indexer.add_predicted_sequence(W1, first[:6])  # 6 of 10 refreshed: 4 left, compacted
    assert list(indexer._bookings[0].keys) == first[6:]
    indexer.add_predicted_sequence(W1, [2000, 2001, 2002])  # 13 > 12: 1000+6 goes first
    assert not indexer.find_matches_sequence([1006]).scores
    assert indexer.find_matches_sequence([1007]).scores == {W1: 1}
    assert indexer.find_matches_sequence(first[:6]).scores == {W1: 6}
    assert indexer.stats().num_predicted == 12


def test_partly_superseded_booking_expires_the_rest() -> None:
    clock = ManualClock()
    indexer = make(clock, predicted_ttl_s=5.0)
    indexer.add_predicted(W1, [1, 2, 3])
    indexer.apply_event(stored(W1, 0, [], [1]))
    clock.advance(5.0)
    assert indexer.find_matches([1, 2, 3]).scores == {W1: 1}
    stats = indexer.stats()
    assert (stats.predicted_added, stats.predicted_superseded, stats.predicted_expired) == (
        3,
        1,
        2,
    )
    assert (stats.num_predicted, stats.num_blocks) == (0, 1)


def test_bookings_of_a_removed_worker_do_not_touch_its_slot_successor() -> None:
    clock = ManualClock()
    indexer = make(clock)
    indexer.add_predicted(W1, [1, 2], ttl_s=5.0)
    indexer.remove_worker(1)
    indexer.add_predicted(W2, [1], ttl_s=100.0)  # takes the freed slot
    clock.advance(6.0)
    assert indexer.find_matches([1, 2]).scores == {W2: 1}
    stats = indexer.stats()
    assert (stats.num_predicted, stats.predicted_expired, stats.num_workers) == (1, 0, 1)


def test_predicted_keys_are_sequence_hashes() -> None:
    # A prediction and a real chain of the same local hashes are the same blocks.
    clock = ManualClock()
    indexer = make(clock)
    indexer.add_predicted(W1, [7, 8])
    assert sorted(indexer._gpu_nodes) == sorted(compute_sequence_hashes([7, 8]))


def test_a_workers_predictions_are_capped_at_its_capacity_oldest_out_first() -> None:
    clock = ManualClock()
    indexer = make(clock)
    indexer.add_predicted_sequence(W2, [900, 901])  # another worker: untouched
    for i in range(4):  # four two-block prompts on a worker that holds five blocks
        indexer.add_predicted_sequence(W1, [100 + 10 * i, 101 + 10 * i], max_blocks=5)
        clock.advance(2.0)
    alive = [
        k
        for k in (100, 101, 110, 111, 120, 121, 130, 131)
        if indexer.find_matches_sequence([k]).scores
    ]
    assert alive == [111, 120, 121, 130, 131]  # the oldest three went, in prompt order
    indexer.add_predicted_sequence(W1, [110, 111], max_blocks=5)  # 111 refreshed; 110 new
    alive = [k for k in (110, 111, 120, 121, 130, 131) if indexer.find_matches_sequence([k]).scores]
    assert alive == [110, 111, 121, 130, 131]  # 120 was the oldest left
    assert indexer.find_matches_sequence([900, 901]).scores == {W2: 2}
    stats = indexer.stats()
    assert (stats.num_predicted, stats.predicted_pruned) == (7, 4)
