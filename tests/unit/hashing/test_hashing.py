"""Block hashing: values computed independently of the implementation, and Dynamo's."""

from __future__ import annotations

import struct
from typing import ClassVar

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrouter.hashing import (
    HASH_SEED,
    compute_block_hashes,
    compute_sequence_hashes,
    hash_request,
    make_salt,
    salt_seed,
)

# Published by NVIDIA Dynamo for tokens 1..12 with block size 4 (seed 1337, no salt).
DYNAMO_LOCAL = [14643705804678351452, 16777012769546811212, 483935686894639516]
DYNAMO_SEQUENCE = [14643705804678351452, 4945711292740353085, 12583592247330656132]
# Dynamo's compute_block_hash(b"test data").
DYNAMO_TEST_DATA_HASH = 13226331709069118873


def reference_local(tokens: list[int], block_size: int, seed: int = 1337) -> list[int]:
    """The rule written out: xxh3_64(seed) over le_u32 token ids, full blocks only."""
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        out.append(xxhash.xxh3_64_intdigest(struct.pack(f"<{len(block)}I", *block), seed=seed))
    return out


def reference_sequence(local: list[int]) -> list[int]:
    out: list[int] = []
    for h in local:
        if not out:
            out.append(h)
        else:
            data = struct.pack("<Q", out[-1]) + struct.pack("<Q", h)
            out.append(xxhash.xxh3_64_intdigest(data, seed=1337))
    return out


class TestDynamoVectors:
    def test_raw_bytes_hash_uses_seed_1337(self) -> None:
        assert xxhash.xxh3_64_intdigest(b"test data", seed=HASH_SEED) == DYNAMO_TEST_DATA_HASH

    def test_single_block(self) -> None:
        assert compute_block_hashes([1, 2, 3, 4], 4) == [14643705804678351452]

    def test_local_hashes(self) -> None:
        assert compute_block_hashes(list(range(1, 13)), 4) == DYNAMO_LOCAL

    def test_sequence_hashes(self) -> None:
        assert compute_sequence_hashes(DYNAMO_LOCAL) == DYNAMO_SEQUENCE

    def test_hash_request_ignores_partial_block(self) -> None:
        # Dynamo's own sequence: tokens 1..10 at block size 4 gives two blocks.
        local, seq = hash_request(list(range(1, 11)), 4)
        assert local == DYNAMO_LOCAL[:2]
        assert seq == DYNAMO_SEQUENCE[:2]

    def test_no_salt_is_dynamo(self) -> None:
        assert make_salt() is None
        assert compute_block_hashes(list(range(1, 13)), 4, salt=make_salt()) == DYNAMO_LOCAL
        assert compute_block_hashes(list(range(1, 13)), 4, salt="") == DYNAMO_LOCAL
        assert salt_seed(None) == 1337


class TestReferenceRule:
    @pytest.mark.parametrize("block_size", [1, 3, 16, 64])
    def test_matches_written_out_rule(self, block_size: int) -> None:
        tokens = [(i * 7919 + 13) % 150_000 for i in range(300)]
        local = compute_block_hashes(tokens, block_size)
        assert local == reference_local(tokens, block_size)
        assert compute_sequence_hashes(local) == reference_sequence(local)

    def test_extreme_token_ids(self) -> None:
        tokens = [0, 0xFFFFFFFF, 1, 0x80000000]
        assert compute_block_hashes(tokens, 2) == reference_local(tokens, 2)

    @settings(max_examples=60, deadline=None)
    @given(
        tokens=st.lists(st.integers(0, 2**32 - 1), max_size=80),
        block_size=st.integers(1, 20),
    )
    def test_property_matches_reference(self, tokens: list[int], block_size: int) -> None:
        local, seq = hash_request(tokens, block_size)
        assert local == reference_local(tokens, block_size)
        assert seq == reference_sequence(local)
        assert len(local) == len(tokens) // block_size


class TestInputs:
    TOKENS: ClassVar[list[int]] = [(i * 104729) % 128_000 for i in range(70)]

    @pytest.mark.parametrize(
        "dtype", [np.int32, np.int64, np.uint32, np.uint64, np.uint16, ">u4", ">i8"]
    )
    def test_numpy_dtypes_equal_list(self, dtype: str) -> None:
        tokens = [t % 60_000 for t in self.TOKENS]  # fits every dtype above
        expected = compute_block_hashes(tokens, 16)
        assert compute_block_hashes(np.array(tokens, dtype=dtype), 16) == expected

    def test_non_contiguous_array(self) -> None:
        wide = np.array(self.TOKENS * 2, dtype=np.int64).reshape(2, -1).T[:, 0]
        assert compute_block_hashes(wide, 8) == compute_block_hashes(self.TOKENS, 8)

    def test_tuple_input(self) -> None:
        assert compute_block_hashes(tuple(self.TOKENS), 8) == compute_block_hashes(self.TOKENS, 8)

    def test_trailing_partial_block_is_ignored(self) -> None:
        base = compute_block_hashes(self.TOKENS[:64], 16)
        assert len(base) == 4
        assert compute_block_hashes([*self.TOKENS[:64], 1, 2, 3], 16) == base
        assert compute_block_hashes(np.array(self.TOKENS[:70]), 16) == base

    def test_short_and_empty(self) -> None:
        assert compute_block_hashes([], 16) == []
        assert compute_block_hashes([1] * 15, 16) == []
        assert compute_sequence_hashes([]) == []
        assert hash_request([1, 2, 3], 4) == ([], [])

    @pytest.mark.parametrize("block_size", [0, -4])
    def test_bad_block_size(self, block_size: int) -> None:
        with pytest.raises(ValueError, match="block_size must be positive"):
            compute_block_hashes([1, 2, 3], block_size)

    @pytest.mark.parametrize("bad", [-1, 2**32, 2**40])
    def test_out_of_range_list(self, bad: int) -> None:
        with pytest.raises(ValueError, match="unsigned 32-bit"):
            compute_block_hashes([1, bad, 3, 4], 2)

    @pytest.mark.parametrize(
        "arr",
        [np.array([1, -1, 3, 4], dtype=np.int64), np.array([1, 2**32, 3, 4], dtype=np.uint64)],
    )
    def test_out_of_range_array(self, arr: np.ndarray) -> None:  # type: ignore[type-arg]
        with pytest.raises(ValueError, match="unsigned 32-bit"):
            compute_block_hashes(arr, 2)

    def test_out_of_range_in_ignored_tail_is_fine(self) -> None:
        # The partial block is never read, so it cannot be wrong.
        assert compute_block_hashes([1, 2, -5], 2) == compute_block_hashes([1, 2], 2)

    def test_float_array_rejected(self) -> None:
        with pytest.raises(ValueError, match="must be integers"):
            compute_block_hashes(np.array([1.0, 2.0]), 2)


