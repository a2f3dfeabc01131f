"""NVIDIA Dynamo's KV events as JSON (its ``KvCacheEvent``), to and from :class:`RouterEvent`.

Dynamo publishers already carry the router's local hash (``tokens_hash``) next to the
engine's hash (``block_hash``), so nothing is recomputed::

    {"event_id": 1, "dp_rank": 0,
     "data": {"stored": {"parent_hash": null,
                         "blocks": [{"block_hash": 100, "tokens_hash": 5}]}}}
    {"event_id": 2, "data": {"removed": {"block_hashes": [100]}}}
    {"event_id": 3, "data": "cleared"}

``dp_rank`` is optional (default 0) and unknown keys are ignored. Three optional keys
that Dynamo does not send carry what the router's model has beyond Dynamo's:
``lora_name`` and ``block_size`` in ``stored``, and ``medium`` in ``stored`` / ``removed``
(default ``"GPU"``). :func:`encode_dynamo_event` writes them only when they differ
from the default, so its output for plain GPU events is exactly Dynamo's shape.

>>> event = decode_dynamo_event('{"event_id": 3, "data": "cleared"}', worker_id=7)
>>> event.worker, event.event_id, event.data
(WorkerKey(worker_id=7, dp_rank=0), 3, Cleared())
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from kvrouter.errors import DecodeError
from kvrouter.events.model import DEFAULT_MEDIUM, Cleared, Removed, RouterEvent, Stored, StoredBlock

__all__ = ["decode_dynamo_event", "encode_dynamo_event"]

# msgspec cannot put an upper bound past int64 on an int; _check_u64 does it.
_U64 = Annotated[int, msgspec.Meta(ge=0)]
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]


class _Block(msgspec.Struct, gc=False):
    block_hash: _U64
    tokens_hash: _U64


class _StoredData(msgspec.Struct, gc=False):
    blocks: list[_Block]
    parent_hash: _U64 | None = None
    lora_name: str | None = None
    block_size: Annotated[int, msgspec.Meta(gt=0)] | None = None
    medium: str | None = None


class _RemovedData(msgspec.Struct, gc=False):
    block_hashes: list[_U64]
    medium: str | None = None


class _DataMap(msgspec.Struct, gc=False):
    stored: _StoredData | None = None
    removed: _RemovedData | None = None


class _Event(msgspec.Struct, gc=False):
    event_id: _U64
    # "cleared" is a bare string, the other kinds are one-key objects; msgspec cannot
    # put a string literal and an object in one union with a Struct, so data is parsed
    # in a second step.
    data: msgspec.Raw
    dp_rank: _U32 | None = None


_event_decoder = msgspec.json.Decoder(_Event)
_data_decoder = msgspec.json.Decoder(_DataMap | Literal["cleared"])
_encoder = msgspec.json.Encoder()


def decode_dynamo_event(data: bytes | str, *, worker_id: int) -> RouterEvent:
    """Decode one Dynamo JSON KV event published by ``worker_id``.

    Raises :class:`DecodeError` (naming what is wrong) for anything malformed.
    """
    try:
        event = _event_decoder.decode(data)
        body: _DataMap | str = _data_decoder.decode(event.data)
    except (msgspec.DecodeError, RecursionError, UnicodeError) as exc:
        # RecursionError: nesting past msgspec's limit; UnicodeError: bad UTF-8.
        raise DecodeError(f"malformed Dynamo KV event: {exc}") from exc
    _check_u64(event.event_id, "event_id")
    return RouterEvent(worker_id, event.dp_rank or 0, event.event_id, _convert(body))


def _check_u64(value: int, what: str) -> None:
    if value > _U64_MAX:
        raise DecodeError(f"Dynamo KV event {what} {value} does not fit in 64 bits")


def _convert(body: _DataMap | str) -> Stored | Removed | Cleared:
    if isinstance(body, str):
        return Cleared()
    if (body.stored is None) == (body.removed is None):
        raise DecodeError("Dynamo KV event data must hold exactly one of 'stored' or 'removed'")
    if body.stored is not None:
        return _convert_stored(body.stored)
    assert body.removed is not None
    if not body.removed.block_hashes:
        raise DecodeError("Dynamo 'removed' event has no block hashes")
    _check_u64(max(body.removed.block_hashes), "block hash")
    return Removed(tuple(body.removed.block_hashes), body.removed.medium or DEFAULT_MEDIUM)


def _convert_stored(stored: _StoredData) -> Stored:
    if not stored.blocks:
        raise DecodeError("Dynamo 'stored' event has no blocks")
    for block in stored.blocks:
        _check_u64(max(block.block_hash, block.tokens_hash), "block hash")
    if stored.parent_hash is not None:
        _check_u64(stored.parent_hash, "parent hash")
    medium = stored.medium or DEFAULT_MEDIUM
    blocks = tuple(StoredBlock(b.block_hash, b.tokens_hash, medium) for b in stored.blocks)
    return Stored(stored.parent_hash, blocks, stored.lora_name or None, stored.block_size)


def encode_dynamo_event(event: RouterEvent) -> bytes:
    """Encode ``event`` as Dynamo's JSON ``KvCacheEvent`` (``worker_id`` is not part of it).

    Raises ``ValueError`` for a ``Stored`` whose blocks are on different media, which
    the format cannot express.
    """
    return _encoder.encode(
        {"event_id": event.event_id, "data": _encode_data(event.data), "dp_rank": event.dp_rank}
    )


def _encode_data(data: Stored | Removed | Cleared) -> Any:
    if isinstance(data, Cleared):
        return "cleared"
    if isinstance(data, Removed):
        removed: dict[str, Any] = {"block_hashes": list(data.engine_hashes)}
        if data.medium != DEFAULT_MEDIUM:
            removed["medium"] = data.medium
        return {"removed": removed}
    return {"stored": _encode_stored(data)}


def _encode_stored(data: Stored) -> dict[str, Any]:
    media = {block.medium for block in data.blocks}
    if len(media) > 1:
        raise ValueError(f"a Dynamo stored event has one medium, got {sorted(media)}")
    stored: dict[str, Any] = {
        "parent_hash": data.parent_engine_hash,
        "blocks": [
            {"block_hash": block.engine_hash, "tokens_hash": block.local_hash}
            for block in data.blocks
        ],
    }
    if data.lora_name is not None:
        stored["lora_name"] = data.lora_name
    if data.block_size is not None:
        stored["block_size"] = data.block_size
    medium = media.pop() if media else DEFAULT_MEDIUM
    if medium != DEFAULT_MEDIUM:
        stored["medium"] = medium
    return stored
