"""Values the indexer hands out: match results and statistics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from kvrouter.events.model import WorkerKey

__all__ = ["REJECT_KINDS", "IndexerStats", "OverlapScores"]

# Why an event was (fully or partly) rejected; the keys of ``IndexerStats.rejected``.
REJECT_KINDS = (
    "stale_event_id",  # event id <= the last one applied for that worker (duplicate or old)
    "block_size_mismatch",  # Stored.block_size set and != the indexer's block size
    "unknown_parent",  # Stored whose parent engine hash the worker does not hold
    "unknown_removed",  # Removed naming an engine hash the worker does not hold
)


class OverlapScores(NamedTuple):
    """What :meth:`KvIndexer.find_matches` found for one prompt.

    * ``scores``: device (GPU) tier, per worker, the number of consecutive blocks from
      the start of the prompt that the worker holds (real or predicted); workers that
      match nothing are absent.
    * ``tiers``: the same for every other medium that matched (``{"CPU": {...}}``),
      computed from that medium's blocks only; never mixed into ``scores``.
    * ``tree_sizes``: for each worker in ``scores``, the device blocks it holds (real
      entries plus predicted ones); see :meth:`KvIndexer.tree_size` for any worker.

    A NamedTuple because one is built per routed request.

    >>> OverlapScores({WorkerKey(1): 3}, {}, {WorkerKey(1): 10}).scores[WorkerKey(1)]
    3
    """

    scores: dict[WorkerKey, int]
    tiers: dict[str, dict[WorkerKey, int]]
    tree_sizes: dict[WorkerKey, int]


@dataclass(frozen=True, slots=True)
class IndexerStats:
    """A snapshot of the indexer's counters (see :meth:`KvIndexer.stats`).

    ``num_blocks`` counts distinct blocks over all media (a block held only as a
    prediction counts too); ``num_entries`` counts (block, worker) pairs known from
    events, over all media; ``num_predicted`` the live predicted (block, worker) pairs.
    ``rejected`` maps each of :data:`REJECT_KINDS` to the number of events rejected for
    that reason (a Removed naming some unknown hashes is applied for the rest and
    counted once); ``unknown_removed_blocks`` counts the unknown hashes themselves.
    """

    num_workers: int
    num_blocks: int
    num_entries: int
    num_predicted: int
    entries_by_medium: Mapping[str, int]
    events_applied: int
    events_rejected: int
    rejected: Mapping[str, int]
    unknown_removed_blocks: int
    event_id_gaps: int
    blocks_stored: int
    blocks_removed: int
    predicted_added: int
    predicted_expired: int
    predicted_pruned: int
    predicted_superseded: int
    predicted_withdrawn: int  # taken back: their request failed before any work
