"""The paged KV cache: allocation, reference counts, prefix caching, exact eviction order."""

from __future__ import annotations

from array import array

import numpy as np
import pytest

from kvrouter.engine.block_manager import (
    ENGINE_HASH_SEED,
    ROOT_PARENT_HASH,
    BlockManager,
    engine_hash_seed,
    hash_token_blocks,
    token_bytes,
    token_list,
)
from kvrouter.events.vllm import AllBlocksCleared, BlockRemoved, BlockStored
from kvrouter.hashing import hash_request

BS = 4


def hashes_of(tokens: list[int], lora_name: str | None = None) -> list[int]:
    return hash_token_blocks(
        tokens,
        0,
        len(tokens) // BS,
        block_size=BS,
        parent_hash=ROOT_PARENT_HASH,
        seed=engine_hash_seed(lora_name),
    )


def store(bm: BlockManager, tokens: list[int], lora_name: str | None = None) -> list[int]:
    """Allocate and cache the full blocks of ``tokens`` as one request would."""
    num_blocks = len(tokens) // BS
    blocks = bm.allocate(num_blocks)
    assert blocks is not None
    bm.cache_full_blocks(
        blocks,
        0,
        num_blocks,
        block_hashes=hashes_of(tokens, lora_name),
        token_ids=tokens,
        lora_name=lora_name,
    )
    return blocks


# -- hashing -------------------------------------------------------------------------


def test_engine_hashes_are_chained_and_not_the_routers() -> None:
    tokens = list(range(12))
    engine = hashes_of(tokens)
    local, sequence = hash_request(tokens, BS)
    assert len(engine) == 3
    assert not set(engine) & (set(local) | set(sequence))
    # Same block content after a different prefix: a different engine hash.
    other = hashes_of([99, 98, 97, 96, *tokens[4:8]])
    assert other[1] != engine[1]
    # Incremental hashing from a parent equals hashing in one go.
    tail = hash_token_blocks(
        tokens, 1, 3, block_size=BS, parent_hash=engine[0], seed=ENGINE_HASH_SEED
    )
    assert tail == engine[1:]


def test_lora_name_salts_engine_hashes() -> None:
    tokens = list(range(8))
    assert hashes_of(tokens, "sql") != hashes_of(tokens)
    assert hashes_of(tokens, "sql") != hashes_of(tokens, "chat")
    assert hashes_of(tokens, "sql") == hashes_of(tokens, "sql")


def test_token_inputs_of_every_kind_hash_alike() -> None:
    tokens = list(range(100, 108))
    expected = hashes_of(tokens)
    for form in (array("I", tokens), np.asarray(tokens, dtype=np.int64), tuple(tokens)):
        got = hash_token_blocks(form, 0, 2, block_size=BS, parent_hash=0, seed=ENGINE_HASH_SEED)
        assert got == expected
    assert token_list(np.asarray(tokens)) == tokens
    assert all(type(t) is int for t in token_list(np.asarray(tokens)))


@pytest.mark.parametrize("bad", [[1, -1], [2**32], [1.5], np.asarray([-3])])
def test_token_ids_outside_u32_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="token ids"):
        token_bytes(bad)  # type: ignore[arg-type]


# -- allocation and reference counts --------------------------------------------------


def test_allocate_takes_from_the_head_and_returns_none_without_room() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    assert bm.allocate(3) == [0, 1, 2]
    assert bm.allocate(2) is None
    assert bm.num_free_blocks == 1
    assert bm.free_queue() == [3]
    assert bm.allocate(1) == [3]
    assert bm.num_used_blocks == 4
    assert bm.drain_events() == []


def test_free_is_tail_first_and_counts_references() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    blocks = bm.allocate(3)
    assert blocks == [0, 1, 2]
    bm.touch([0, 1])  # a second request shares the first two blocks
    assert [bm.ref_count(b) for b in range(3)] == [2, 2, 1]
    bm.free(blocks)
    assert bm.free_queue() == [3, 4, 5, 2]
    bm.free([0, 1])
    assert bm.free_queue() == [3, 4, 5, 2, 1, 0]
    assert bm.num_used_blocks == 0


def test_freeing_too_often_is_an_invariant_violation() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    blocks = bm.allocate(1)
    assert blocks is not None
    bm.free(blocks)
    with pytest.raises(AssertionError, match="freed more often"):
        bm.free(blocks)


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        BlockManager(num_blocks=0, block_size=BS)


# -- caching and events ----------------------------------------------------------------


def test_full_blocks_are_stored_with_parent_and_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(10))  # two full blocks and a partial one
    hashes = hashes_of(tokens)
    blocks = bm.allocate(3)
    assert blocks is not None
    bm.cache_full_blocks(blocks, 0, 1, block_hashes=hashes, token_ids=tokens)
    bm.cache_full_blocks(blocks, 1, 2, block_hashes=hashes, token_ids=tokens, lora_name="x")
    assert bm.drain_events() == [
        BlockStored(
            block_hashes=[hashes[0]],
            parent_block_hash=None,
            token_ids=[0, 1, 2, 3],
            block_size=BS,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        ),
        BlockStored(
            block_hashes=[hashes[1]],
            parent_block_hash=hashes[0],
            token_ids=[4, 5, 6, 7],
            block_size=BS,
            lora_id=None,
            medium="GPU",
            lora_name="x",
            extra_keys=[("x",)],  # as vLLM lists the adapter among each block's extra keys
        ),
    ]
    assert bm.cached_hashes() == {hashes[0]: 0, hashes[1]: 1}
    assert [bm.block_hash(b) for b in blocks] == [hashes[0], hashes[1], None]
    assert bm.drain_events() == []