class TestSalt:
    TOKENS: ClassVar[list[int]] = list(range(100, 164))

    @pytest.mark.parametrize(
        "salt",
        [
            make_salt(lora_name="sql-adapter"),
            make_salt(mm_hashes=["abc123"]),
            make_salt(mm_hashes=[42]),
            make_salt(lora_name="a", mm_hashes=["c"]),
        ],
    )
    def test_salt_changes_every_hash(self, salt: bytes | None) -> None:
        assert salt is not None
        plain = compute_block_hashes(self.TOKENS, 16)
        salted = compute_block_hashes(self.TOKENS, 16, salt=salt)
        assert len(salted) == 4
        assert all(a != b for a, b in zip(plain, salted, strict=True))
        # The documented rule: the seed becomes xxh3_64(salt, seed=1337).
        seed = xxhash.xxh3_64_intdigest(salt, seed=1337)
        assert salted == reference_local(self.TOKENS, 16, seed=seed)

    def test_salts_are_distinct(self) -> None:
        salts = {make_salt(lora_name="x"), make_salt(mm_hashes=["x"])}
        assert len(salts) == 2
        hashes = {compute_block_hashes(self.TOKENS, 16, salt=s)[0] for s in salts}
        hashes |= {compute_block_hashes(self.TOKENS, 16, cache_salt="x")[0]}
        hashes |= {
            compute_block_hashes(self.TOKENS, 16, salt=make_salt(lora_name="x"), cache_salt="x")[0]
        }
        assert len(hashes) == 4

    @pytest.mark.parametrize("lora", [None, "sql-adapter"])
    def test_cache_salt_changes_the_first_block_only(self, lora: str | None) -> None:
        # As in vLLM, where cache_salt is an extra key of the first block alone: the
        # rest of the chain differs through the sequence hashes.
        salt = make_salt(lora_name=lora)
        plain_local, plain_seq = hash_request(self.TOKENS, 16, salt=salt)
        local, seq = hash_request(self.TOKENS, 16, salt=salt, cache_salt="tenant-a")
        assert local[0] != plain_local[0]
        assert local[1:] == plain_local[1:]
        assert all(a != b for a, b in zip(seq, plain_seq, strict=True))
        # The documented rule for the first block's seed.
        head = (salt or b"") + b"\x1fsalt=tenant-a"
        seed = xxhash.xxh3_64_intdigest(head, seed=1337)
        assert local[0] == reference_local(self.TOKENS[:16], 16, seed=seed)[0]
        assert hash_request(self.TOKENS, 16, salt=salt, cache_salt="tenant-b")[0][0] != local[0]
        assert hash_request(self.TOKENS, 16, salt=salt, cache_salt="")[0] == plain_local

    def test_str_and_bytes_salt_agree(self) -> None:
        assert compute_block_hashes(self.TOKENS, 16, salt="abc") == compute_block_hashes(
            self.TOKENS, 16, salt=b"abc"
        )

    def test_make_salt_exact_bytes(self) -> None:
        assert make_salt(lora_name="l", mm_hashes=["m", 7]) == b"lora=l\x1fmm=m\x1fmm=7"


class TestSequenceHashes:
    def test_prefix_property(self) -> None:
        a = hash_request(list(range(64)), 16)[1]
        b = hash_request(list(range(48)) + [999] * 16, 16)[1]
        assert a[:3] == b[:3]
        assert a[3] != b[3]

    def test_same_block_different_prefix(self) -> None:
        block = list(range(16))
        a_local, a_seq = hash_request([1] * 16 + block, 16)
        b_local, b_seq = hash_request([2] * 16 + block, 16)
        assert a_local[1] == b_local[1]
        assert a_seq[1] != b_seq[1]

    def test_int64_inputs_are_taken_mod_2_64(self) -> None:
        values = [2**64 - 1, 5, 2**64 - 7]
        signed = [-1, 5, -7]
        assert compute_sequence_hashes(signed) == compute_sequence_hashes(values)
        assert compute_sequence_hashes(values) == reference_sequence(values)
