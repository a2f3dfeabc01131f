"""Builders for index tests: events from short chains of local hashes."""

from __future__ import annotations

from collections.abc import Sequence

from kvrouter.events.model import Cleared, Removed, RouterEvent, Stored, StoredBlock, WorkerKey


def engine_hash(worker: WorkerKey, local_chain: Sequence[int], medium: str = "GPU") -> int:
    """A deterministic engine hash that differs per worker, like a real engine's."""
    return hash((worker, tuple(local_chain), medium)) & 0xFFFFFFFFFFFFFFFF


def stored(
    worker: WorkerKey,
    event_id: int,
    prefix: Sequence[int],
    new: Sequence[int],
    *,
    medium: str = "GPU",
    block_size: int | None = None,
    parent_engine_hash: int | None = None,
) -> RouterEvent:
    """Store ``new`` blocks after ``prefix`` (which the worker already holds)."""
    chain = list(prefix)
    blocks = []
    for local in new:
        chain.append(local)
        blocks.append(StoredBlock(engine_hash(worker, chain, medium), local, medium))
    parent = parent_engine_hash
    if parent is None and prefix:
        parent = engine_hash(worker, prefix, medium)
    data = Stored(parent, tuple(blocks), block_size=block_size)
    return RouterEvent(worker.worker_id, worker.dp_rank, event_id, data)


def removed(
    worker: WorkerKey, event_id: int, chains: Sequence[Sequence[int]], *, medium: str = "GPU"
) -> RouterEvent:
    hashes = tuple(engine_hash(worker, chain, medium) for chain in chains)
    return RouterEvent(worker.worker_id, worker.dp_rank, event_id, Removed(hashes, medium))


def cleared(worker: WorkerKey, event_id: int) -> RouterEvent:
    return RouterEvent(worker.worker_id, worker.dp_rank, event_id, Cleared())
