"""Dynamo JSON KV events: exact decoding, exact encoding, round trips, only DecodeError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.errors import DecodeError
from kvrouter.events.dynamo import decode_dynamo_event, encode_dynamo_event
from kvrouter.events.model import Cleared, Removed, RouterEvent, Stored, StoredBlock

STORED_JSON = (
    '{"event_id": 1, "data": {"stored": {"parent_hash": null, '
    '"blocks": [{"block_hash": 100, "tokens_hash": 5}]}}, "dp_rank": 0}'
)
REMOVED_JSON = '{"event_id": 2, "data": {"removed": {"block_hashes": [100]}}, "dp_rank": 0}'
CLEARED_JSON = '{"event_id": 3, "data": "cleared", "dp_rank": 0}'
U64_MAX = 2**64 - 1


class TestDecode:
    def test_stored(self) -> None:
        assert decode_dynamo_event(STORED_JSON, worker_id=9) == RouterEvent(
            9, 0, 1, Stored(None, (StoredBlock(100, 5, "GPU"),), None, None)
        )

    def test_removed(self) -> None:
        assert decode_dynamo_event(REMOVED_JSON, worker_id=9) == RouterEvent(
            9, 0, 2, Removed((100,), "GPU")
        )

    def test_cleared(self) -> None:
        assert decode_dynamo_event(CLEARED_JSON, worker_id=9) == RouterEvent(9, 0, 3, Cleared())

    def test_bytes_input(self) -> None:
        assert decode_dynamo_event(STORED_JSON.encode(), worker_id=1) == decode_dynamo_event(
            STORED_JSON, worker_id=1
        )

    @pytest.mark.parametrize(("dp_rank", "expected"), [(None, 0), (0, 0), (5, 5)])
    def test_dp_rank(self, dp_rank: int | None, expected: int) -> None:
        body = {"event_id": 4, "data": "cleared", "dp_rank": dp_rank}
        assert decode_dynamo_event(json.dumps(body), worker_id=1).dp_rank == expected

    def test_dp_rank_absent(self) -> None:
        event = decode_dynamo_event('{"event_id": 4, "data": "cleared"}', worker_id=1)
        assert event.worker == (1, 0)

    def test_chain_with_parent_and_big_hashes(self) -> None:
        body = {
            "event_id": U64_MAX,
            "data": {
                "stored": {
                    "parent_hash": U64_MAX,
                    "blocks": [
                        {"block_hash": 1, "tokens_hash": U64_MAX},
                        {"block_hash": U64_MAX, "tokens_hash": 0},
                    ],
                }
            },
            "dp_rank": 2,
        }
        assert decode_dynamo_event(json.dumps(body), worker_id=3) == RouterEvent(
            3,
            2,
            U64_MAX,
            Stored(U64_MAX, (StoredBlock(1, U64_MAX), StoredBlock(U64_MAX, 0)), None, None),
        )

    def test_unknown_keys_ignored(self) -> None:
        body = {
            "event_id": 1,
            "data": {
                "stored": {
                    "parent_hash": None,
                    "blocks": [{"block_hash": 100, "tokens_hash": 5, "mm_extra_info": None}],
                    "future": [1, 2],
                },
                "other": 1,
            },
            "dp_rank": 0,
            "worker_id": 77,
        }
        assert decode_dynamo_event(json.dumps(body), worker_id=9) == decode_dynamo_event(
            STORED_JSON, worker_id=9
        )

    def test_extension_keys(self) -> None:
        body = {
            "event_id": 1,
            "data": {
                "stored": {
                    "parent_hash": 7,
                    "blocks": [{"block_hash": 100, "tokens_hash": 5}],
                    "lora_name": "adapter",
                    "block_size": 16,
                    "medium": "CPU",
                }
            },
        }
        assert decode_dynamo_event(json.dumps(body), worker_id=1).data == Stored(
            7, (StoredBlock(100, 5, "CPU"),), "adapter", 16
        )
        removed = {"event_id": 2, "data": {"removed": {"block_hashes": [1], "medium": "DISK"}}}
        assert decode_dynamo_event(json.dumps(removed), worker_id=1).data == Removed((1,), "DISK")


class TestDecodeErrors:
    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("", "malformed"),
            ("not json", "malformed"),
            ("[]", "Expected `object`"),
            ('{"data": "cleared"}', "event_id"),
            ('{"event_id": 1}', "data"),
            ('{"event_id": -1, "data": "cleared"}', "event_id"),
            ('{"event_id": 1.5, "data": "cleared"}', "event_id"),
            ('{"event_id": 18446744073709551616, "data": "cleared"}', "64 bits"),
            ('{"event_id": 1, "data": "clear"}', "clear"),
            ('{"event_id": 1, "data": 5}', "malformed"),
            ('{"event_id": 1, "data": {}}', "exactly one"),
            ('{"event_id": 1, "data": "cleared", "dp_rank": -1}', "dp_rank"),
            (
                '{"event_id": 1, "data": {"stored": {"blocks": []}, '
                '"removed": {"block_hashes": [1]}}}',
                "exactly one",
            ),
            ('{"event_id": 1, "data": {"stored": {"blocks": []}}}', "no blocks"),
            ('{"event_id": 1, "data": {"stored": {"parent_hash": 1}}}', "blocks"),
            ('{"event_id": 1, "data": {"stored": {"blocks": [{"block_hash": 1}]}}}', "tokens_hash"),
            (
                '{"event_id": 1, "data": {"stored": {"blocks": '
                '[{"block_hash": -3, "tokens_hash": 1}]}}}',
                "block_hash",
            ),
            (
                '{"event_id": 1, "data": {"stored": {"blocks": '
                '[{"block_hash": 18446744073709551616, "tokens_hash": 1}]}}}',
                "64 bits",
            ),
            ('{"event_id": 1, "data": {"removed": {"block_hashes": []}}}', "no block hashes"),
            ('{"event_id": 1, "data": {"removed": {"block_hashes": ["1"]}}}', "block_hashes"),
            ('{"event_id": 1, "data": {"removed": {"block_hashes": [1e99]}}}', "malformed"),
            (b'{"event_id": 1, "data": "\xff"}', "malformed"),
            ('{"event_id": 1, "data": "\udc00"}', "malformed"),
            ("[" * 100_000, "malformed"),
        ],
    )
    def test_malformed(self, text: str | bytes, fragment: str) -> None:
        with pytest.raises(DecodeError, match=fragment.replace("[", r"\[")):
            decode_dynamo_event(text, worker_id=1)


class TestEncode:
    @pytest.mark.parametrize("text", [STORED_JSON, REMOVED_JSON, CLEARED_JSON])
    def test_dynamo_examples_encode_to_dynamo_shape(self, text: str) -> None:
        event = decode_dynamo_event(text, worker_id=5)
        assert json.loads(encode_dynamo_event(event)) == json.loads(text)

    def test_exact_bytes(self) -> None:
        event = RouterEvent(1, 2, 3, Removed((4, 5)))
        assert encode_dynamo_event(event) == (
            b'{"event_id":3,"data":{"removed":{"block_hashes":[4,5]}},"dp_rank":2}'
        )

    def test_extensions_only_when_set(self) -> None:
        event = RouterEvent(1, 0, 7, Stored(9, (StoredBlock(1, 2, "CPU"),), "adapter", 16))
        assert json.loads(encode_dynamo_event(event)) == {
            "event_id": 7,
            "data": {
                "stored": {
                    "parent_hash": 9,
                    "blocks": [{"block_hash": 1, "tokens_hash": 2}],
                    "lora_name": "adapter",
                    "block_size": 16,
                    "medium": "CPU",
                }
            },
            "dp_rank": 0,
        }
        removed = RouterEvent(1, 0, 8, Removed((1,), "DISK"))
        assert json.loads(encode_dynamo_event(removed))["data"] == {
            "removed": {"block_hashes": [1], "medium": "DISK"}
        }

    def test_mixed_media_cannot_be_encoded(self) -> None:
        data = Stored(None, (StoredBlock(1, 2, "GPU"), StoredBlock(3, 4, "CPU")))
        with pytest.raises(ValueError, match="one medium"):
            encode_dynamo_event(RouterEvent(1, 0, 1, data))


u64 = st.integers(0, U64_MAX)
media = st.sampled_from(["GPU", "CPU", "DISK"])


@st.composite
def stored_data(draw: st.DrawFn) -> Stored:
    medium = draw(media)
    blocks = draw(
        st.lists(st.builds(StoredBlock, u64, u64, st.just(medium)), min_size=1, max_size=4)
    )
    return Stored(
        draw(st.none() | u64),
        tuple(blocks),
        draw(st.none() | st.text(min_size=1, max_size=8)),
        draw(st.none() | st.integers(1, 256)),
    )


router_events = st.builds(
    RouterEvent,
    st.integers(0, 100),
    st.integers(0, 8),
    u64,
    st.one_of(
        stored_data(),
        st.builds(Removed, st.lists(u64, min_size=1, max_size=4).map(tuple), media),
        st.just(Cleared()),
    ),
)


@settings(max_examples=150, deadline=None)
@given(router_events)
def test_round_trip(event: RouterEvent) -> None:
    assert decode_dynamo_event(encode_dynamo_event(event), worker_id=event.worker_id) == event


JSON_KEYS = [
    "event_id",
    "data",
    "dp_rank",
    "stored",
    "removed",
    "blocks",
    "parent_hash",
    "block_hash",
    "tokens_hash",
    "block_hashes",
    "medium",
    "x",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(["cleared", "stored", "removed", "blocks", "block_hash"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(JSON_KEYS),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def check_only_decode_error(data: str | bytes) -> None:
    try:
        event = decode_dynamo_event(data, worker_id=1)
    except DecodeError:
        return
    assert isinstance(event, RouterEvent)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_random_input_only_decode_error(data: str | bytes) -> None:
    check_only_decode_error(data)


@settings(max_examples=150, deadline=None)
@given(router_events, st.data())
def test_mutated_events_only_decode_error(event: RouterEvent, data: st.DataObject) -> None:
    body: Any = json.loads(encode_dynamo_event(event))
    # Replace one value somewhere along a random path with random JSON.
    node = body
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        if data.draw(st.booleans()) or not isinstance(node[key], dict | list):
            node[key] = data.draw(json_values)
            break
        node = node[key]
    text = json.dumps(body)
    check_only_decode_error(text)
    cut = data.draw(st.integers(0, len(text)))
    check_only_decode_error(text[:cut])
