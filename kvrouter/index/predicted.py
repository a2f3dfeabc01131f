"""Predicted entries (approximate mode): blocks a worker is expected to hold.

One *booking* per ``add_predicted_sequence`` call carries the expiry of all its blocks,
so the bookkeeping per block is two dict operations, not a record of its own::

    worker.predicted: {sequence_hash: Booking}   the booking that added or last refreshed it
    Booking: worker, expiry_s, keys (prompt order), start, live
    _bookings:     deque[Booking]                 oldest first: the pruning order
    _booking_heap: [(expiry_s, n, Booking)]       soonest first: the expiry order

An entry (worker, key) belongs to ``worker.predicted[key]``; a refresh points the key at
the newer booking, which makes the old booking's copy stale at no cost. A booking does
not refresh a key that already expires no more than ``REFRESH_FRACTION`` of its TTL
before it does (or later): a hot prefix booked by every request costs one lookup per
block, not a rewrite of the entry and a compaction of the booking it came from.

When a booking expires or is pruned, only the keys it still owns are dropped. ``live``
counts them; a booking whose keys are mostly stale is compacted by the call that made
them stale, and one with none left lets its key list go at once. See docs/indexer.md
for the rule.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from itertools import count, islice

from kvrouter.clock import Clock
from kvrouter.events.model import WorkerKey
from kvrouter.hashing import compute_sequence_hashes
from kvrouter.index.state import WorkerState, clear_bit

__all__ = ["REFRESH_FRACTION", "Booking", "PredictedEntries"]

# A refresh that would move an entry's expiry later by no more than this fraction of
# the booking's TTL is skipped (the entry may expire that much early).
REFRESH_FRACTION = 0.01

_NO_KEYS: tuple[int, ...] = ()


class Booking:
    """The blocks one call predicted for one worker, with their common expiry.

    ``keys[start:]`` are the keys not yet visited by pruning; the entries this booking
    still owns are those with ``worker.predicted[key] is self`` (``live`` of them).
    """

    __slots__ = ("expiry_s", "keys", "live", "start", "worker")

    def __init__(self, worker: WorkerState, expiry_s: float) -> None:
        self.worker = worker
        self.expiry_s = expiry_s
        self.keys: Sequence[int] = _NO_KEYS
        self.start = 0
        self.live = 0

    def release(self) -> None:
        """Owns nothing any more: let the key list go."""
        self.keys = _NO_KEYS
        self.start = 0
        self.live = 0


class PredictedEntries:
    """The predicted-entry half of :class:`~kvrouter.index.KvIndexer` (a mixin over
    its state)."""

    predicted_ttl_s: float
    max_predicted_blocks: int
    _clock: Clock
    _gpu_nodes: dict[int, int]
    _workers: dict[WorkerKey, WorkerState]
    _tree_sizes: dict[WorkerKey, int]
    _counts: dict[str, int]

    def _init_predicted(self) -> None:
        self._bookings: deque[Booking] = deque()
        self._booking_heap: list[tuple[float, int, Booking]] = []
        self._booking_ids = count()
        self._num_predicted = 0

    def _add_worker(self, key: WorkerKey) -> WorkerState:
        raise NotImplementedError

    def add_predicted(
        self,
        worker: WorkerKey,
        local_hashes: Sequence[int],
        *,
        ttl_s: float | None = None,
        max_blocks: int | None = None,
    ) -> Booking | None:
        """:meth:`add_predicted_sequence` for a prompt's local block hashes (chains
        them into sequence hashes first)."""
        return self.add_predicted_sequence(
            worker, compute_sequence_hashes(local_hashes), ttl_s=ttl_s, max_blocks=max_blocks
        )

    def add_predicted_sequence(
        self,
        worker: WorkerKey,
        sequence_hashes: Sequence[int],
        *,
        ttl_s: float | None = None,
        max_blocks: int | None = None,
    ) -> Booking | None:
        """Record that ``worker`` will hold the prompt's blocks for ``ttl_s`` seconds.

        ``sequence_hashes`` are the prompt's sequence hashes (unsigned 64-bit, as
        :func:`kvrouter.hashing.hash_request` returns them). For workers that publish
        no events this *is* their cache (approximate mode); for the others it covers
        the gap between routing a request and its events. A block the worker already
        holds from events is left alone; a predicted block is refreshed (new expiry,
        youngest for pruning) unless its expiry is already no more than ``ttl_s / 100``
        earlier than the new one (a longer-lived prediction is never shortened); a later
        Stored event for it turns it into a real entry.
        Predicted blocks count in :meth:`find_matches` exactly like real device blocks
        until they expire or are pruned. ``max_blocks`` (the worker's KV capacity):
        beyond that many predicted blocks, the worker's oldest predictions go, as its
        LRU cache would evict them. Returns the booking (``None`` when nothing new was
        booked), which :meth:`withdraw_prediction` takes back.

        >>> from kvrouter.clock import ManualClock
        >>> from kvrouter.index import KvIndexer
        >>> indexer = KvIndexer(clock=ManualClock())
        >>> booking = indexer.add_predicted_sequence(WorkerKey(3), [11, 12], ttl_s=5.0)
        >>> indexer.find_matches_sequence([11, 12, 13]).scores
        {WorkerKey(worker_id=3, dp_rank=0): 2}
        """
        ttl = self.predicted_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl}")
        state = self._workers.get(worker)
        if state is None:
            state = self._add_worker(WorkerKey(*worker))
        now = self._clock()
        heap = self._booking_heap
        if heap and heap[0][0] <= now:
            self._expire_predicted(now)
        booking = self._book(state, sequence_hashes, now + ttl, ttl * REFRESH_FRACTION)
        if max_blocks is not None and len(state.predicted) > max_blocks:
            self._prune(state.bookings, len(state.predicted) - max(max_blocks, 0))
        if self._num_predicted > self.max_predicted_blocks:
            self._prune_predicted()
        return booking

    def withdraw_prediction(self, booking: Booking) -> int:
        """Drop the entries ``booking`` still owns (the request it was made for failed
        before the worker computed anything); returns how many."""
        if not booking.live:
            return 0
        dropped = self._forget(booking, booking.live)
        self._counts["predicted_withdrawn"] += dropped
        return dropped

    def _book(
        self, state: WorkerState, keys: Sequence[int], expiry_s: float, slack_s: float = 0.0
    ) -> Booking | None:
        """One booking of ``keys`` for ``state``; the hot loop of approximate mode.

        A key predicted by a booking that expires at ``expiry_s - slack_s`` or later
        stays with it (see the module docstring).
        """
        booking = Booking(state, expiry_s)
        fresh_from = expiry_s - slack_s
        fresh: Booking | None = None  # the last older booking found fresh enough
        nodes = self._gpu_nodes
        node_of = nodes.get
        predicted = state.predicted
        owner_of = predicted.get
        bit = state.bit
        mine: list[int] = []
        own = mine.append
        touched: list[Booking] = []
        last: Booking | None = None
        before = len(predicted)
        for key in keys:
            old = owner_of(key)
            if old is None:
                mask = node_of(key, 0)
                if mask & bit:
                    continue  # held from events: the real entry wins
                # A block held by one worker shares that worker's bit object.
                nodes[key] = mask | bit if mask else bit
            elif old is fresh or old is booking:
                continue  # fresh enough, or the same key twice in one prompt
            elif old.expiry_s >= fresh_from:
                fresh = old  # a prompt's keys mostly share their booking
                continue
            else:
                old.live -= 1  # refreshed: the older booking's copy goes stale
                if old is not last:
                    touched.append(old)
                    last = old
            predicted[key] = booking
            own(key)
        if not mine:
            return None
        added = len(predicted) - before
        booking.keys = mine
        booking.live = len(mine)
        self._bookings.append(booking)
        own_bookings = state.bookings
        own_bookings.append(booking)
        while not own_bookings[0].live:
            own_bookings.popleft()
        heapq.heappush(self._booking_heap, (expiry_s, next(self._booking_ids), booking))
        self._num_predicted += added
        self._counts["predicted_added"] += added
        self._tree_sizes[state.key] = len(state.gpu) + len(predicted)
        for old in touched:
            _compact(old)
        bookings = self._bookings
        while not bookings[0].live:  # fully refreshed ones leave now, not at expiry
            bookings.popleft()
        return booking

    def _supersede(self, state: WorkerState, key: int) -> bool:
        """A Stored event for ``key``: a prediction of it becomes the real entry (the
        worker's bit stays set). ``False`` when ``key`` was not predicted."""
        booking = state.predicted.pop(key, None)
        if booking is None:
            return False
        booking.live -= 1
        if not booking.live:
            booking.release()
        self._num_predicted -= 1
        self._counts["predicted_superseded"] += 1
        return True

    def _expire_due(self) -> None:
        """Expire what is due; the caller checked that some booking exists."""
        now = self._clock()
        if self._booking_heap[0][0] <= now:
            self._expire_predicted(now)

    def _expire_predicted(self, now: float) -> None:
        """Drop every booking whose expiry is ``<= now`` (only its live entries cost)."""
        heap = self._booking_heap
        expired = 0
        while heap and heap[0][0] <= now:
            booking = heapq.heappop(heap)[2]
            if booking.live:
                expired += self._forget(booking, booking.live)
            booking.release()
        self._counts["predicted_expired"] += expired
        bookings = self._bookings
        while bookings and not bookings[0].live:
            bookings.popleft()

    def _prune_predicted(self) -> None:
        """Drop the oldest entries until no more than the bound are left."""
        self._prune(self._bookings, self._num_predicted - self.max_predicted_blocks)

    def _prune(self, bookings: deque[Booking], excess: int) -> None:
        """Drop the ``excess`` oldest live entries of ``bookings`` (all bookings, or one
        worker's), which own at least that many."""
        pruned = 0
        while excess > 0:
            booking = bookings[0]
            if booking.live:
                dropped = self._forget(booking, excess)
                excess -= dropped
                pruned += dropped
            if not booking.live:
                bookings.popleft()
        self._counts["predicted_pruned"] += pruned

    def _forget(self, booking: Booking, limit: int) -> int:
        """Drop up to ``limit`` of ``booking``'s live entries, oldest first."""
        worker = booking.worker
        predicted = worker.predicted
        owner_of = predicted.get
        nodes = self._gpu_nodes
        bit = worker.bit
        keys = booking.keys
        index = booking.start
        dropped = 0
        for key in islice(keys, index, None):
            index += 1
            if owner_of(key) is booking:
                del predicted[key]
                mask = nodes[key] ^ bit  # the worker's bit is set while it is predicted
                if mask:
                    nodes[key] = mask
                else:
                    del nodes[key]
                dropped += 1
                if dropped == limit:
                    break
        booking.start = index
        booking.live -= dropped
        if not booking.live:
            booking.release()
        self._num_predicted -= dropped
        self._tree_sizes[worker.key] = len(worker.gpu) + len(predicted)
        return dropped

    def _drop_predictions(self, worker: WorkerState) -> None:
        """Forget every prediction of ``worker`` (Cleared, reset, removal)."""
        predicted = worker.predicted
        if not predicted:
            return
        nodes = self._gpu_nodes
        for key in predicted:
            clear_bit(nodes, key, worker.bit)
        # Its bookings own nothing now; they leave the queue and heap when reached.
        for booking in dict.fromkeys(predicted.values()):
            booking.release()
        self._num_predicted -= len(predicted)
        predicted.clear()
        worker.bookings.clear()

    def _predicted_in_order(self) -> list[tuple[WorkerState, int, float]]:
        """Every live entry as (worker, sequence hash, expiry), oldest first."""
        out: list[tuple[WorkerState, int, float]] = []
        for booking in self._bookings:
            if booking.live:
                worker = booking.worker
                owner_of = worker.predicted.get
                expiry = booking.expiry_s
                out.extend(
                    (worker, key, expiry)
                    for key in islice(booking.keys, booking.start, None)
                    if owner_of(key) is booking
                )
        return out


def _compact(booking: Booking) -> None:
    """Shrink a booking that lost most of its keys to newer ones (amortised: it lost
    at least half of them since it was last built)."""
    if not booking.live:
        booking.release()
        return
    keys = booking.keys
    start = booking.start
    if booking.live * 2 < len(keys) - start:
        owner_of = booking.worker.predicted.get
        booking.keys = [k for k in islice(keys, start, None) if owner_of(k) is booking]
        booking.start = 0
