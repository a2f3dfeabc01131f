"""The simulated engine's paged KV cache: blocks, reference counts, prefix caching.

``num_blocks`` blocks of ``block_size`` token slots. A block is *cached* once it is
completely filled: it is registered under its engine hash, a chained hash of its tokens
and everything before it, so a later request with the same prefix can reuse it.

Free blocks, cached or not, wait in one LRU queue; allocation takes from the head::

    free queue (head = evicted first)                      <- freed blocks enter here
    [ never used ... | B.2  B.1  B.0 | A.3  A.2  A.1  A.0 ]
                       request B, freed tail-first before A

A request's blocks are freed tail-first, so a prefix's last block is evicted before its
first one, and the head of a popular prefix stays longest. Taking a cached block off the
head evicts it (a ``BlockRemoved`` event); reusing a cached free block as a prefix hit
takes it out of the queue wherever it is (``touch``).

Engine hashes are deliberately *not* the router's hashes (DESIGN 3.2: engine hashes are
opaque): ``h[i] = xxh3_64(le_u32 tokens of block i, seed=h[i-1] ^ s)`` with ``h[-1] = 0``
and ``s`` a seed of our own, salted by the LoRA adapter name; a request's ``cache_salt``
replaces ``h[-1]`` (vLLM, too, hashes the cache salt into the first block only). Stored
events list those extras per block in ``extra_keys`` as vLLM does: the adapter name on
every block, the cache salt last on block 0.

>>> bm = BlockManager(num_blocks=4, block_size=2)
>>> blocks = bm.allocate(2)
>>> seed = engine_hash_seed(None)
>>> hashes = hash_token_blocks([1, 2, 3, 4], 0, 2, block_size=2, parent_hash=0, seed=seed)
>>> bm.cache_full_blocks(blocks, 0, 2, block_hashes=hashes, token_ids=[1, 2, 3, 4])
>>> bm.num_cached_blocks
2
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import xxhash

from kvrouter.events.vllm import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

__all__ = [
    "ENGINE_HASH_SEED",
    "ROOT_PARENT_HASH",
    "BlockManager",
    "BlockManagerStats",
    "Tokens",
    "engine_hash_seed",
    "engine_root_hash",
    "hash_token_blocks",
    "token_bytes",
    "token_list",
]

# Any constant other than the router's seed (1337) keeps the two hash spaces apart.
ENGINE_HASH_SEED = 0x6B76_656E_6769_6E65
ROOT_PARENT_HASH = 0
_U64 = 0xFFFFFFFFFFFFFFFF
_xxh3 = xxhash.xxh3_64_intdigest
_U32 = np.dtype("<u4")

# A prompt: a list of ints, an array("I") or a numpy array of token ids.
Tokens = Sequence[int] | np.ndarray[Any, Any]


def engine_root_hash(cache_salt: str | None) -> int:
    """The parent hash of a request's first block: a cache salt starts its own chains."""
    if not cache_salt:
        return ROOT_PARENT_HASH
    return _xxh3(b"salt=" + cache_salt.encode(), ENGINE_HASH_SEED & _U64)


def engine_hash_seed(lora_name: str | None) -> int:
    """The engine's hash seed for blocks computed under ``lora_name`` (``None``: base model)."""
    if not lora_name:
        return ENGINE_HASH_SEED
    return _xxh3(b"lora=" + lora_name.encode(), ENGINE_HASH_SEED & _U64)


def _extra_keys(
    start: int, end: int, lora_name: str | None, cache_salt: str | None
) -> list[tuple[Any, ...] | None] | None:
    """vLLM's per-block extra keys of blocks ``start..end-1``; ``None`` when there are none."""
    salted = bool(cache_salt) and start == 0
    if not lora_name and not salted:
        return None
    lora: tuple[str, ...] = (lora_name,) if lora_name else ()
    keys: list[tuple[Any, ...] | None] = [lora or None] * (end - start)
    if salted:
        keys[0] = (*lora, cache_salt)
    return keys


def token_bytes(tokens: Tokens) -> bytes:
    """Token ids as unsigned 32-bit little-endian integers; ValueError if one does not fit."""
    if isinstance(tokens, np.ndarray):
        out_of_range = (
            tokens.dtype != _U32
            and tokens.size
            and (int(tokens.min()) < 0 or int(tokens.max()) > 0xFFFFFFFF)
        )
        if out_of_range:
            raise ValueError("token ids must be integers in [0, 2**32)")
        return bytes(np.ascontiguousarray(tokens, dtype=_U32).data)
    if isinstance(tokens, array) and tokens.typecode == "I":
        return tokens.tobytes()
    try:
        # array("I") is native order; every supported platform is little-endian.
        # fromlist() is several times faster than the constructor on a list.
        packed = array("I")
        if isinstance(tokens, list):
            packed.fromlist(tokens)
        else:
            packed.extend(tokens)
        return packed.tobytes()
    except (OverflowError, TypeError) as exc:
        raise ValueError("token ids must be integers in [0, 2**32)") from exc


