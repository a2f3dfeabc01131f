"""Snapshots of a :class:`~kvrouter.index.KvIndexer` as msgpack bytes.

A snapshot holds what cannot be recomputed: per worker its last event id and, per
medium, the pairs (engine hash, sequence hash); the predicted entries in insertion
order with the time each had left; and the settings. Worker masks, slots and
duplicate counts are rebuilt on restore. Predicted entries keep their *remaining*
time, so a snapshot restores correctly under another clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec

from kvrouter.clock import Clock
from kvrouter.events.model import WorkerKey

if TYPE_CHECKING:
    from kvrouter.index.indexer import EventSource, KvIndexer

__all__ = ["SNAPSHOT_VERSION", "decode_snapshot", "encode_snapshot"]

SNAPSHOT_VERSION = 1


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
    prune_target_ratio: float
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
        _Predicted(key.worker_id, key.dp_rank, seq_hash, expiry - now)
        for key, seq_hash, expiry in _predicted_in_order(indexer)
    ]
    snap = _Snapshot(
        version=SNAPSHOT_VERSION,
        block_size=indexer.block_size,
        predicted_ttl_s=indexer.predicted_ttl_s,
        max_predicted_blocks=indexer.max_predicted_blocks,
        prune_target_ratio=indexer.prune_target_ratio,
        workers=workers,
        predicted=predicted,
    )
    return _encoder.encode(snap)


def _predicted_in_order(indexer: KvIndexer) -> Iterator[tuple[WorkerKey, int, float]]:
    slots = indexer._slots
    for slot, seq_hash in indexer._pred_order:
        state = slots[slot]
        assert state is not None, "a prediction outlived its worker"
        yield state.key, seq_hash, state.predicted[seq_hash]


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
        prune_target_ratio=snap.prune_target_ratio,
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
    now = clock()
    for entry in snap.predicted:
        if entry.remaining_s > 0:
            indexer._restore_predicted(
                WorkerKey(entry.worker_id, entry.dp_rank),
                entry.sequence_hash,
                now + entry.remaining_s,
            )
    return indexer
