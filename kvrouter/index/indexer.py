"""The KV indexer: which worker holds which block, and how much of a prompt each holds.

Layout (one per storage medium; "GPU" is the device tier)::

    nodes: {sequence_hash: worker_mask}          one entry per distinct block
                 │                                 bit s of the mask = worker in slot s
    worker (worker_id, dp_rank) ── slot s, bit 1 << s
        blocks[medium]: {engine_hash: sequence_hash}   finds the node on BlockRemoved
        predicted:      {sequence_hash: Booking}       device tier, no engine hash

A block is identified by its *sequence hash* (DESIGN 3.1): the hash of its own content
chained on everything before it, so equal keys mean equal prefixes and a flat dict is a
prefix tree. ``find_matches`` walks the prompt's sequence hashes and ANDs the masks:
the set of workers holding the first ``i`` blocks only shrinks, and a worker's score is
the depth at which its bit drops out. The cost grows with the prompt's length and with
the number of workers that match, never with the size of the fleet.
"""

from __future__ import annotations

import heapq
import logging
import struct
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, Protocol

import xxhash

from kvrouter.clock import Clock, monotonic
from kvrouter.events.model import DEFAULT_MEDIUM, Cleared, Removed, RouterEvent, Stored, WorkerKey
from kvrouter.hashing import HASH_SEED, compute_block_hashes
from kvrouter.index.predicted import PredictedEntries
from kvrouter.index.state import WorkerState, clear_bit, keys_of_mask
from kvrouter.index.values import REJECT_KINDS, IndexerStats, OverlapScores
from kvrouter.lograte import warn_sparingly

__all__ = ["EventSource", "KvIndexer"]

logger = logging.getLogger(__name__)

_U64 = 0xFFFFFFFFFFFFFFFF
_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack


class EventSource(Protocol):
    """Anything that pushes :class:`RouterEvent` values to registered callbacks."""

    def add_listener(self, callback: Any, /) -> Any: ...