def hash_token_blocks(
    tokens: Tokens,
    start_block: int,
    end_block: int,
    *,
    block_size: int,
    parent_hash: int,
    seed: int,
) -> list[int]:
    """Engine hashes of blocks ``start_block..end_block-1`` of ``tokens``.

    ``parent_hash`` is the hash of block ``start_block - 1`` (``ROOT_PARENT_HASH`` for the
    first block). The chain goes through the seed, so each block costs one xxh3 call over
    its own bytes: ``h[i] = xxh3_64(block bytes, seed=h[i-1] ^ seed)``. Raises ValueError
    when a token id does not fit in 32 bits.
    """
    if end_block <= start_block:
        return []
    data = memoryview(token_bytes(tokens[start_block * block_size : end_block * block_size]))
    step = block_size * 4
    xxh3 = _xxh3
    seed &= _U64
    prev = parent_hash
    out: list[int] = []
    append = out.append
    for offset in range(0, len(data), step):
        prev = xxh3(data[offset : offset + step], prev ^ seed)
        append(prev)
    return out


def token_list(tokens: Tokens) -> list[int]:
    """Token ids as a list of Python ints (a list is returned as is)."""
    if isinstance(tokens, list):
        return tokens
    if isinstance(tokens, np.ndarray | array):
        converted: list[int] = tokens.tolist()  # Python ints, converted in C
        return converted
    return list(tokens)


@dataclass(frozen=True, slots=True)
class BlockManagerStats:
    """A snapshot of the KV cache."""

    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_evicted_blocks: int
    num_stored_blocks: int
    num_deduplicated_blocks: int


