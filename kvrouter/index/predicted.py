"""Predicted entries (approximate mode): blocks a worker is expected to hold.

They live in the device tier's masks like real blocks (one lookup serves both), in an
insertion-ordered dict for oldest-first pruning, and in a heap for expiry. Heap entries
go stale when an entry is refreshed or superseded; they are skipped when popped and
compacted away when they pile up. See docs/indexer.md for the exact rule.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

from kvrouter.clock import Clock
from kvrouter.events.model import WorkerKey
from kvrouter.hashing import compute_sequence_hashes
from kvrouter.index.state import WorkerState, clear_bit

__all__ = ["PredictedEntries"]


class PredictedEntries:
    """The predicted-entry half of :class:`~kvrouter.index.KvIndexer` (a mixin over
    its state)."""

    predicted_ttl_s: float
    max_predicted_blocks: int
    prune_target_ratio: float
    _clock: Clock
    _gpu_nodes: dict[int, int]
    _workers: dict[WorkerKey, WorkerState]
    _slots: list[WorkerState | None]
    _tree_sizes: dict[WorkerKey, int]
    _counts: dict[str, int]
    # (slot, sequence hash) in insertion / refresh order; and (expiry, slot, hash)
    _pred_order: OrderedDict[tuple[int, int], None]
    _pred_heap: list[tuple[float, int, int]]

    def _add_worker(self, key: WorkerKey) -> WorkerState:
        raise NotImplementedError

    def add_predicted(
        self, worker: WorkerKey, local_hashes: Sequence[int], *, ttl_s: float | None = None
    ) -> None:
        """Record that ``worker`` will hold the prompt's blocks for ``ttl_s`` seconds.

        For workers that publish no events this *is* their cache (approximate mode);
        for the others it covers the gap between routing a request and its events.
        A block the worker already holds from events is left alone; a predicted block
        is refreshed (new expiry, youngest for pruning); a later Stored event for it
        turns it into a real entry. Predicted blocks count in :meth:`find_matches`
        exactly like real device blocks until they expire or are pruned.
        """
        ttl = self.predicted_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl}")
        state = self._workers.get(WorkerKey(*worker))
        if state is None:
            state = self._add_worker(WorkerKey(*worker))
        now = self._clock()
        self._expire_predicted(now)
        expiry = now + ttl
        for key in compute_sequence_hashes(local_hashes):
            self._predict_one(state, key, expiry)
        self._tree_sizes[state.key] = len(state.gpu) + len(state.predicted)
        if len(self._pred_order) > self.max_predicted_blocks:
            self._prune_predicted()
        if len(self._pred_heap) > 2 * len(self._pred_order) + 1024:
            self._compact_heap()

    def _predict_one(self, state: WorkerState, key: int, expiry: float) -> None:
        nodes = self._gpu_nodes
        slot = state.slot
        predicted = state.predicted
        if key in predicted:
            self._pred_order.move_to_end((slot, key))
        else:
            mask = nodes.get(key, 0)
            if mask & state.bit:
                return  # held from events: the real entry wins
            nodes[key] = mask | state.bit if mask else state.bit
            self._pred_order[(slot, key)] = None
            self._counts["predicted_added"] += 1
        predicted[key] = expiry
        heapq.heappush(self._pred_heap, (expiry, slot, key))

    def _expire_predicted(self, now: float) -> None:
        heap = self._pred_heap
        slots = self._slots
        while heap and heap[0][0] <= now:
            expiry, slot, key = heapq.heappop(heap)
            state = slots[slot]
            if state is not None and state.predicted.get(key) == expiry:
                self._forget_predicted(state, key)
                self._counts["predicted_expired"] += 1

    def _forget_predicted(self, state: WorkerState, key: int) -> None:
        del state.predicted[key]
        self._tree_sizes[state.key] -= 1
        del self._pred_order[(state.slot, key)]
        clear_bit(self._gpu_nodes, key, state.bit)

    def _prune_predicted(self) -> None:
        """Drop the oldest predictions until the target share of the bound is left."""
        target = int(self.max_predicted_blocks * self.prune_target_ratio)
        order = self._pred_order
        slots = self._slots
        while len(order) > target:
            slot, key = next(iter(order))
            state = slots[slot]
            assert state is not None, "a prediction outlived its worker"
            self._forget_predicted(state, key)
            self._counts["predicted_pruned"] += 1

    def _compact_heap(self) -> None:
        slots = self._slots
        live: list[tuple[float, int, int]] = []
        for slot, key in self._pred_order:
            state = slots[slot]
            assert state is not None, "a prediction outlived its worker"
            live.append((state.predicted[key], slot, key))
        heapq.heapify(live)
        self._pred_heap = live

    def _drop_predictions(self, worker: WorkerState) -> None:
        order = self._pred_order
        nodes = self._gpu_nodes
        for key in worker.predicted:
            del order[(worker.slot, key)]
            clear_bit(nodes, key, worker.bit)
        worker.predicted.clear()