def test_cache_salt_is_an_extra_key_of_the_first_block_only() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(12))
    hashes = hashes_of(tokens)
    blocks = bm.allocate(3)
    assert blocks is not None
    bm.cache_full_blocks(blocks, 0, 2, block_hashes=hashes, token_ids=tokens, cache_salt="t")
    bm.cache_full_blocks(blocks, 2, 3, block_hashes=hashes, token_ids=tokens, cache_salt="t")
    first, second = bm.drain_events()
    assert isinstance(first, BlockStored) and isinstance(second, BlockStored)
    assert first.extra_keys == [("t",), None]
    assert second.extra_keys is None  # a later run of the chain: nothing extra
    blocks = bm.allocate(1)
    assert blocks is not None
    bm.cache_full_blocks(
        blocks, 0, 1, block_hashes=[7], token_ids=tokens, lora_name="a", cache_salt="t"
    )
    (event,) = bm.drain_events()
    assert isinstance(event, BlockStored)
    assert event.extra_keys == [("a", "t")]  # vLLM's order: adapter, then the salt


def test_prefix_lookup_stops_at_the_first_miss_and_respects_the_limit() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(12))
    blocks = store(bm, tokens)
    hashes = hashes_of(tokens)
    assert bm.find_cached_prefix(hashes, 3) == blocks
    assert bm.find_cached_prefix(hashes, 2) == blocks[:2]
    assert bm.find_cached_prefix([hashes[0], 12345, hashes[2]], 3) == blocks[:1]
    assert bm.find_cached_prefix(hashes_of(tokens, "lora"), 3) == []


def test_exact_eviction_order_lru_and_tail_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = list(range(0, 12))  # 3 blocks
    b = list(range(100, 112))  # 3 blocks
    a_blocks = store(bm, a)
    b_blocks = store(bm, b)
    bm.drain_events()
    bm.free(a_blocks)  # A finishes first, then B
    bm.free(b_blocks)
    a_hashes, b_hashes = hashes_of(a), hashes_of(b)
    # Each allocation evicts exactly the oldest free block: A's tail, ..., B's head.
    evicted = []
    for _ in range(6):
        assert bm.allocate(1) is not None
        (event,) = bm.drain_events()
        assert isinstance(event, BlockRemoved)
        evicted.extend(event.block_hashes)
    assert evicted == a_hashes[::-1] + b_hashes[::-1]
    assert bm.num_cached_blocks == 0


def test_a_prefix_hit_refreshes_recency() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = list(range(0, 12)), list(range(100, 112))
    a_blocks, b_blocks = store(bm, a), store(bm, b)
    bm.free(a_blocks)
    bm.free(b_blocks)
    bm.drain_events()
    # A's first two blocks are reused by a new request, then freed again: now the most
    # recently used, so B goes first, then A's old tail, then A's head.
    hits = bm.find_cached_prefix(hashes_of(a), 2)
    bm.touch(hits)
    bm.free(hits)
    assert bm.free_queue() == [a_blocks[2], *b_blocks[::-1], a_blocks[1], a_blocks[0]]
    blocks = bm.allocate(6)
    assert blocks is not None
    (event,) = bm.drain_events()
    assert event == BlockRemoved(
        block_hashes=[hashes_of(a)[2], *hashes_of(b)[::-1], hashes_of(a)[1], hashes_of(a)[0]],
        medium="GPU",
    )


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    blocks = store(bm, list(range(8)))
    bm.free(blocks)
    bm.drain_events()
    before = (bm.free_queue(), bm.cached_hashes())
    assert bm.allocate(4) is None
    assert (bm.free_queue(), bm.cached_hashes()) == before
    assert bm.drain_events() == []


def test_duplicate_content_adopts_the_cached_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(12))
    hashes = hashes_of(tokens)
    first = store(bm, tokens[:8])  # another request already cached two blocks
    bm.drain_events()
    second = bm.allocate(3)
    assert second == [2, 3, 4]
    bm.cache_full_blocks(second, 0, 3, block_hashes=hashes, token_ids=tokens)
    # The first two blocks are adopted; only the third is new, stored under its parent.
    assert second == [first[0], first[1], 4]
    assert bm.drain_events() == [
        BlockStored(
            block_hashes=[hashes[2]],
            parent_block_hash=hashes[1],
            token_ids=tokens[8:12],
            block_size=BS,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
    ]
    assert [bm.ref_count(b) for b in (0, 1, 2, 3, 4)] == [2, 2, 0, 0, 1]
    # The duplicates hold nothing: they are reused first.
    assert bm.free_queue()[:2] == [3, 2]
    assert bm.stats().num_deduplicated_blocks == 2


def test_clear_is_refused_while_blocks_are_in_use() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    blocks = store(bm, list(range(8)))
    assert bm.clear() is False
    bm.free(blocks)
    bm.drain_events()
    assert bm.clear() is True
    assert bm.drain_events() == [AllBlocksCleared()]
    assert bm.num_cached_blocks == 0
    assert bm.free_queue() == [0, 1, 2, 3]


def test_without_prefix_caching_nothing_is_cached_or_published() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    tokens = list(range(8))
    blocks = store(bm, tokens)
    assert bm.num_cached_blocks == 0
    assert bm.find_cached_prefix(hashes_of(tokens), 2) == []
    bm.free(blocks)
    assert bm.drain_events() == []


def test_stats_snapshot() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    blocks = store(bm, list(range(8)))
    bm.free(blocks)
    bm.allocate(4)
    stats = bm.stats()
    assert (
        stats.num_blocks,
        stats.num_used_blocks,
        stats.num_free_blocks,
        stats.num_cached_blocks,
        stats.num_evicted_blocks,
        stats.num_stored_blocks,
        stats.num_deduplicated_blocks,
    ) == (4, 4, 0, 0, 2, 2, 0)
