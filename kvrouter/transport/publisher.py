"""Worker side: :class:`KvEventPublisher` reports stored / removed / cleared blocks.

Events are collected during an engine step and sent as *one* ``KVEventBatch`` by
:meth:`KvEventPublisher.flush` — vLLM's granularity, and what the replay buffer counts.
Each batch gets the next sequence number (0, 1, 2, ... per publisher), so batches and
their events are ordered and a subscriber can tell when one went missing::

    async with KvEventPublisher(make_event_transport("zmq", endpoint="tcp://*:5557",
                                                     replay_endpoint="tcp://*:5558"),
                                block_size=16) as publisher:
        publisher.publish_stored(token_ids, block_hashes)
        publisher.publish_removed([old_hash])
        publisher.flush()        # end of the engine step: one batch, seq 0
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvrouter.clock import Clock
from kvrouter.events.vllm import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventForm,
    KVCacheEvent,
    KVEventBatch,
    encode_batch,
)
from kvrouter.lifecycle import AsyncLifecycle
from kvrouter.transport.base import EventTransport, Message

__all__ = ["KvEventPublisher", "PublisherStats"]


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """What a :class:`KvEventPublisher` has sent."""

    next_seq: int
    num_batches: int
    num_events: int
    num_pending_events: int
    num_dropped_batches: int


class KvEventPublisher(AsyncLifecycle):
    """Collects one engine step's KV events and publishes them as one sequenced batch.

    The publisher takes ownership of ``transport`` (starts it on ``__aenter__`` /
    :meth:`start`, closes it on :meth:`aclose`). ``topic`` is frame 0 of every message
    (vLLM's ``--kv-events-config`` ``topic``); ``data_parallel_rank`` is the batch's
    third field (``None``: omitted, as older senders do). ``clock`` stamps batches
    (wall-clock seconds by default, like vLLM). ``form`` selects tagged arrays (vLLM
    < 0.24) or maps with a ``"type"`` key.
    """

    def __init__(
        self,
        transport: EventTransport,
        *,
        block_size: int,
        topic: bytes | str = b"",
        data_parallel_rank: int | None = None,
        clock: Clock = time.time,
        form: EventForm = "array",
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.transport = transport
        self.block_size = block_size
        self.topic = topic.encode() if isinstance(topic, str) else topic
        self.data_parallel_rank = data_parallel_rank
        self._clock = clock
        self._form: EventForm = form
        self._pending: list[KVCacheEvent] = []
        self._next_seq = 0
        self._num_batches = 0
        self._num_events = 0
        self._num_dropped = 0
        self._closed = False

    # ------------------------------------------------------------------ events

    def publish_stored(
        self,
        token_ids: Sequence[int],
        block_hashes: Sequence[int],
        parent_hash: int | None = None,
        *,
        medium: str = "GPU",
        lora_name: str | None = None,
        block_size: int | None = None,
    ) -> None:
        """Blocks stored as a chain after ``parent_hash``; ``token_ids`` covers them all."""
        size = self.block_size if block_size is None else block_size
        if len(token_ids) != len(block_hashes) * size:
            raise ValueError(
                f"{len(token_ids)} token ids for {len(block_hashes)} blocks of {size} tokens"
            )
        self._pending.append(
            BlockStored(
                block_hashes=list(block_hashes),
                parent_block_hash=parent_hash,
                token_ids=list(token_ids),
                block_size=size,
                medium=medium,
                lora_name=lora_name,
            )
        )

    def publish_removed(self, block_hashes: Sequence[int], medium: str = "GPU") -> None:
        """Blocks evicted from ``medium``."""
        self._pending.append(BlockRemoved(block_hashes=list(block_hashes), medium=medium))

    def publish_cleared(self) -> None:
        """Every block is gone (cache reset)."""
        self._pending.append(AllBlocksCleared())

    def publish_events(self, events: Iterable[KVCacheEvent]) -> None:
        """Add wire events as produced by the engine core in one step."""
        self._pending.extend(events)

    def flush(self) -> int | None:
        """Send the pending events as one batch; returns its seq (``None``: nothing pending).

        Never blocks. A batch the transport had to drop still consumes its seq and
        stays in the replay buffer, so subscribers see the gap and can repair it.
        """
        if self._closed:
            raise ValueError("publisher is closed")
        if not self._pending:
            return None
        events, self._pending = self._pending, []
        batch = KVEventBatch(self._clock(), events, self.data_parallel_rank)
        seq = self._next_seq
        self._next_seq += 1
        if not self.transport.publish(
            Message(self.topic, seq, encode_batch(batch, form=self._form))
        ):
            self._num_dropped += 1
        self._num_batches += 1
        self._num_events += len(events)
        return seq

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the transport (bind sockets, serve replay); idempotent."""
        await self.transport.start()

    async def aclose(self) -> None:
        """Close the transport; pending (unflushed) events are discarded. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        await self.transport.aclose()

    def stats(self) -> PublisherStats:
        """A frozen snapshot of the counters."""
        return PublisherStats(
            next_seq=self._next_seq,
            num_batches=self._num_batches,
            num_events=self._num_events,
            num_pending_events=len(self._pending),
            num_dropped_batches=self._num_dropped,
        )
