"""Block hashing, compatible with NVIDIA Dynamo's KV router.

A block is ``block_size`` consecutive tokens; a trailing partial block is not hashed.

* **Local hash** of a block: ``xxh3_64(seed=1337)`` over its token ids, each written as
  an unsigned 32-bit little-endian integer. It says *what* the block holds.
* **Sequence hash** of block ``i``: ``seq[0] = local[0]`` and
  ``seq[i] = xxh3_64(seed=1337)(le_u64(seq[i-1]) + le_u64(local[i]))``. It says what the
  block holds *and everything before it*, so equal sequence hashes mean equal prefixes.

A **salt** (LoRA adapter name, multimodal content hashes; see :func:`make_salt`) changes
every local hash by changing the seed to ``xxh3_64(salt, seed=1337)``. A **cache salt**
(vLLM's per-request ``cache_salt``, which isolates a tenant's cache) changes only the
first block's local hash, as vLLM does for its own block hashes: its seed becomes
``xxh3_64(salt + b"\x1fsalt=" + cache_salt, seed=1337)``, and every sequence hash after
it changes through the chain. With neither the hashes equal Dynamo's exactly.

>>> compute_block_hashes([1, 2, 3, 4, 5], block_size=2)   # the 5th token is ignored
[10773075109927122010, 2662118915037317746]
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import xxhash

__all__ = [
    "HASH_SEED",
    "cache_salt_seed",
    "compute_block_hashes",
    "compute_sequence_hashes",
    "hash_request",
    "make_salt",
    "salt_seed",
]

HASH_SEED = 1337
_U64 = 0xFFFFFFFFFFFFFFFF
_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack
_LE_U32 = np.dtype("<u4")
# array("I") is the fastest list -> bytes path, but only where it is a little-endian u32.
_NATIVE_LE_U32 = array("I").itemsize == 4 and sys.byteorder == "little"

Tokens = Sequence[int] | np.ndarray[Any, Any]
Salt = str | bytes | None


def salt_seed(salt: Salt) -> int:
    """The xxh3 seed used for local hashes under ``salt`` (``1337`` when there is none)."""
    if not salt:  # None, b"" and "" all mean "no salt"
        return HASH_SEED
    data = salt.encode() if isinstance(salt, str) else bytes(salt)
    return _xxh3(data, HASH_SEED)


def make_salt(*, lora_name: str | None = None, mm_hashes: Iterable[str | int] = ()) -> bytes | None:
    """Combine what changes the meaning of every block into one salt (or ``None``).

    A request's ``cache_salt`` is not part of it: it changes the first block only (see
    :func:`compute_block_hashes`).

    >>> make_salt() is None
    True
    >>> make_salt(lora_name="sql-adapter")
    b'lora=sql-adapter'
    """
    parts: list[str] = []
    if lora_name:
        parts.append(f"lora={lora_name}")
    for mm in mm_hashes:
        parts.append(f"mm={mm}")
    if not parts:
        return None
    return "\x1f".join(parts).encode()


def _token_bytes(tokens: Tokens, num_tokens: int) -> bytes:
    """The first ``num_tokens`` token ids as little-endian u32 bytes."""
    if isinstance(tokens, np.ndarray):
        return _array_token_bytes(tokens[:num_tokens])
    if not _NATIVE_LE_U32:
        return _array_token_bytes(np.asarray(tokens[:num_tokens], dtype=np.int64))
    # Slicing a list copies it; skip that when every token is used (the common case
    # once the caller trims, and always for event payloads).
    head = tokens if len(tokens) == num_tokens else tokens[:num_tokens]
    try:
        return array("I", head).tobytes()
    except OverflowError as exc:
        raise ValueError("token ids must fit in an unsigned 32-bit integer") from exc


def _array_token_bytes(arr: np.ndarray[Any, Any]) -> bytes:
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got an array of dtype {arr.dtype}")
    if arr.dtype != _LE_U32:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
            raise ValueError("token ids must fit in an unsigned 32-bit integer")
        arr = arr.astype(_LE_U32)
    return arr.tobytes()


def compute_block_hashes(
    tokens: Tokens, block_size: int, *, salt: Salt = None, cache_salt: str | None = None
) -> list[int]:
    """Local hashes of every full block of ``tokens`` (a list of ints or a numpy array).

    ``salt`` changes every block, ``cache_salt`` the first one only (module docstring).
    Raises ``ValueError`` for a non-positive ``block_size`` or a token id outside u32.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(tokens) // block_size
    if num_blocks == 0:
        return []
    # Slicing bytes is faster than slicing a memoryview for blocks this small.
    data = _token_bytes(tokens, num_blocks * block_size)
    step = block_size * 4
    seed = salt_seed(salt)
    xxh3 = _xxh3
    if not cache_salt:
        return [xxh3(data[i : i + step], seed) for i in range(0, len(data), step)]
    # The cache salt seeds the first block alone.
    out = [xxh3(data[:step], cache_salt_seed(salt, cache_salt))]
    out.extend(xxh3(data[i : i + step], seed) for i in range(step, len(data), step))
    return out


def cache_salt_seed(salt: Salt, cache_salt: str) -> int:
    """The xxh3 seed of the first block's local hash under ``cache_salt``."""
    head = salt.encode() if isinstance(salt, str) else bytes(salt or b"")
    return _xxh3(head + b"\x1fsalt=" + cache_salt.encode(), HASH_SEED)


def compute_sequence_hashes(local_hashes: Sequence[int]) -> list[int]:
    """Chain local hashes into sequence (prefix) hashes.

    Values outside u64 (e.g. int64 hashes) are taken modulo 2**64.
    """
    if not local_hashes:
        return []
    try:
        return _chain(local_hashes)
    except struct.error:
        # Rare: a negative or oversized value; masking every value costs ~20 %.
        return _chain([h & _U64 for h in local_hashes])


def _chain(local_hashes: Sequence[int]) -> list[int]:
    xxh3 = _xxh3
    pack = _pack_pair
    it = iter(local_hashes)
    prev = next(it) & _U64
    out = [prev]
    append = out.append
    for local in it:
        prev = xxh3(pack(prev, local), HASH_SEED)
        append(prev)
    return out


def hash_request(
    tokens: Tokens, block_size: int, *, salt: Salt = None, cache_salt: str | None = None
) -> tuple[list[int], list[int]]:
    """Both hash lists of a prompt, computed once: ``(local_hashes, sequence_hashes)``."""
    local = compute_block_hashes(tokens, block_size, salt=salt, cache_salt=cache_salt)
    return local, compute_sequence_hashes(local)
