"""Snapshot round trips."""

from __future__ import annotations

import msgspec
import pytest

from kvrouter.clock import ManualClock
from kvrouter.events.model import Removed, RouterEvent, Stored, StoredBlock, WorkerKey
from kvrouter.index import KvIndexer

from .helpers import removed, stored

W1 = WorkerKey(1, 0)
W2 = WorkerKey(2, 3)


def build(clock: ManualClock) -> KvIndexer:
    indexer = KvIndexer(block_size=32, clock=clock, predicted_ttl_s=30.0, max_predicted_blocks=99)
    indexer.apply_event(stored(W1, 4, [], [1, 2, 3]))
    indexer.apply_event(stored(W1, 5, [], [1, 2], medium="CPU"))
    indexer.apply_event(stored(W2, 9, [], [1, 5]))
    indexer.apply_event(RouterEvent(2, 3, 10, Stored(None, (StoredBlock(77, 1),))))  # dup
    indexer.add_predicted(W2, [1, 5, 6, 7])
    clock.advance(10.0)
    indexer.add_predicted(WorkerKey(3), [8])
    return indexer


def test_round_trip_keeps_blocks_predictions_ids_and_settings() -> None:
    clock = ManualClock(100.0)
    original = build(clock)
    data = original.snapshot()
    assert isinstance(data, bytes)
    later = ManualClock(5000.0)
    restored = KvIndexer.restore(data, clock=later)
    assert restored.block_size == 32
    assert (restored.predicted_ttl_s, restored.max_predicted_blocks) == (30.0, 99)
    assert restored.workers() == original.workers()
    assert [restored.last_event_id(w) for w in restored.workers()] == [5, 10, None]
    for prompt in ([1, 2, 3], [1, 5, 6, 7, 8], [8], [1, 2]):
        assert restored.find_matches(prompt) == original.find_matches(prompt)
    assert restored.stats().num_entries == original.stats().num_entries
    assert restored.stats().num_predicted == original.stats().num_predicted == 3
    # Predictions keep their remaining time under the new clock: W2's have 20 s left.
    later.advance(19.0)
    assert restored.find_matches([1, 5, 6, 7]).scores == {W1: 1, W2: 4}
    later.advance(1.0)
    assert restored.find_matches([1, 5, 6, 7]).scores == {W1: 1, W2: 2}
    assert restored.find_matches([8]).scores == {WorkerKey(3): 1}


def test_restored_index_keeps_working() -> None:
    clock = ManualClock()
    restored = KvIndexer.restore(build(clock).snapshot(), clock=clock)
    # The duplicate count survived: removing one of the two engine hashes keeps block 1.
    assert restored.apply_event(RouterEvent(2, 3, 11, Removed((77,))))
    assert restored.find_matches([1, 5]).scores[W2] == 2
    assert not restored.apply_event(stored(W1, 5, [], [9]))  # stale id
    assert restored.apply_event(removed(W1, 6, [[1, 2, 3]]))
    assert restored.find_matches([1, 2, 3]).scores[W1] == 2


def test_expired_predictions_are_not_saved() -> None:
    clock = ManualClock()
    indexer = build(clock)
    clock.advance(25.0)
    restored = KvIndexer.restore(indexer.snapshot(), clock=clock)
    assert restored.stats().num_predicted == 1


def test_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a kvrouter indexer snapshot"):
        KvIndexer.restore(b"\x93\x01\x02")
    payload = msgspec.msgpack.decode(KvIndexer().snapshot())
    payload["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        KvIndexer.restore(msgspec.msgpack.encode(payload))
