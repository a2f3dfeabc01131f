"""Block hashing, compatible with NVIDIA Dynamo's KV router.

A block is ``block_size`` consecutive tokens; a trailing partial block is not hashed.

* **Local hash** of a block: ``xxh3_64(seed=1337)`` over its token ids, each written as
  an unsigned 32-bit little-endian integer. It says *what* the block holds.
* **Sequence hash** of block ``i``: ``seq[0] = local[0]`` and
  ``seq[i] = xxh3_64(seed=1337)(le_u64(seq[i-1]) + le_u64(local[i]))``. It says what the
  block holds *and everything before it*, so equal sequence hashes mean equal prefixes.

A **salt** (LoRA adapter name, a tenant's cache salt, multimodal content hashes; see
:func:`make_salt`) changes every local hash by changing the seed to
``xxh3_64(salt, seed=1337)``. With no salt the hashes equal Dynamo's exactly.

>>> compute_block_hashes([1, 2, 3, 4, 5], block_size=2)   # the 5th token is ignored
[..., ...]
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import xxhash

__all__ = [
    "HASH_SEED",
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

Tokens = Sequence[int] | np.ndarray[Any, Any]
Salt = str | bytes | None


def salt_seed(salt: Salt) -> int:
    """The xxh3 seed used for local hashes under ``salt`` (``1337`` when there is none)."""
    if salt is None or salt == b"" or salt == "":
        return HASH_SEED
    data = salt.encode() if isinstance(salt, str) else bytes(salt)
    return _xxh3(data, HASH_SEED)


def make_salt(
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    mm_hashes: Iterable[str | int] = (),
) -> bytes | None:
    """Combine everything that changes what a block means into one salt (or ``None``).

    >>> make_salt() is None
    True
    >>> make_salt(lora_name="sql-adapter") != make_salt(cache_salt="sql-adapter")
    True
    """
    parts: list[str] = []
    if lora_name:
        parts.append(f"lora={lora_name}")
    if cache_salt:
        parts.append(f"salt={cache_salt}")
    for mm in mm_hashes:
        parts.append(f"mm={mm}")
    if not parts:
        return None
    return "\x1f".join(parts).encode()


def _token_bytes(tokens: Tokens, num_tokens: int) -> bytes | memoryview:
    if isinstance(tokens, np.ndarray):
        arr = tokens[:num_tokens]
        if arr.dtype != np.dtype("<u4"):
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
                raise ValueError("token ids must fit in an unsigned 32-bit integer")
            arr = arr.astype("<u4")
        return memoryview(np.ascontiguousarray(arr)).cast("B")
    try:
        # array('I') is 32-bit unsigned in native order; every supported platform is
        # little-endian, which matches Dynamo's le_u32 encoding.
        return memoryview(array("I", tokens[:num_tokens])).cast("B")
    except OverflowError as exc:
        raise ValueError("token ids must fit in an unsigned 32-bit integer") from exc


def compute_block_hashes(tokens: Tokens, block_size: int, *, salt: Salt = None) -> list[int]:
    """Local hashes of every full block of ``tokens`` (a list of ints or a numpy array)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(tokens) // block_size
    if num_blocks == 0:
        return []
    data = _token_bytes(tokens, num_blocks * block_size)
    step = block_size * 4
    seed = salt_seed(salt)
    xxh3 = _xxh3
    return [xxh3(data[i : i + step], seed) for i in range(0, num_blocks * step, step)]


def compute_sequence_hashes(local_hashes: Sequence[int]) -> list[int]:
    """Chain local hashes into sequence (prefix) hashes."""
    if not local_hashes:
        return []
    xxh3 = _xxh3
    pack = _pack_pair
    prev = local_hashes[0] & _U64
    out = [prev]
    append = out.append
    for local in local_hashes[1:]:
        prev = xxh3(pack(prev, local & _U64), HASH_SEED)
        append(prev)
    return out


def hash_request(
    tokens: Tokens, block_size: int, *, salt: Salt = None
) -> tuple[list[int], list[int]]:
    """Both hash lists of a prompt, computed once: ``(local_hashes, sequence_hashes)``."""
    local = compute_block_hashes(tokens, block_size, salt=salt)
    return local, compute_sequence_hashes(local)