class KvIndexer(PredictedEntries):
    """Global index of the KV blocks held by every worker.

    >>> from kvrouter.events.model import StoredBlock
    >>> indexer = KvIndexer(block_size=16)
    >>> stored = Stored(None, (StoredBlock(engine_hash=7, local_hash=111),))
    >>> indexer.apply_event(RouterEvent(worker_id=1, dp_rank=0, event_id=0, data=stored))
    True
    >>> indexer.find_matches([111, 222]).scores
    {WorkerKey(worker_id=1, dp_rank=0): 1}
    """

    def __init__(
        self,
        kv_listener: EventSource | None = None,
        block_size: int = 16,
        *,
        clock: Clock = monotonic,
        predicted_ttl_s: float = 120.0,
        max_predicted_blocks: int = 1 << 20,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if predicted_ttl_s <= 0:
            raise ValueError(f"predicted_ttl_s must be positive, got {predicted_ttl_s}")
        if max_predicted_blocks <= 0:
            raise ValueError(f"max_predicted_blocks must be positive, got {max_predicted_blocks}")
        self.block_size = block_size
        self.predicted_ttl_s = predicted_ttl_s
        self.max_predicted_blocks = max_predicted_blocks
        self._clock = clock
        self._gpu_nodes: dict[int, int] = {}
        self._nodes: dict[str, dict[int, int]] = {DEFAULT_MEDIUM: self._gpu_nodes}
        self._workers: dict[WorkerKey, WorkerState] = {}
        self._slots: list[WorkerState | None] = []
        self._slot_keys: list[WorkerKey] = []
        self._free_slots: list[int] = []
        # Device blocks per worker (events + predictions), kept current so that a
        # lookup reads it instead of computing it for every matched worker.
        self._tree_sizes: dict[WorkerKey, int] = {}
        # Drop-out masks seen recently -> {worker: None}; cleared when a slot is reused.
        # dict.fromkeys(<dict>, depth) reuses the stored key hashes, so building the
        # scores does not hash a WorkerKey again.
        self._mask_keys: dict[int, dict[WorkerKey, None]] = {}
        self._init_predicted()
        self._counts = dict.fromkeys(
            (
                "events_applied",
                "unknown_removed_blocks",
                "event_id_gaps",
                "blocks_stored",
                "blocks_removed",
                "predicted_added",
                "predicted_expired",
                "predicted_pruned",
                "predicted_superseded",
                "predicted_withdrawn",
            ),
            0,
        )
        self._rejected = dict.fromkeys(REJECT_KINDS, 0)
        if kv_listener is not None:
            kv_listener.add_listener(self.apply_event)

    # ------------------------------------------------------------------ events

    def apply_event(self, event: RouterEvent) -> bool:
        """Apply one event; ``False`` when it was rejected in whole or in part.

        A rejected event leaves the index as it was (a Removed applies the hashes the
        worker holds and rejects the rest). Every rejection is counted by kind in
        :meth:`stats` and logged with the worker and the event id. The event id is
        recorded unless the id itself was the problem.
        """
        # A plain tuple finds the WorkerKey entry and is cheaper to build.
        worker = self._workers.get((event.worker_id, event.dp_rank))  # type: ignore[call-overload]
        if worker is None:
            worker = self._add_worker(event.worker)
        event_id = event.event_id
        last = worker.last_event_id
        if last is not None:
            if event_id <= last:
                return self._reject(
                    "stale_event_id", worker, event_id, "last applied id is %d", last
                )
            if event_id != last + 1:
                self._counts["event_id_gaps"] += 1
        worker.last_event_id = event_id
        data = event.data
        if type(data) is Stored:
            ok = self._apply_stored(worker, event_id, data)
        elif type(data) is Removed:
            ok = self._apply_removed(worker, event_id, data)
        elif type(data) is Cleared:
            self._drop_all(worker)
            ok = True
        else:
            raise TypeError(f"not an event payload: {type(data).__name__}")
        if ok:
            self._counts["events_applied"] += 1
        return ok

    def apply_events(self, events: Iterable[RouterEvent]) -> int:
        """Apply events in order; a rejected one does not stop the rest.

        Returns the number applied in full.
        """
        apply = self.apply_event
        return sum(1 for event in events if apply(event))

    def _reject(self, kind: str, worker: WorkerState, event_id: int, why: str, *args: Any) -> bool:
        self._rejected[kind] += 1
        worker.rejected += 1
        worker.last_rejection = f"{kind}: {why % args}"
        # A new router meeting caches older than the replay buffer must not flood the log.
        warn_sparingly(
            logger,
            worker.rejected,
            "worker %d rank %d event %d rejected (%s): " + why,
            worker.key.worker_id,
            worker.key.dp_rank,
            event_id,
            kind,
            *args,
        )
        return False

    def _apply_stored(self, worker: WorkerState, event_id: int, data: Stored) -> bool:
        if data.block_size is not None and data.block_size != self.block_size:
            return self._reject(
                "block_size_mismatch",
                worker,
                event_id,
                "block size %d, the index uses %d (the router's block size must be the workers')",
                data.block_size,
                self.block_size,
            )
        blocks = data.blocks
        if not blocks:
            return True
        medium = blocks[0].medium
        parent = data.parent_engine_hash
        prev: int | None = None
        if parent is not None:
            prev = self._parent_key(worker, parent, medium)
            if prev is None:
                return self._reject(
                    "unknown_parent", worker, event_id, "parent block %#x is unknown", parent
                )
        nodes = self._nodes_for(medium)
        held = worker.blocks_for(medium)
        bit = worker.bit
        xxh3 = _xxh3
        pack = _pack_pair
        for engine_hash, local, block_medium in blocks:
            if block_medium != medium:  # rare: one event spanning media
                medium = block_medium
                nodes = self._nodes_for(medium)
                held = worker.blocks_for(medium)
            key = local & _U64 if prev is None else xxh3(pack(prev, local & _U64), HASH_SEED)
            prev = key
            old = held.get(engine_hash)
            if old is not None:
                if old == key:
                    continue  # the same block stored again
                self._drop_entry(worker, medium, old)  # the engine reused the hash
            mask = nodes.get(key, 0)
            if mask & bit:
                self._add_holder(worker, medium, key)
            else:
                # A block held by one worker shares that worker's bit object.
                nodes[key] = mask | bit if mask else bit
            held[engine_hash] = key
        self._counts["blocks_stored"] += len(blocks)
        self._tree_sizes[worker.key] = len(worker.gpu) + len(worker.predicted)
        return True

    def _parent_key(self, worker: WorkerState, parent: int, medium: str) -> int | None:
        held = worker.blocks.get(medium)
        key = held.get(parent) if held is not None else None
        if key is None:
            # An offloaded block's parent may live on another medium; the key is the same.
            for other in worker.blocks.values():
                key = other.get(parent)
                if key is not None:
                    break
        return key

    def _add_holder(self, worker: WorkerState, medium: str, key: int) -> None:
        if medium == DEFAULT_MEDIUM and worker.predicted and self._supersede(worker, key):
            return
        dup = (medium, key)
        worker.dups[dup] = worker.dups.get(dup, 0) + 1

    def _apply_removed(self, worker: WorkerState, event_id: int, data: Removed) -> bool:
        medium = data.medium
        held = worker.blocks.get(medium)
        unknown = 0
        removed = 0
        if held is None:
            held = {}
        nodes = self._nodes.get(medium, {})  # none when the worker holds nothing there
        bit = worker.bit
        dups = worker.dups
        pop = held.pop
        for engine_hash in data.engine_hashes:
            key = pop(engine_hash, None)
            if key is None:
                unknown += 1
                continue
            removed += 1
            if dups and (medium, key) in dups:
                self._drop_entry(worker, medium, key)
                continue
            mask = nodes[key] ^ bit  # the worker's bit is set: it held this block
            if mask:
                nodes[key] = mask
            else:
                del nodes[key]
        self._counts["blocks_removed"] += removed
        self._tree_sizes[worker.key] = len(worker.gpu) + len(worker.predicted)
        if unknown:
            self._counts["unknown_removed_blocks"] += unknown
            return self._reject(
                "unknown_removed",
                worker,
                event_id,
                "%d of %d removed %s blocks are unknown",
                unknown,
                len(data.engine_hashes),
                medium,
            )
        return True

    def _drop_entry(self, worker: WorkerState, medium: str, key: int) -> None:
        """One real holder of ``key`` on ``medium`` is gone."""
        dups = worker.dups
        if dups:
            dup = (medium, key)
            extra = dups.get(dup)
            if extra is not None:
                if extra > 1:
                    dups[dup] = extra - 1
                else:
                    del dups[dup]
                return
        clear_bit(self._nodes[medium], key, worker.bit)

    def _drop_all(self, worker: WorkerState) -> None:
        """Forget every block of ``worker`` (all media, predictions included)."""
        bit = worker.bit
        clear = clear_bit
        for medium, held in worker.blocks.items():
            nodes = self._nodes[medium]
            for key in set(held.values()):
                clear(nodes, key, bit)
            held.clear()
        worker.dups.clear()
        self._drop_predictions(worker)
        self._tree_sizes[worker.key] = 0

    def _nodes_for(self, medium: str) -> dict[int, int]:
        found = self._nodes.get(medium)
        if found is None:
            found = self._nodes[medium] = {}
        return found

    # ----------------------------------------------------------------- workers

    def _add_worker(self, key: WorkerKey) -> WorkerState:
        key = WorkerKey(*key)
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        else:
            slot = len(self._slots)
            self._slots.append(None)
            self._slot_keys.append(key)
        worker = WorkerState(key, slot)
        self._slots[slot] = worker
        self._slot_keys[slot] = key
        self._workers[key] = worker
        self._tree_sizes[key] = 0
        self._mask_keys.clear()
        return worker

    def remove_worker(self, worker_id: int, dp_rank: int | None = None) -> None:
        """Forget a worker: one rank, or all of its ranks when ``dp_rank`` is None."""
        keys = [
            key
            for key in self._workers
            if key.worker_id == worker_id and (dp_rank is None or key.dp_rank == dp_rank)
        ]
        for key in keys:
            worker = self._workers.pop(key)
            self._drop_all(worker)
            del self._tree_sizes[key]
            self._slots[worker.slot] = None
            heapq.heappush(self._free_slots, worker.slot)

    def reset_worker(self, worker: WorkerKey) -> None:
        """Drop every block of one cache and forget its last event id (its publisher
        restarted, or its stream is beyond repair); other workers are untouched."""
        state = self._workers.get(WorkerKey(*worker))
        if state is not None:
            self._drop_all(state)
            state.last_event_id = None

    def workers(self) -> list[WorkerKey]:
        """Every known cache, sorted."""
        return sorted(self._workers)

    def last_event_id(self, worker: WorkerKey) -> int | None:
        """The id of the last event applied for ``worker`` (``None``: none yet)."""
        state = self._workers.get(WorkerKey(*worker))
        return None if state is None else state.last_event_id

    def tree_size(self, worker: WorkerKey) -> int:
        """Device blocks ``worker`` holds: entries from events plus predicted ones."""
        return self._tree_sizes.get(WorkerKey(*worker), 0)

    def rejections(self, worker: WorkerKey) -> tuple[int, str | None]:
        """How many of ``worker``'s events were refused, and why the last one was."""
        state = self._workers.get(WorkerKey(*worker))
        return (0, None) if state is None else (state.rejected, state.last_rejection)

    # ------------------------------------------------------------------ lookup

    def find_matches(self, local_hashes: Sequence[int]) -> OverlapScores:
        """Per worker, how many blocks from the start of the prompt it holds.

        ``local_hashes`` are the prompt's local block hashes (:mod:`kvrouter.hashing`),
        unsigned 64-bit; a signed value means its unsigned twin.
        """
        if self._booking_heap:
            self._expire_due()
        try:
            scores = self._walk(self._gpu_nodes, local_hashes)
        except struct.error:  # signed or oversized hashes: walk their u64 values
            local_hashes = [h & _U64 for h in local_hashes]
            scores = self._walk(self._gpu_nodes, local_hashes)
        tiers = self._walk_tiers(local_hashes) if len(self._nodes) > 1 else {}
        sizes = self._tree_sizes
        if len(scores) == len(sizes):  # every worker matched: one C-level copy
            return OverlapScores(scores, tiers, sizes.copy())
        return OverlapScores(scores, tiers, {key: sizes[key] for key in scores})

    def _walk_tiers(self, local_hashes: Sequence[int]) -> dict[str, dict[WorkerKey, int]]:
        tiers: dict[str, dict[WorkerKey, int]] = {}
        for medium, nodes in self._nodes.items():
            if nodes and medium != DEFAULT_MEDIUM:
                found = self._walk(nodes, local_hashes)
                if found:
                    tiers[medium] = found
        return tiers

    def find_matches_sequence(self, sequence_hashes: Sequence[int]) -> OverlapScores:
        """:meth:`find_matches` for a caller that already holds the prompt's sequence
        hashes (:func:`kvrouter.hashing.hash_request` computes both lists once); the
        walk then does no hashing at all."""
        if self._booking_heap:
            self._expire_due()
        scores = self._walk_keys(self._gpu_nodes, sequence_hashes)
        tiers: dict[str, dict[WorkerKey, int]] = {}
        if len(self._nodes) > 1:
            for medium, nodes in self._nodes.items():
                if nodes and medium != DEFAULT_MEDIUM:
                    found = self._walk_keys(nodes, sequence_hashes)
                    if found:
                        tiers[medium] = found
        return self._overlap(scores, tiers)

    def _overlap(
        self, scores: dict[WorkerKey, int], tiers: dict[str, dict[WorkerKey, int]]
    ) -> OverlapScores:
        sizes = self._tree_sizes
        if len(scores) == len(sizes):  # every worker matched: one C-level copy
            return OverlapScores(scores, tiers, sizes.copy())
        return OverlapScores(scores, tiers, {key: sizes[key] for key in scores})

    def find_matches_for_request(
        self,
        token_ids: Sequence[int],
        salt: str | bytes | None = None,
        cache_salt: str | None = None,
    ) -> dict[int, int]:
        """``{worker_id: matched_blocks}`` for a prompt's token ids (device tier; the
        best of a worker's data-parallel ranks)."""
        local = compute_block_hashes(token_ids, self.block_size, salt=salt, cache_salt=cache_salt)
        out: dict[int, int] = {}
        for key, score in self.find_matches(local).scores.items():
            if score > out.get(key.worker_id, 0):
                out[key.worker_id] = score
        return out

    def _walk(self, nodes: dict[int, int], local_hashes: Sequence[int]) -> dict[WorkerKey, int]:
        """Scores on one medium; raises ``struct.error`` on a hash outside u64."""
        out: dict[WorkerKey, int] = {}
        if not local_hashes:
            return out
        prev = local_hashes[0] & _U64
        active = nodes.get(prev, 0)
        if not active:
            return out
        get = nodes.get
        groups = self._mask_keys
        xxh3 = _xxh3
        pack = _pack_pair
        seed = HASH_SEED
        depth = 1
        for local in islice(local_hashes, 1, None):
            prev = xxh3(pack(prev, local), seed)
            node = get(prev, 0)
            # A block held by one worker stores that worker's bit object; once
            # ``active`` is that object, identity skips two big-int operations.
            if node is not active:
                mask = node & active
                if mask != active:
                    # _score, inlined: this is the hottest loop of the router.
                    dropped = active ^ mask
                    group = groups.get(dropped) or self._group(dropped)
                    if out:
                        out.update(dict.fromkeys(group, depth))
                    else:
                        out = dict.fromkeys(group, depth)
                    if not mask:
                        return out
                    active = mask
                if node == active:
                    active = node
            depth += 1
        return self._score(out, active, depth)

    def _walk_keys(self, nodes: dict[int, int], keys: Sequence[int]) -> dict[WorkerKey, int]:
        """:meth:`_walk` for sequence hashes computed by the caller: no hashing."""
        out: dict[WorkerKey, int] = {}
        active = -1  # every worker
        get = nodes.get
        depth = 0
        for key in keys:
            mask = get(key, 0) & active
            if mask != active:
                if depth:
                    out = self._score(out, active ^ mask, depth)
                if not mask:
                    return out
                active = mask
            depth += 1
        return self._score(out, active, depth) if depth else out

    def _score(self, out: dict[WorkerKey, int], mask: int, depth: int) -> dict[WorkerKey, int]:
        """Give ``depth`` to every worker in ``mask``; returns the (maybe new) dict."""
        group = self._mask_keys.get(mask) or self._group(mask)
        if not out:
            return dict.fromkeys(group, depth)
        out.update(dict.fromkeys(group, depth))
        return out

    def _group(self, mask: int) -> dict[WorkerKey, None]:
        """The workers whose bits are in ``mask``, remembered for the next lookup."""
        group = dict.fromkeys(keys_of_mask(self._slot_keys, mask))
        if len(self._mask_keys) >= 4096:  # bounded; the groups in use come back at once
            self._mask_keys.clear()
        self._mask_keys[mask] = group
        return group

    # ------------------------------------------------------------------- stats

    def stats(self) -> IndexerStats:
        """Counters and sizes, as a frozen value (expired predictions swept first)."""
        if self._booking_heap:
            self._expire_due()
        by_medium: dict[str, int] = {}
        for state in self._workers.values():
            for medium, held in state.blocks.items():
                by_medium[medium] = by_medium.get(medium, 0) + len(held)
        counts = self._counts
        return IndexerStats(
            num_workers=len(self._workers),
            num_blocks=sum(len(nodes) for nodes in self._nodes.values()),
            num_entries=sum(by_medium.values()),
            num_predicted=self._num_predicted,
            entries_by_medium={m: n for m, n in sorted(by_medium.items()) if n},
            events_applied=counts["events_applied"],
            events_rejected=sum(self._rejected.values()),
            rejected=dict(self._rejected),
            unknown_removed_blocks=counts["unknown_removed_blocks"],
            event_id_gaps=counts["event_id_gaps"],
            blocks_stored=counts["blocks_stored"],
            blocks_removed=counts["blocks_removed"],
            predicted_added=counts["predicted_added"],
            predicted_expired=counts["predicted_expired"],
            predicted_pruned=counts["predicted_pruned"],
            predicted_superseded=counts["predicted_superseded"],
            predicted_withdrawn=counts["predicted_withdrawn"],
        )

    # --------------------------------------------------------------- snapshots

    def snapshot(self) -> bytes:
        """The whole index (blocks, predictions with their remaining time, last event
        ids, settings) as bytes for :meth:`restore`."""
        from kvrouter.index.snapshot import encode_snapshot

        if self._booking_heap:
            self._expire_due()
        return encode_snapshot(self)

    @classmethod
    def restore(
        cls,
        data: bytes,
        *,
        clock: Clock = monotonic,
        kv_listener: EventSource | None = None,
    ) -> KvIndexer:
        """Rebuild an indexer from :meth:`snapshot` bytes; raises ``ValueError`` if they
        are not a snapshot."""
        from kvrouter.index.snapshot import decode_snapshot

        return decode_snapshot(data, clock=clock, kv_listener=kv_listener)

    # Used by the snapshot codec, which lives in its own module.

    def _restore_worker(
        self, key: WorkerKey, last_event_id: int | None, blocks: dict[str, dict[int, int]]
    ) -> None:
        worker = self._add_worker(key)
        worker.last_event_id = last_event_id
        bit = worker.bit
        for medium, held in blocks.items():
            nodes = self._nodes_for(medium)
            for key_hash in held.values():
                mask = nodes.get(key_hash, 0)
                if mask & bit:
                    dup = (medium, key_hash)
                    worker.dups[dup] = worker.dups.get(dup, 0) + 1
                else:
                    nodes[key_hash] = mask | bit if mask else bit
            worker.blocks[medium] = held
            if medium == DEFAULT_MEDIUM:
                worker.gpu = held
        self._tree_sizes[key] = len(worker.gpu)

    def _restore_predicted(self, key: WorkerKey, key_hashes: list[int], expiry: float) -> None:
        state = self._workers.get(key)
        if state is None:
            state = self._add_worker(key)
        self._book(state, key_hashes, expiry)
