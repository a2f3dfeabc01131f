"""vLLM / SGLang KV event codec: both event forms, every hash form, exact wire shapes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvrouter.errors import DecodeError
from kvrouter.events.model import Cleared, Removed, Stored, StoredBlock
from kvrouter.events.vllm import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    DecoderStats,
    KVEventBatch,
    VllmEventDecoder,
    encode_batch,
)
from kvrouter.hashing import compute_block_hashes, make_salt

pack = msgspec.msgpack.encode
unpack = msgspec.msgpack.decode

# Dynamo's published local hashes of tokens 1..4 and 5..8 (block size 4, no salt).
LOCAL_1_4 = 14643705804678351452
LOCAL_5_8 = 16777012769546811212
TOKENS = [1, 2, 3, 4, 5, 6, 7, 8]
U64_MAX = 2**64 - 1


def stored_array(*fields: Any) -> list[Any]:
    return ["BlockStored", *fields]


def _as_map(fields: list[Any]) -> dict[str, Any]:
    names = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id"]
    names += ["medium", "lora_name", "extra_keys"]
    return {"type": "BlockStored", "event_version": 1, **dict(zip(names, fields, strict=False))}


def decode_one(event: Any, *, block_size: int = 4) -> Stored | Removed | Cleared:
    batch = VllmEventDecoder(block_size).decode(pack([1.5, [event], 0]))
    assert batch.errors == []
    assert len(batch.events) == 1
    return batch.events[0]


def decode_error(event: Any, *, block_size: int = 4) -> str:
    batch = VllmEventDecoder(block_size).decode(pack([1.5, [event], 0]))
    assert batch.events == []
    assert len(batch.errors) == 1
    return str(batch.errors[0])


EXPECTED_STORED = Stored(
    parent_engine_hash=99,
    blocks=(StoredBlock(10, LOCAL_1_4, "GPU"), StoredBlock(11, LOCAL_5_8, "GPU")),
    lora_name=None,
    block_size=4,
)


class TestStored:
    def test_array_form(self) -> None:
        assert decode_one(stored_array([10, 11], 99, TOKENS, 4)) == EXPECTED_STORED

    def test_map_form(self) -> None:
        event = {
            "type": "BlockStored",
            "block_hashes": [10, 11],
            "parent_block_hash": 99,
            "token_ids": TOKENS,
            "block_size": 4,
        }
        assert decode_one(event) == EXPECTED_STORED

    def test_full_length_array(self) -> None:
        event = stored_array(
            [10, 11], 99, TOKENS, 4, None, None, None, [None, None], 0, "full_attention", None
        )
        assert decode_one(event) == EXPECTED_STORED

    def test_longer_array_than_known(self) -> None:
        event = stored_array([10, 11], 99, TOKENS, 4, 0, None, None, None, 0, "x", 1, "new", 42)
        assert decode_one(event) == EXPECTED_STORED

    def test_map_unknown_keys_ignored(self) -> None:
        event = {
            "type": "BlockStored",
            "block_hashes": [10, 11],
            "parent_block_hash": 99,
            "token_ids": TOKENS,
            "block_size": 4,
            "future_field": {"nested": [1, 2]},
            "lora_id": "not-an-int",
            "extra_keys": [["mm", 1], None],
        }
        assert decode_one(event) == EXPECTED_STORED

    def test_root_parent(self) -> None:
        event = decode_one(stored_array([10], None, TOKENS[:4], 4))
        assert event == Stored(None, (StoredBlock(10, LOCAL_1_4, "GPU"),), None, 4)

    @pytest.mark.parametrize("medium", ["CPU", "CPU_PINNED", "DISK", "STORAGE", "GPU"])
    def test_medium(self, medium: str) -> None:
        event = decode_one(stored_array([10], None, TOKENS[:4], 4, None, medium))
        assert isinstance(event, Stored)
        assert [b.medium for b in event.blocks] == [medium]

    def test_lora_name_salts_local_hashes(self) -> None:
        event = decode_one(stored_array([10, 11], 99, TOKENS, 4, 3, None, "sql-adapter"))
        salted = compute_block_hashes(TOKENS, 4, salt=make_salt(lora_name="sql-adapter"))
        assert event == Stored(
            99,
            (StoredBlock(10, salted[0], "GPU"), StoredBlock(11, salted[1], "GPU")),
            "sql-adapter",
            4,
        )
        assert salted[0] != LOCAL_1_4

    @pytest.mark.parametrize(
        ("lora", "first_keys"),
        [
            (None, ["tenant-a"]),  # older vLLM: bare values
            ("sql", ["sql", "tenant-a"]),  # the adapter first, the salt last
            ("x", ["x", "x"]),  # an adapter and a salt of the same name
            (None, [{"type": "cache_salt", "salt": "tenant-a"}]),  # event_version 1
            ("sql", [{"type": "lora", "name": "sql"}, {"type": "cache_salt", "salt": "tenant-a"}]),
        ],
    )
    def test_cache_salt_from_extra_keys(self, lora: str | None, first_keys: list[Any]) -> None:
        salt = "x" if first_keys == ["x", "x"] else "tenant-a"
        fields = [[10, 11], None, TOKENS, 4, None, None, lora, [first_keys, None]]
        expected = compute_block_hashes(TOKENS, 4, salt=make_salt(lora_name=lora), cache_salt=salt)
        for event in (stored_array(*fields), _as_map(fields)):
            decoded = decode_one(event)
            assert isinstance(decoded, Stored)
            assert [b.local_hash for b in decoded.blocks] == expected

    @pytest.mark.parametrize(
        "extra_keys",
        [
            None,
            5,
            [],
            [None, ["tenant-a"]],  # a salt only counts on the first block
            [[{"type": "cache_salt", "salt": 3}]],
            [[{"type": "lora", "name": "z"}]],
            [[{"type": "legacy", "value": ["odd", "shape"]}]],
            ["not-a-list"],
        ],
    )
    def test_no_cache_salt(self, extra_keys: Any) -> None:
        decoded = decode_one(stored_array([10, 11], None, TOKENS, 4, None, None, None, extra_keys))
        assert isinstance(decoded, Stored)
        assert [b.local_hash for b in decoded.blocks] == [LOCAL_1_4, LOCAL_5_8]

    @pytest.mark.parametrize(
        ("second_keys", "content"),
        [
            ([["img-1", 3]], ["img-1@3"]),  # older vLLM: [mm identifier, offset]
            (
                [{"type": "mm", "modality": "image", "hash": "img-1", "block_offset": 3}],
                ["img-1@3"],
            ),
            ([b"\x01\x02"], ["0102"]),  # prompt-embedding hash
            ([{"type": "prompt_embeds", "hash": b"\x01\x02"}], ["0102"]),
        ],
    )
    def test_multimodal_blocks_are_salted_by_their_content(
        self, second_keys: list[Any], content: list[str]
    ) -> None:
        # Placeholder tokens are the same for every image: the block (and so the rest of
        # the chain) must only match the same content, never plain text.
        fields = [[10, 11], None, TOKENS, 4, None, None, None, [None, second_keys]]
        for event in (stored_array(*fields), _as_map(fields)):
            decoded = decode_one(event)
            assert isinstance(decoded, Stored)
            second = compute_block_hashes(TOKENS[4:], 4, salt=make_salt(mm_hashes=content))[0]
            assert [b.local_hash for b in decoded.blocks] == [LOCAL_1_4, second]
            assert second != LOCAL_5_8

    def test_multimodal_first_block_with_lora_and_cache_salt(self) -> None:
        keys = [["sql", ["img-9", 0], "tenant-a"]]
        decoded = decode_one(stored_array([10], None, TOKENS[:4], 4, None, None, "sql", keys))
        assert isinstance(decoded, Stored)
        salt = make_salt(lora_name="sql", mm_hashes=["img-9@0"])
        expected = compute_block_hashes(TOKENS[:4], 4, salt=salt, cache_salt="tenant-a")
        assert decoded.blocks[0].local_hash == expected[0]

    def test_cache_salt_of_a_chain_continuation_is_not_read(self) -> None:
        # vLLM lists the salt on the request's first block only; an event that continues
        # a chain (it has a parent) is hashed without, and differs through its parent.
        decoded = decode_one(stored_array([11], 10, TOKENS[4:], 4, None, None, None, [["s"]]))
        assert isinstance(decoded, Stored)
        assert decoded.blocks[0].local_hash == LOCAL_5_8

    def test_lora_id_without_name_is_base_model(self) -> None:
        assert decode_one(stored_array([10, 11], 99, TOKENS, 4, 7)) == EXPECTED_STORED

    def test_empty_lora_name_is_none(self) -> None:
        assert decode_one(stored_array([10, 11], 99, TOKENS, 4, None, None, "")) == (
            EXPECTED_STORED
        )


class TestHashForms:
    @pytest.mark.parametrize(
        ("wire", "expected"),
        [
            (U64_MAX, U64_MAX),
            (2**63, 2**63),
            (0, 0),
            (-1, U64_MAX),
            (-(2**63), 2**63),
            (b"\xaa" * 24 + bytes(range(1, 9)), 0x0102030405060708),
            (bytes(range(1, 9)), 0x0102030405060708),
            (b"\x01\x02", 0x0102),
        ],
    )
    def test_block_and_parent_hash(self, wire: int | bytes, expected: int) -> None:
        event = decode_one(stored_array([wire], wire, TOKENS[:4], 4))
        assert event == Stored(expected, (StoredBlock(expected, LOCAL_1_4, "GPU"),), None, 4)
        removed = decode_one(["BlockRemoved", [wire, 5]])
        assert removed == Removed((expected, 5), "GPU")

    def test_empty_bytes_hash_is_an_error(self) -> None:
        assert "empty bytes block hash" in decode_error(["BlockRemoved", [b""]])

    def test_float_hash_is_an_error(self) -> None:
        assert "malformed event" in decode_error(["BlockRemoved", [1.5]])


class TestRemovedCleared:
    def test_removed_short(self) -> None:
        assert decode_one(["BlockRemoved", [1, 2]]) == Removed((1, 2), "GPU")

    def test_removed_full_and_longer(self) -> None:
        assert decode_one(["BlockRemoved", [1], "CPU", 0]) == Removed((1,), "CPU")
        assert decode_one(["BlockRemoved", [1], None, 0, "x", 9]) == Removed((1,), "GPU")

    def test_removed_map(self) -> None:
        event = {"type": "BlockRemoved", "block_hashes": [3], "medium": "DISK", "zz": 1}
        assert decode_one(event) == Removed((3,), "DISK")

    def test_cleared(self) -> None:
        assert decode_one(["AllBlocksCleared"]) == Cleared()
        assert decode_one(["AllBlocksCleared", 1, "x"]) == Cleared()
        assert decode_one({"type": "AllBlocksCleared", "extra": None}) == Cleared()


class TestBadEvents:
    def test_block_size_mismatch_names_both(self) -> None:
        message = decode_error(stored_array([10], None, list(range(16)), 16), block_size=4)
        assert "block_size 16" in message
        assert "block_size 4" in message
        assert message.startswith("event 0:")

    def test_token_count_mismatch_names_both(self) -> None:
        message = decode_error(stored_array([10, 11], None, TOKENS[:7], 4))
        assert "7 token ids" in message
        assert "expected 8" in message

    def test_token_out_of_u32(self) -> None:
        assert "unsigned 32-bit" in decode_error(stored_array([10], None, [1, 2, 3, -4], 4))
        assert "unsigned 32-bit" in decode_error(stored_array([10], None, [1, 2, 3, 2**32], 4))

    def test_no_block_hashes(self) -> None:
        assert "no block hashes" in decode_error(stored_array([], None, [], 4))
        assert "no block hashes" in decode_error(["BlockRemoved", []])

    @pytest.mark.parametrize(
        "event",
        [
            stored_array([10], None, TOKENS[:4]),  # block_size missing
            ["BlockRemoved"],
            ["Unknown", 1],
            [],
            {"block_hashes": [1]},  # no "type"
            {"type": "Nope"},
            {"type": "BlockRemoved"},
            "BlockStored",
            42,
            None,
            stored_array("x", None, TOKENS[:4], 4),
            stored_array([1], None, ["a", "b", "c", "d"], 4),
        ],
    )
    def test_malformed_event(self, event: Any) -> None:
        message = decode_error(event)
        assert message.startswith("event 0: ")

    def test_bad_event_does_not_lose_the_others(self) -> None:
        events = [
            ["BlockRemoved", [1]],
            ["Unknown"],
            stored_array([10], None, TOKENS[:3], 4),
            {"type": "BlockRemoved", "block_hashes": [2]},
            ["AllBlocksCleared"],
        ]
        batch = VllmEventDecoder(4).decode(pack([2.0, events, 1]))
        assert batch.ts == 2.0
        assert batch.dp_rank == 1
        assert batch.events == [Removed((1,), "GPU"), Removed((2,), "GPU"), Cleared()]
        assert [str(e).split(":")[0] for e in batch.errors] == ["event 1", "event 2"]
        assert all(type(e) is DecodeError for e in batch.errors)


class TestBatch:
    def test_dp_rank_forms(self) -> None:
        decoder = VllmEventDecoder(4)
        assert decoder.decode(pack([1.0, []])).dp_rank == 0
        assert decoder.decode(pack([1.0, [], None])).dp_rank == 0
        assert decoder.decode(pack([1.0, [], 3])).dp_rank == 3
        assert decoder.decode(pack([1.0, [], 3, "extra"])).dp_rank == 3
        assert decoder.decode(pack([1.0, [], 65535])).dp_rank == 65535

    def test_int_timestamp(self) -> None:
        assert VllmEventDecoder(4).decode(pack([7, []])) == DecodedBatch(7.0, 0, [], [])

    @pytest.mark.parametrize(
        "payload",
        [
            b"",
            b"\xc1",
            pack({"ts": 1.0}),
            pack({"ts": "now", "events": []}),
            pack({"ts": 1.0, "events": [], "data_parallel_rank": -1}),
            pack([1.0]),
            pack(["now", []]),
            pack([1.0, {"a": 1}]),
            pack([1.0, [], -1]),
            pack([1.0, [], 65536]),
            pack([1.0, [], 2**63]),
            pack({"ts": 1.0, "events": [], "attn_dp_rank": 65536}),
            pack([1.0, [], "rank"]),
            pack([1.0, []])[:-1],
            pack(5),
        ],
    )
    def test_malformed_batch_raises(self, payload: bytes) -> None:
        decoder = VllmEventDecoder(4)
        with pytest.raises(DecodeError, match="malformed KV event batch"):
            decoder.decode(payload)
        assert decoder.stats() == DecoderStats(1, 1, 0, 0)

    @pytest.mark.parametrize("prefix", [b"\x92\x00", b"\x92\x00\x91"])
    def test_deep_nesting_is_a_decode_error(self, prefix: bytes) -> None:
        # msgspec gives up past its recursion limit, even when only skipping an event.
        with pytest.raises(DecodeError, match="recursion"):
            VllmEventDecoder(4).decode(prefix + b"\x91" * 200_000 + b"\xc0")

    def test_invalid_utf8_string_is_an_event_error(self) -> None:
        bad_medium = b"\xa2\xff\xfe"  # a 2-byte msgpack str that is not UTF-8
        payload = b"\x93\x01\x92" + pack(["AllBlocksCleared"]) + b"\x93\xacBlockRemoved\x91\x01"
        batch = VllmEventDecoder(4).decode(payload + bad_medium + b"\x00")
        assert batch.events == [Cleared()]
        assert len(batch.errors) == 1
        assert str(batch.errors[0]).startswith("event 1: malformed event")

    def test_forms_switch_between_batches(self) -> None:
        decoder = VllmEventDecoder(4)
        array_payload = pack([1.0, [["BlockRemoved", [1]]]])
        map_payload = pack([1.0, [{"type": "BlockRemoved", "block_hashes": [1]}]])
        for payload in [array_payload, map_payload, map_payload, array_payload]:
            assert decoder.decode(payload).events == [Removed((1,), "GPU")]

    def test_mixed_forms_in_one_batch(self) -> None:
        events = [["BlockRemoved", [1]], {"type": "BlockRemoved", "block_hashes": [2]}]
        batch = VllmEventDecoder(4).decode(pack([1.0, events]))
        assert batch.events == [Removed((1,), "GPU"), Removed((2,), "GPU")]
        assert batch.errors == []

    def test_stats(self) -> None:
        decoder = VllmEventDecoder(4)
        decoder.decode(pack([1.0, [["BlockRemoved", [1]], ["Bad"]]]))
        with pytest.raises(DecodeError):
            decoder.decode(b"")
        assert decoder.stats() == DecoderStats(
            num_batches=2, num_bad_batches=1, num_events=1, num_bad_events=1
        )

    @pytest.mark.parametrize(
        ("fields", "rank"),
        [
            ({}, 0),
            ({"data_parallel_rank": None}, 0),
            ({"data_parallel_rank": 2}, 2),
            ({"attn_dp_rank": 3}, 3),  # SGLang's name for it
            ({"data_parallel_rank": 2, "attn_dp_rank": 3}, 2),
            ({"data_parallel_rank": 1, "future_key": [1, 2]}, 1),
        ],
    )
    def test_map_batch(self, fields: dict[str, Any], rank: int) -> None:
        removed = {"type": "BlockRemoved", "block_hashes": [1]}
        batch = VllmEventDecoder(4).decode(pack({"ts": 1.5, "events": [removed], **fields}))
        assert batch == DecodedBatch(1.5, rank, [Removed((1,), "GPU")], [])

    def test_map_batch_bad_event_does_not_lose_the_others(self) -> None:
        events = [
            {"type": "BlockRemoved", "block_hashes": [1]},
            {"type": "BlockRemoved", "block_hashes": "oops"},
            ["BlockRemoved", [3]],  # an array event in a map batch is odd, but readable
        ]
        batch = VllmEventDecoder(4).decode(pack({"events": events, "ts": 1.0}))
        assert batch.events == [Removed((1,), "GPU"), Removed((3,), "GPU")]
        assert [str(e).split(":")[0] for e in batch.errors] == ["event 1"]

    def test_batch_forms_switch(self) -> None:
        decoder = VllmEventDecoder(4)
        removed = {"type": "BlockRemoved", "block_hashes": [1]}
        payloads = [
            pack({"ts": 1.0, "events": [removed]}),
            pack([1.0, [["BlockRemoved", [1]]]]),
            pack({"ts": 1.0, "events": [removed]}),
            pack([1.0, [removed]]),
        ]
        for payload in payloads:
            assert decoder.decode(payload).events == [Removed((1,), "GPU")]

    def test_memoryview_payload(self) -> None:
        payload = memoryview(pack([1.0, [["AllBlocksCleared"]]]))
        assert VllmEventDecoder(4).decode(payload).events == [Cleared()]

    def test_bad_block_size(self) -> None:
        with pytest.raises(ValueError, match="block_size must be positive"):
            VllmEventDecoder(0)


class TestEncode:
    def test_array_wire_shape(self) -> None:
        batch = KVEventBatch(
            1.25,
            [
                BlockStored([10, 11], 99, TOKENS, 4),
                BlockStored([12], None, TOKENS[:4], 4, 5, "CPU", "lora-a", group_idx=1),
                BlockRemoved([10], "CPU"),
                BlockRemoved([11], None, 2),
                AllBlocksCleared(),
            ],
            3,
        )
        nones = [None] * 7
        assert unpack(encode_batch(batch)) == [
            1.25,
            [
                ["BlockStored", [10, 11], 99, TOKENS, 4, *nones],
                ["BlockStored", [12], None, TOKENS[:4], 4, 5, "CPU", "lora-a", None, 1, None, None],
                ["BlockRemoved", [10], "CPU", None],
                ["BlockRemoved", [11], None, 2],
                ["AllBlocksCleared"],
            ],
            3,
        ]

    def test_array_full_stored(self) -> None:
        event = BlockStored([1], 0, TOKENS[:4], 4, 1, "GPU", "l", [("mm", 7)], 0, "sliding", 128)
        assert unpack(encode_batch(KVEventBatch(0.0, [event], 1))) == [
            0.0,
            [["BlockStored", [1], 0, TOKENS[:4], 4, 1, "GPU", "l", [["mm", 7]], 0, "sliding", 128]],
            1,
        ]

    def test_map_wire_shape(self) -> None:
        batch = KVEventBatch(
            2.5,
            [
                BlockStored([10], None, TOKENS[:4], 4, medium="CPU", kv_cache_spec_kind="full"),
                BlockRemoved([10]),
                AllBlocksCleared(),
            ],
            0,
        )
        assert unpack(encode_batch(batch, form="map")) == [
            2.5,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [10],
                    "parent_block_hash": None,
                    "token_ids": TOKENS[:4],
                    "block_size": 4,
                    "lora_id": None,
                    "medium": "CPU",
                    "lora_name": None,
                    "extra_keys": None,
                    "group_idx": None,
                    "kv_cache_spec_kind": "full",
                    "kv_cache_spec_sliding_window": None,
                },
                {"type": "BlockRemoved", "block_hashes": [10], "medium": None, "group_idx": None},
                {"type": "AllBlocksCleared"},
            ],
            0,
        ]

    def test_no_dp_rank_is_nil(self) -> None:
        batch = KVEventBatch(1.0, [])
        assert unpack(encode_batch(batch)) == [1.0, [], None]
        assert unpack(encode_batch(batch, form="map")) == [1.0, [], None]

    def test_map_batch_wire_shape(self) -> None:
        # The newest vLLM: KVEventBatch and its events are plain (not array-like) msgspec
        # structs with omit_defaults, so unset fields that have defaults are left out.
        batch = KVEventBatch(
            2.5,
            [
                BlockStored([10], None, TOKENS[:4], 4, medium="GPU", group_idx=0),
                BlockStored([11], 10, TOKENS[4:], 4, extra_keys=[("l",)], lora_name="l"),
                BlockRemoved([10], group_idx=1),
                BlockRemoved([11], "CPU"),
                AllBlocksCleared(),
            ],
            1,
        )
        assert unpack(encode_batch(batch, form="map-batch")) == {
            "ts": 2.5,
            "events": [
                {
                    "type": "BlockStored",
                    "block_hashes": [10],
                    "parent_block_hash": None,
                    "token_ids": TOKENS[:4],
                    "block_size": 4,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "group_idx": 0,
                },
                {
                    "type": "BlockStored",
                    "block_hashes": [11],
                    "parent_block_hash": 10,
                    "token_ids": TOKENS[4:],
                    "block_size": 4,
                    "lora_id": None,
                    "medium": None,
                    "lora_name": "l",
                    "extra_keys": [["l"]],
                },
                {"type": "BlockRemoved", "block_hashes": [10], "medium": None, "group_idx": 1},
                {"type": "BlockRemoved", "block_hashes": [11], "medium": "CPU"},
                {"type": "AllBlocksCleared"},
            ],
            "data_parallel_rank": 1,
        }
        assert unpack(encode_batch(KVEventBatch(1.0, []), form="map-batch")) == {
            "ts": 1.0,
            "events": [],
        }

    def test_unknown_form(self) -> None:
        with pytest.raises(ValueError, match="unknown event form"):
            encode_batch(KVEventBatch(1.0, []), form="json")  # type: ignore[arg-type]


class TestRoundTrip:
    BATCH = KVEventBatch(
        3.5,
        [
            BlockStored([U64_MAX, 2**63, 7], 2**64 - 2, list(range(12)), 4, None, "CPU"),
            BlockStored([-1, -(2**63)], -5, list(range(8)), 4, 2, None, "adapter", [None, None]),
            BlockRemoved([U64_MAX, -1], "DISK", 0),
            BlockRemoved([5]),
            AllBlocksCleared(),
        ],
        2,
    )

    def expected_events(self) -> list[Stored | Removed | Cleared]:
        plain = compute_block_hashes(list(range(12)), 4)
        salted = compute_block_hashes(list(range(8)), 4, salt=make_salt(lora_name="adapter"))
        return [
            Stored(
                2**64 - 2,
                (
                    StoredBlock(U64_MAX, plain[0], "CPU"),
                    StoredBlock(2**63, plain[1], "CPU"),
                    StoredBlock(7, plain[2], "CPU"),
                ),
                None,
                4,
            ),
            Stored(
                2**64 - 5,
                (StoredBlock(U64_MAX, salted[0], "GPU"), StoredBlock(2**63, salted[1], "GPU")),
                "adapter",
                4,
            ),
            Removed((U64_MAX, U64_MAX), "DISK"),
            Removed((5,), "GPU"),
            Cleared(),
        ]

    @pytest.mark.parametrize("form", ["array", "map", "map-batch"])
    def test_round_trip(self, form: Any) -> None:
        batch = VllmEventDecoder(4).decode(encode_batch(self.BATCH, form=form))
        assert batch == DecodedBatch(3.5, 2, self.expected_events(), [])

    @pytest.mark.parametrize("form", ["array", "map"])
    def test_bytes_hashes(self, form: str) -> None:
        # The wire structs hold ints; sha256-style bytes hashes are spliced in by hand.
        raw = unpack(encode_batch(self.BATCH, form=form))  # type: ignore[arg-type]
        sha = bytes(24) + U64_MAX.to_bytes(8, "big")
        if form == "array":
            raw[1][0][1] = [sha, bytes(24) + (2**63).to_bytes(8, "big"), b"\x07"]
            raw[1][2][1] = [sha, sha]
        else:
            raw[1][0]["block_hashes"] = [sha, bytes(24) + (2**63).to_bytes(8, "big"), b"\x07"]
            raw[1][2]["block_hashes"] = [sha, sha]
        batch = VllmEventDecoder(4).decode(pack(raw))
        assert batch == DecodedBatch(3.5, 2, self.expected_events(), [])


def _stored_in_group(
    hashes: list[int], parent: int | None, tokens: list[int], group: Any, kind: Any
) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": group,
        "kv_cache_spec_kind": kind,
    }


def _removed_in_group(hashes: list[int], group: Any) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", "group_idx": group}


class TestKvCacheGroups:
    """A hybrid model's events carry ``group_idx``; one group is indexed."""

    def decode(self, decoder: VllmEventDecoder, *events: Any) -> DecodedBatch:
        return decoder.decode(pack({"ts": 1.0, "events": list(events), "data_parallel_rank": 0}))

    def test_full_attention_group_is_followed_and_the_others_skipped(self) -> None:
        decoder = VllmEventDecoder(4)
        batch = self.decode(
            decoder,
            _stored_in_group([10, 11], None, TOKENS, 1, "sliding_window"),
            _stored_in_group([10, 11], None, TOKENS, 0, "full_attention"),
            _stored_in_group([10, 11], None, TOKENS, 2, "mamba"),
            _removed_in_group([10], 1),  # the window slid past block 10
            _removed_in_group([10], 2),
        )
        assert batch.events == [
            Stored(None, (StoredBlock(10, LOCAL_1_4), StoredBlock(11, LOCAL_5_8)), None, 4)
        ]
        assert batch.skipped == 4
        assert batch.errors == []
        later = self.decode(decoder, _removed_in_group([11], 0), _removed_in_group([10], 1))
        assert later.events == [Removed((11,), "GPU")]
        assert later.skipped == 1
        stats = decoder.stats()
        assert (stats.num_events, stats.num_skipped_events, stats.group) == (2, 5, 0)
        assert decoder.group_kinds() == {1: "sliding_window", 0: "full_attention", 2: "mamba"}

    @pytest.mark.parametrize("kind", [None, "mla_attention", "sink_full_attention", "new_kind"])
    def test_first_group_that_is_not_partial_is_followed(self, kind: Any) -> None:
        decoder = VllmEventDecoder(4)
        batch = self.decode(
            decoder,
            _stored_in_group([10], None, TOKENS[:4], 3, "chunked_local_attention"),
            _stored_in_group([10], None, TOKENS[:4], 5, kind),
            _stored_in_group([10], None, TOKENS[:4], 0, "full_attention"),  # a second one
        )
        assert batch.events == [Stored(None, (StoredBlock(10, LOCAL_1_4),), None, 4)]
        assert batch.skipped == 2
        assert decoder.stats().group == 5

    def test_removals_before_any_group_is_named_are_applied(self) -> None:
        # Joined late: nothing says yet which group is which; removing blocks the index
        # does not hold is harmless, keeping blocks the worker dropped is not.
        decoder = VllmEventDecoder(4)
        batch = self.decode(decoder, _removed_in_group([10], 1), _removed_in_group([11], 0))
        assert batch.events == [Removed((10,), "GPU"), Removed((11,), "GPU")]
        assert batch.skipped == 0

    def test_other_groups_block_size_is_not_an_error(self) -> None:
        # A Mamba group may use another block size; its events are skipped, not errors.
        decoder = VllmEventDecoder(4)
        mamba = _stored_in_group([20], None, TOKENS, 1, "mamba") | {"block_size": 8}
        batch = self.decode(decoder, _stored_in_group([10], None, TOKENS[:4], 0, None), mamba)
        assert len(batch.events) == 1
        assert (batch.skipped, batch.errors) == (1, [])

    @pytest.mark.parametrize("group", [None, True, "0", [0], 1.5])
    def test_no_group_number_is_a_single_group_sender(self, group: Any) -> None:
        decoder = VllmEventDecoder(4)
        batch = self.decode(
            decoder,
            _stored_in_group([10], None, TOKENS[:4], group, "sliding_window"),
            _removed_in_group([10], group),
        )
        assert len(batch.events) == 2
        assert batch.skipped == 0
        assert decoder.stats().group is None

    def test_odd_kind_value_does_not_cost_the_event(self) -> None:
        decoder = VllmEventDecoder(4)
        batch = self.decode(decoder, _stored_in_group([10], None, TOKENS[:4], 0, ["odd"]))
        assert len(batch.events) == 1
        assert decoder.stats().group == 0

    def test_array_form_groups(self) -> None:
        decoder = VllmEventDecoder(4)
        events = [
            stored_array([10], None, TOKENS[:4], 4, None, None, None, None, 1, "sliding_window"),
            stored_array([10], None, TOKENS[:4], 4, None, None, None, None, 0, "full_attention"),
            ["BlockRemoved", [10], None, 1],
        ]
        batch = decoder.decode(pack([1.0, events, 0]))
        assert batch.events == [Stored(None, (StoredBlock(10, LOCAL_1_4),), None, 4)]
        assert batch.skipped == 2

    def test_in_process_structs_are_filtered_alike(self) -> None:
        events: list[Any] = [
            BlockStored([10], None, TOKENS[:4], 4, group_idx=1, kv_cache_spec_kind="mamba"),
            BlockStored([10], None, TOKENS[:4], 4, group_idx=0),
            BlockRemoved([10], group_idx=1),
        ]
        batch = VllmEventDecoder(4).convert(KVEventBatch(1.0, events, 0))
        assert batch.events == [Stored(None, (StoredBlock(10, LOCAL_1_4),), None, 4)]
        assert batch.skipped == 2
