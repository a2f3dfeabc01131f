"""Property tests: the vLLM decoder raises nothing but DecodeError, and round-trips."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrouter.errors import DecodeError
from kvrouter.events.model import Cleared, Removed, Stored, StoredBlock
from kvrouter.events.vllm import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    KVCacheEvent,
    KVEventBatch,
    VllmEventDecoder,
    encode_batch,
)
from kvrouter.hashing import compute_block_hashes, make_salt

BLOCK_SIZE = 2
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

VALID_PAYLOADS = [
    encode_batch(
        KVEventBatch(
            1.0,
            [
                BlockStored([1, 2], None, [1, 2, 3, 4], BLOCK_SIZE, None, "CPU", "lora"),
                BlockRemoved([1], "GPU", 0),
                AllBlocksCleared(),
            ],
            1,
        ),
        form=form,
    )
    for form in ("array", "map")
]

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.binary(max_size=10)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type"]),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def check_only_decode_error(payload: bytes) -> None:
    try:
        batch = VllmEventDecoder(BLOCK_SIZE).decode(payload)
    except DecodeError:
        return
    assert isinstance(batch, DecodedBatch)
    assert all(isinstance(e, Stored | Removed | Cleared) for e in batch.events)
    assert all(type(e) is DecodeError for e in batch.errors)


@PROPERTY_SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(payload: bytes) -> None:
    check_only_decode_error(payload)


@PROPERTY_SETTINGS
@given(st.data())
def test_mutated_valid_payloads(data: st.DataObject) -> None:
    payload = bytearray(data.draw(st.sampled_from(VALID_PAYLOADS)))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        index = data.draw(st.integers(0, max(len(payload) - 1, 0)))
        if op == "flip" and payload:
            payload[index] = data.draw(st.integers(0, 255))
        elif op == "insert":
            payload.insert(index, data.draw(st.integers(0, 255)))
        elif op == "delete" and payload:
            del payload[index]
        else:
            del payload[index:]
    check_only_decode_error(bytes(payload))


def _mutate_event(data: st.DataObject, event: Any) -> Any:
    """Replace, drop or add one field of a decoded event."""
    if isinstance(event, list) and event:
        index = data.draw(st.integers(0, len(event)))
        value = data.draw(msgpack_values)
        if index == len(event):
            return [*event, value]
        if data.draw(st.booleans()):
            return event[:index]
        return [*event[:index], value, *event[index + 1 :]]
    if isinstance(event, dict):
        key = data.draw(st.sampled_from([*event, "new"]))
        if data.draw(st.booleans()):
            return {k: v for k, v in event.items() if k != key}
        return {**event, key: data.draw(msgpack_values)}
    return event


@PROPERTY_SETTINGS
@given(st.data())
def test_structured_mutations(data: st.DataObject) -> None:
    ts, events, dp_rank = msgspec.msgpack.decode(data.draw(st.sampled_from(VALID_PAYLOADS)))
    events = [_mutate_event(data, e) for e in events]
    events += data.draw(st.lists(msgpack_values, max_size=2))
    batch: list[Any] = [ts, events, dp_rank]
    if data.draw(st.booleans()):
        batch[data.draw(st.integers(0, 2))] = data.draw(msgpack_values)
    check_only_decode_error(msgspec.msgpack.encode(batch))


hashes = st.integers(-(2**63), 2**64 - 1)
media = st.sampled_from([None, "GPU", "CPU", "DISK"])


@st.composite
def stored_events(draw: st.DrawFn) -> BlockStored:
    block_hashes = draw(st.lists(hashes, min_size=1, max_size=4))
    tokens = draw(
        st.lists(
            st.integers(0, 2**32 - 1),
            min_size=len(block_hashes) * BLOCK_SIZE,
            max_size=len(block_hashes) * BLOCK_SIZE,
        )
    )
    return BlockStored(
        block_hashes,
        draw(st.none() | hashes),
        tokens,
        BLOCK_SIZE,
        draw(st.none() | st.integers(0, 9)),
        draw(media),
        draw(st.none() | st.text(min_size=1, max_size=8)),
    )


events_strategy: st.SearchStrategy[KVCacheEvent] = st.one_of(
    stored_events(),
    st.builds(BlockRemoved, st.lists(hashes, min_size=1, max_size=4), media),
    st.just(AllBlocksCleared()),
)


def expected(event: KVCacheEvent) -> Stored | Removed | Cleared:
    mask = 2**64 - 1
    if isinstance(event, BlockStored):
        salt = make_salt(lora_name=event.lora_name) if event.lora_name else None
        local = compute_block_hashes(event.token_ids, BLOCK_SIZE, salt=salt)
        medium = event.medium or "GPU"
        blocks = tuple(
            StoredBlock(h & mask, lh, medium)
            for h, lh in zip(event.block_hashes, local, strict=True)
        )
        parent = None if event.parent_block_hash is None else event.parent_block_hash & mask
        return Stored(parent, blocks, event.lora_name, BLOCK_SIZE)
    if isinstance(event, BlockRemoved):
        return Removed(tuple(h & mask for h in event.block_hashes), event.medium or "GPU")
    return Cleared()


@PROPERTY_SETTINGS
@given(
    events=st.lists(events_strategy, max_size=5),
    ts=st.floats(allow_nan=False),
    dp_rank=st.none() | st.integers(0, 64),
    form=st.sampled_from(["array", "map"]),
)
def test_round_trip(events: list[KVCacheEvent], ts: float, dp_rank: int | None, form: Any) -> None:
    payload = encode_batch(KVEventBatch(ts, events, dp_rank), form=form)
    batch = VllmEventDecoder(BLOCK_SIZE).decode(payload)
    assert batch == DecodedBatch(ts, dp_rank or 0, [expected(e) for e in events], [])


@st.composite
def engine_events(draw: st.DrawFn) -> KVCacheEvent:
    """Events as an in-process engine hands them over: numpy token ids, odd block sizes."""
    event = draw(events_strategy)
    if isinstance(event, BlockStored):
        if draw(st.booleans()):
            event.token_ids = np.asarray(event.token_ids, dtype=np.uint32)
        if draw(st.booleans()):
            event.block_size = draw(st.integers(1, 4))  # mismatches are errors
    return event


@PROPERTY_SETTINGS
@given(
    events=st.lists(engine_events(), max_size=5),
    ts=st.floats(allow_nan=False),
    dp_rank=st.none() | st.integers(0, 64),
)
def test_convert_equals_decode(events: list[KVCacheEvent], ts: float, dp_rank: int | None) -> None:
    batch = KVEventBatch(ts, events, dp_rank)
    wire_decoder, direct_decoder = VllmEventDecoder(BLOCK_SIZE), VllmEventDecoder(BLOCK_SIZE)
    wire = wire_decoder.decode(encode_batch(batch))
    direct = direct_decoder.convert(batch)
    assert direct.events == wire.events
    assert [str(e) for e in direct.errors] == [str(e) for e in wire.errors]
    assert (direct.ts, direct.dp_rank) == (wire.ts, wire.dp_rank)
    assert direct_decoder.stats() == wire_decoder.stats()
