"""Snapshots of a :class:`~kvrouter.index.KvIndexer` as msgpack bytes.

A snapshot holds what cannot be recomputed: per worker its last event id and, per
medium, the pairs (engine hash, sequence hash); the predicted entries in insertion
order with the time each had left; and the settings. Worker masks, slots and
duplicate counts are rebuilt on restore. Predicted entries keep their *remaining*
time, so a snapshot restores correctly under another clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from kvrouter.clock import Clock
from kvrouter.events.model import WorkerKey

if TYPE_CHECKING:
    from kvrouter.index.indexer import EventSource, KvIndexer

__all__ = ["SNAPSHOT_VERSION", "decode_snapshot", "encode_snapshot"]

# 2: predictions are bounded without a prune target ratio (the field is gone).
SNAPSHOT_VERSION = 2


class _MediumBlocks(msgspec.Struct, array_like=True, gc=False):
    medium: str
    engine_hashes: list[int]
    sequence_hashes: list[int]


class _WorkerBlocks(msgspec.Struct, array_like=True, gc=False):
    worker_id: int
    dp_rank: int
    last_event_id: int | None
    media: list[_MediumBlocks]


class _Predicted(msgspec.Struct, array_like=True, gc=False):
    worker_id: int
    dp_rank: int
    sequence_hash: int
    remaining_s: float


class _Snapshot(msgspec.Struct, gc=False):
    version: int
    block_size: int
    predicted_ttl_s: float
    max_predicted_blocks: int
    workers: list[_WorkerBlocks]
    predicted: list[_Predicted]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Snapshot)


def encode_snapshot(indexer: KvIndexer) -> bytes:
    """Serialise ``indexer`` (see :meth:`KvIndexer.snapshot`)."""
    workers = [
        _WorkerBlocks(
            state.key.worker_id,
            state.key.dp_rank,
            state.last_event_id,
            [
                _MediumBlocks(medium, list(held), list(held.values()))
                for medium, held in state.blocks.items()
                if held
            ],
        )
        for state in indexer._workers.values()
    ]
    now = indexer._clock()
    predicted = [
        _Predicted(state.key.worker_id, state.key.dp_rank, seq_hash, expiry - now)
        for state, seq_hash, expiry in indexer._predicted_in_order()
    ]
    snap = _Snapshot(
        version=SNAPSHOT_VERSION,
        block_size=indexer.block_size,
        predicted_ttl_s=indexer.predicted_ttl_s,
        max_predicted_blocks=indexer.max_predicted_blocks,
        workers=workers,
        predicted=predicted,
    )
    return _encoder.encode(snap)


def decode_snapshot(
    data: bytes, *, clock: Clock, kv_listener: EventSource | None = None
) -> KvIndexer:
    """Rebuild an indexer from :func:`encode_snapshot` bytes."""
    from kvrouter.index.indexer import KvIndexer

    try:
        snap = _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise ValueError(f"not a kvrouter indexer snapshot: {exc}") from exc
    if snap.version != SNAPSHOT_VERSION:
        raise ValueError(
            f"indexer snapshot version {snap.version} is not supported "
            f"(this build reads version {SNAPSHOT_VERSION})"
        )
    indexer = KvIndexer(
        kv_listener,
        snap.block_size,
        clock=clock,
        predicted_ttl_s=snap.predicted_ttl_s,
        max_predicted_blocks=snap.max_predicted_blocks,
    )
    seen: set[WorkerKey] = set()
    for worker in snap.workers:
        key = WorkerKey(worker.worker_id, worker.dp_rank)
        if key in seen:
            raise ValueError(f"indexer snapshot is corrupt: worker {key} appears twice")
        seen.add(key)
        blocks: dict[str, dict[int, int]] = {}
        for media in worker.media:
            if len(media.engine_hashes) != len(media.sequence_hashes):
                raise ValueError("indexer snapshot is corrupt: hash lists differ in length")
            pairs = zip(media.engine_hashes, media.sequence_hashes, strict=True)
            blocks[media.medium] = dict(pairs)
        indexer._restore_worker(key, worker.last_event_id, blocks)
    _restore_predicted(indexer, snap.predicted, clock())
    return indexer


def _restore_predicted(indexer: KvIndexer, entries: list[_Predicted], now: float) -> None:
    """Re-book the predictions in their order; a run of entries of one worker with
    the same time left (one booking when it was taken) becomes one booking again."""
    run: list[int] = []
    run_of: tuple[int, int, float] | None = None
    for entry in entries:
        if entry.remaining_s <= 0:
            continue
        of = (entry.worker_id, entry.dp_rank, entry.remaining_s)
        if of != run_of:
            if run_of is not None:
                indexer._restore_predicted(WorkerKey(*run_of[:2]), run, now + run_of[2])
            run, run_of = [], of
        run.append(entry.sequence_hash)
    if run_of is not None:
        indexer._restore_predicted(WorkerKey(*run_of[:2]), run, now + run_of[2])
