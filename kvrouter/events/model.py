"""The router's own event model: what every wire format decodes into.

A :class:`RouterEvent` says that one worker (``worker_id``, ``dp_rank``) stored,
removed or cleared KV blocks. Engine block hashes are opaque to the router: a stored
block carries both the engine's hash (so a later removal can find it) and the router's
own local hash, recomputed from the block's token ids (see :mod:`kvrouter.hashing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DEFAULT_MEDIUM",
    "MAX_DP_RANK",
    "Cleared",
    "EventData",
    "Removed",
    "RouterEvent",
    "Stored",
    "StoredBlock",
    "WorkerKey",
]

DEFAULT_MEDIUM = "GPU"
# A data-parallel rank names an index entry and a metrics endpoint of its own (a bogus
# huge one would stay for good), so ranks are bounded far above any real DP size.
MAX_DP_RANK = 65535


class WorkerKey(NamedTuple):
    """One cache: a worker and its data-parallel rank."""

    worker_id: int
    dp_rank: int = 0


class StoredBlock(NamedTuple):
    engine_hash: int
    local_hash: int
    medium: str = DEFAULT_MEDIUM


@dataclass(frozen=True, slots=True)
class Stored:
    """Blocks stored as a chain: ``blocks[0]``'s parent is ``parent_engine_hash``
    (``None``: the chain starts at the root), each later block's parent is the one
    before it."""

    parent_engine_hash: int | None
    blocks: tuple[StoredBlock, ...]
    lora_name: str | None = None
    # The engine's block size when the source knew it; the indexer rejects a mismatch.
    block_size: int | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    engine_hashes: tuple[int, ...]
    medium: str = DEFAULT_MEDIUM


@dataclass(frozen=True, slots=True)
class Cleared:
    """Every block of the worker is gone (engine restart, cache reset)."""


EventData = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class RouterEvent:
    worker_id: int
    dp_rank: int
    event_id: int
    data: EventData

    @property
    def worker(self) -> WorkerKey:
        return WorkerKey(self.worker_id, self.dp_rank)
