"""Per-worker state of the index and helpers on worker bitmasks."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvrouter.events.model import DEFAULT_MEDIUM, WorkerKey

if TYPE_CHECKING:
    from kvrouter.index.predicted import Booking

__all__ = ["WorkerState", "clear_bit", "keys_of_mask"]


class WorkerState:
    """One cache (a worker's data-parallel rank): its slot, bit and blocks.

    ``gpu`` is ``blocks["GPU"]``, kept apart for the hot path.
    """

    __slots__ = (
        "bit",
        "blocks",
        "bookings",
        "dups",
        "gpu",
        "key",
        "last_event_id",
        "last_rejection",
        "predicted",
        "rejected",
        "slot",
    )

    def __init__(self, key: WorkerKey, slot: int) -> None:
        self.key = key
        self.slot = slot
        self.bit = 1 << slot
        self.last_event_id: int | None = None
        # events of this worker the index refused, and why the last one was
        self.rejected = 0
        self.last_rejection: str | None = None
        self.gpu: dict[int, int] = {}
        # medium -> {engine hash: sequence hash}
        self.blocks: dict[str, dict[int, int]] = {DEFAULT_MEDIUM: self.gpu}
        # (medium, sequence hash) -> holders beyond the first: two engine hashes can
        # name the same content (e.g. KV cache groups); the bit goes when the last does.
        self.dups: dict[tuple[str, int], int] = {}
        # sequence hash -> the booking that owns the prediction (device tier); never
        # also in ``gpu``'s values
        self.predicted: dict[int, Booking] = {}
        # this worker's bookings, oldest first (some may own nothing any more)
        self.bookings: deque[Booking] = deque()

    def blocks_for(self, medium: str) -> dict[int, int]:
        found = self.blocks.get(medium)
        if found is None:
            found = self.blocks[medium] = {}
        return found


def clear_bit(nodes: dict[int, int], key: int, bit: int) -> None:
    """Take one worker's bit off a node; the node goes with its last bit."""
    mask = nodes.get(key, 0)
    assert mask & bit, f"index out of sync: block {key:#x} lacks the worker's bit"
    mask ^= bit
    if mask:
        nodes[key] = mask
    else:
        del nodes[key]


def keys_of_mask(slot_keys: Sequence[WorkerKey], mask: int) -> tuple[WorkerKey, ...]:
    """The workers whose slot bits are set in ``mask``, lowest slot first."""
    if mask.bit_count() <= 8:
        found = []
        while mask:
            low = mask & -mask
            found.append(slot_keys[low.bit_length() - 1])
            mask ^= low
        return tuple(found)
    # Many workers at once: walk the bytes, not one big-int operation per bit.
    data = mask.to_bytes((mask.bit_length() + 7) // 8, "little")
    return tuple(
        slot_keys[index * 8 + offset]
        for index, byte in enumerate(data)
        if byte
        for offset in _BYTE_BITS[byte]
    )


# For each byte value, the positions of its set bits.
_BYTE_BITS: tuple[tuple[int, ...], ...] = tuple(
    tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256)
)