class BlockManager:
    """A pool of KV blocks with reference counts, prefix caching and LRU eviction.

    Capacity shortage is not an error: :meth:`allocate` returns ``None``. Every change to
    the set of cached blocks is recorded as a vLLM KV event; :meth:`drain_events` hands
    them over in order.
    """

    __slots__ = (
        "_block_hash",
        "_cached",
        "_events",
        "_free",
        "_num_deduplicated",
        "_num_evicted",
        "_num_stored",
        "_ref_count",
        "block_size",
        "enable_prefix_caching",
        "medium",
        "num_blocks",
    )

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        medium: str = "GPU",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.medium = medium
        self._ref_count = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # engine hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._events: list[KVCacheEvent] = []
        self._num_evicted = 0
        self._num_stored = 0
        self._num_deduplicated = 0

    # -- queries -----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference (cached ones included: they can be evicted)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or free)."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        """How many requests hold ``block_id``."""
        return self._ref_count[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The engine hash a block is cached under, or ``None``."""
        return self._block_hash[block_id]

    def cached_hashes(self) -> dict[int, int]:
        """A copy of the cache map: engine hash -> block id."""
        return dict(self._cached)

    def free_queue(self) -> list[int]:
        """Free block ids, the next one to be reused first."""
        return list(self._free)

    def head_block_hashes(self, num_blocks: int) -> list[int | None]:
        """Cache hashes of the next ``num_blocks`` blocks :meth:`allocate` would take."""
        block_hash = self._block_hash
        return [block_hash[block_id] for block_id in islice(self._free, num_blocks)]

    def find_cached_prefix(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids holding the longest cached prefix of ``block_hashes[:max_blocks]``."""
        if not self.enable_prefix_caching:
            return []
        cached = self._cached
        hits: list[int] = []
        for block_hash in block_hashes[:max_blocks]:
            block_id = cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def count_unreferenced(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` sit in the free queue (touching them takes them out)."""
        ref_count = self._ref_count
        return sum(1 for block_id in block_ids if ref_count[block_id] == 0)

    # -- commands ----------------------------------------------------------------------

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); free ones leave the queue."""
        ref_count = self._ref_count
        free = self._free
        for block_id in block_ids:
            if ref_count[block_id] == 0:
                del free[block_id]
            ref_count[block_id] += 1

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take ``num_blocks`` blocks from the head of the free queue, evicting cached ones.

        Returns ``None`` (and changes nothing) when fewer blocks are free.
        """
        free = self._free
        if num_blocks > len(free):
            return None
        ref_count = self._ref_count
        block_hash = self._block_hash
        cached = self._cached
        popitem = free.popitem
        evicted: list[int] = []
        out: list[int] = []
        for _ in range(num_blocks):
            block_id = popitem(False)[0]
            old_hash = block_hash[block_id]
            if old_hash is not None:
                del cached[old_hash]
                block_hash[block_id] = None
                evicted.append(old_hash)
            ref_count[block_id] = 1
            out.append(block_id)
        if evicted:
            self._num_evicted += len(evicted)
            self._events.append(BlockRemoved(block_hashes=evicted, medium=self.medium))
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each of a request's blocks, tail-first.

        Blocks whose count reaches zero join the end of the free queue, the request's last
        block first, so the tail of a prefix is evicted before its head.
        """
        ref_count = self._ref_count
        free = self._free
        for block_id in reversed(block_ids):
            count = ref_count[block_id] - 1
            assert count >= 0, f"block {block_id} freed more often than referenced"
            ref_count[block_id] = count
            if count == 0:
                free[block_id] = None

    def cache_full_blocks(
        self,
        block_ids: list[int],
        start: int,
        end: int,
        *,
        block_hashes: Sequence[int],
        token_ids: Tokens,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> None:
        """Register blocks ``start..end-1`` of a request, now completely filled, as cached.

        ``block_hashes[i]`` is the engine hash of block ``i`` and ``token_ids`` the
        request's tokens; ``lora_name`` and ``cache_salt`` go into the events. When another
        block already holds the same content (two requests computed one prefix at once),
        the request adopts the cached block and its own copy goes back to the free queue:
        ``block_ids`` is updated in place.
        """
        if not self.enable_prefix_caching or end <= start:
            return
        run_start = start
        for index in range(start, end):
            existing = self._cached.get(block_hashes[index])
            if existing is None:
                continue
            self._store_run(
                block_ids,
                run_start,
                index,
                block_hashes=block_hashes,
                token_ids=token_ids,
                lora_name=lora_name,
                cache_salt=cache_salt,
            )
            self._adopt(block_ids, index, existing)
            run_start = index + 1
        self._store_run(
            block_ids,
            run_start,
            end,
            block_hashes=block_hashes,
            token_ids=token_ids,
            lora_name=lora_name,
            cache_salt=cache_salt,
        )

    def clear(self) -> bool:
        """Forget every cached block (``AllBlocksCleared``); refused while any block is in use."""
        if self.num_used_blocks:
            return False
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        self._free = OrderedDict.fromkeys(range(self.num_blocks))
        self._events.append(AllBlocksCleared())
        return True

    def has_pending_events(self) -> bool:
        """Whether :meth:`drain_events` has anything to hand over."""
        return bool(self._events)

    def drain_events(self) -> list[KVCacheEvent]:
        """The KV events recorded since the last call, oldest first."""
        events = self._events
        self._events = []
        return events

    def stats(self) -> BlockManagerStats:
        """A snapshot of the pool and its counters."""
        return BlockManagerStats(
            num_blocks=self.num_blocks,
            num_used_blocks=self.num_used_blocks,
            num_free_blocks=self.num_free_blocks,
            num_cached_blocks=self.num_cached_blocks,
            num_evicted_blocks=self._num_evicted,
            num_stored_blocks=self._num_stored,
            num_deduplicated_blocks=self._num_deduplicated,
        )

    # -- internals ---------------------------------------------------------------------

    def _store_run(
        self,
        block_ids: list[int],
        start: int,
        end: int,
        *,
        block_hashes: Sequence[int],
        token_ids: Tokens,
        lora_name: str | None,
        cache_salt: str | None,
    ) -> None:
        if end <= start:
            return
        cached = self._cached
        block_hash = self._block_hash
        for index in range(start, end):
            block_id = block_ids[index]
            assert block_hash[block_id] is None, f"block {block_id} is already cached"
            new_hash = block_hashes[index]
            block_hash[block_id] = new_hash
            cached[new_hash] = block_id
        self._num_stored += end - start
        size = self.block_size
        self._events.append(
            BlockStored(
                block_hashes=list(block_hashes[start:end]),
                parent_block_hash=block_hashes[start - 1] if start > 0 else None,
                token_ids=token_ids[start * size : end * size],
                block_size=size,
                lora_id=None,
                medium=self.medium,
                lora_name=lora_name,
                extra_keys=_extra_keys(start, end, lora_name, cache_salt),
            )
        )

    def _adopt(self, block_ids: list[int], index: int, existing: int) -> None:
        own = block_ids[index]
        self.touch((existing,))
        count = self._ref_count[own] - 1
        assert count == 0, f"uncached block {own} is shared ({count + 1} references)"
        self._ref_count[own] = 0
        # An uncached block holds nothing worth keeping: reuse it before any cached one.
        self._free[own] = None
        self._free.move_to_end(own, last=False)
        block_ids[index] = existing
        self._num_deduplicated += 1
