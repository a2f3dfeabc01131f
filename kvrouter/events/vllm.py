"""vLLM / SGLang KV events on the wire (DESIGN 3.2): msgspec structs and codecs.

The structs below are what an *engine* publishes (engine block hashes, token ids), in
vLLM's tagged-array form::

    batch  = [ts, [event, ...], dp_rank]             # dp_rank optional (older senders)
    event  = ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
              lora_id, medium, lora_name, extra_keys, group_idx,
              kv_cache_spec_kind, kv_cache_spec_sliding_window]
           | ["BlockRemoved", block_hashes, medium, group_idx]
           | ["AllBlocksCleared"]

Newer senders (vLLM >= 0.24, newer SGLang) send each event as a map with a ``"type"``
key and the same field names instead, and the newest vLLM sends the batch itself as a
map too: ``{"ts": ..., "events": [...], "data_parallel_rank": ...}``, leaving out the
event fields that are unset. :class:`VllmEventDecoder` accepts all of these, ignores
unknown keys and extra trailing array items, and turns each event into the router's
model (:mod:`kvrouter.events.model`), recomputing local hashes from ``token_ids``.

Hybrid models (sliding-window or Mamba layers beside full attention) keep one KV cache
group per layer kind and tag each event with its ``group_idx``; stored events also name
the group's ``kv_cache_spec_kind``. A prefix is reusable only as far as the
full-attention group holds it, so the decoder indexes one group, the first one it sees
that is not a window or recurrent-state group (:data:`PARTIAL_KINDS`), and skips (and
counts) the events of the others.

>>> payload = encode_batch(KVEventBatch(1.0, [AllBlocksCleared()]))
>>> VllmEventDecoder(block_size=16).decode(payload).events
[Cleared()]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import Annotated, Any, Literal, cast

import msgspec
import numpy as np
from msgspec.msgpack import Decoder

from kvrouter.errors import DecodeError
from kvrouter.events.model import (
    DEFAULT_MEDIUM,
    MAX_DP_RANK,
    Cleared,
    Removed,
    Stored,
    StoredBlock,
)
from kvrouter.hashing import Tokens, compute_block_hashes, make_salt

__all__ = [
    "EVENT_FORMS",
    "PARTIAL_KINDS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "DecodedBatch",
    "DecoderStats",
    "EventForm",
    "KVCacheEvent",
    "KVEventBatch",
    "VllmEventDecoder",
    "encode_batch",
]

logger = logging.getLogger(__name__)

_U64 = 0xFFFFFFFFFFFFFFFF
# StoredBlock(...) runs a Python-level __new__; building the tuples in C is ~35 % faster
# for a long prefill. zip() always yields exactly the three fields.
_new_stored_block = partial(tuple.__new__, StoredBlock)

# --------------------------------------------------------------------------------------
# Engine-side wire structs (what a publisher encodes).
# --------------------------------------------------------------------------------------


class BlockStored(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Blocks stored as a chain; ``token_ids`` holds ``len(block_hashes) * block_size`` ids.

    ``token_ids`` may be a numpy integer array (an engine's prompt slice, no copy); it is
    written as a msgpack array of ints either way.
    """

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: Tokens
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Blocks evicted from ``medium`` (``None`` means the GPU)."""

    block_hashes: list[int]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Every block is gone (cache reset)."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One published message: ``[ts, events, data_parallel_rank]``."""

    ts: float
    events: list[KVCacheEvent]
    data_parallel_rank: int | None = None


def _enc_hook(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise NotImplementedError(f"cannot encode {type(value).__name__} in a KV event")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


EventForm = Literal["array", "map", "map-batch"]
EVENT_FORMS: tuple[EventForm, ...] = ("array", "map", "map-batch")

# Fields the newest vLLM leaves out of a map event when they are unset (they have
# defaults there); the others are always written, None or not.
_OMITTED_WHEN_UNSET = frozenset(
    ["extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window"]
)


def encode_batch(batch: KVEventBatch, *, form: EventForm = "array") -> bytes:
    """Encode ``batch`` as vLLM does, in one of the forms senders use.

    ``"array"``: the batch ``[ts, events, data_parallel_rank]`` with tagged-array events
    (older vLLM, SGLang). ``"map"``: the same batch array with each event a map with a
    ``"type"`` key, every field written. ``"map-batch"``: the newest vLLM's, the batch a
    map ``{"ts", "events", "data_parallel_rank"}`` of map events that leave out
    ``extra_keys``, ``group_idx`` and the cache-spec fields when unset.
    """
    if form == "array":
        return _encoder.encode(batch)
    if form == "map":
        events = [_event_as_map(event, omit_unset=False) for event in batch.events]
        return _encoder.encode([batch.ts, events, batch.data_parallel_rank])
    if form == "map-batch":
        out: dict[str, Any] = {
            "ts": batch.ts,
            "events": [_event_as_map(event, omit_unset=True) for event in batch.events],
        }
        if batch.data_parallel_rank is not None:
            out["data_parallel_rank"] = batch.data_parallel_rank
        return _encoder.encode(out)
    raise ValueError(f"unknown event form {form!r}; expected one of {', '.join(EVENT_FORMS)}")


def _event_as_map(event: KVCacheEvent, *, omit_unset: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(event).__name__}
    for key, value in msgspec.structs.asdict(event).items():
        if value is None and omit_unset and key in _OMITTED_WHEN_UNSET:
            continue
        out[key] = value
    return out


# --------------------------------------------------------------------------------------
# Router-side decoding.
#
# The decode structs are lenient versions of the wire structs: hashes may be ints or
# bytes, fields the router does not use are typed Any so that odd values there do not
# cost an event, and anything after ``kv_cache_spec_kind`` is ignored (msgspec skips
# extra trailing array items and unknown map keys). The array forms subclass the map
# forms, so one isinstance check covers both.
# --------------------------------------------------------------------------------------

_Hash = int | bytes
_Rank = Annotated[int, msgspec.Meta(ge=0, le=MAX_DP_RANK)]


class _MapStored(msgspec.Struct, tag_field="type", tag="BlockStored", gc=False):
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: Any = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: Any = None  # read for salts only; see _cache_salt(), _content_ids()
    group_idx: Any = None  # see VllmEventDecoder._indexes_group()
    kv_cache_spec_kind: Any = None


class _MapRemoved(msgspec.Struct, tag_field="type", tag="BlockRemoved", gc=False):
    block_hashes: list[_Hash]
    medium: str | None = None
    group_idx: Any = None


class _MapCleared(msgspec.Struct, tag_field="type", tag="AllBlocksCleared", gc=False):
    pass


class _ArrStored(_MapStored, array_like=True):
    pass


class _ArrRemoved(_MapRemoved, array_like=True):
    pass


class _ArrCleared(_MapCleared, array_like=True):
    pass


_ArrEvent = _ArrStored | _ArrRemoved | _ArrCleared
_MapEvent = _MapStored | _MapRemoved | _MapCleared


class _ArrBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_ArrEvent]
    dp_rank: _Rank | None = None


class _MapBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_MapEvent]
    dp_rank: _Rank | None = None


class _RankByEitherName:
    """The map batch's rank: ``data_parallel_rank`` (vLLM) or ``attn_dp_rank`` (SGLang)."""

    __slots__ = ()
    data_parallel_rank: int | None
    attn_dp_rank: int | None

    @property
    def dp_rank(self) -> int | None:
        rank = self.data_parallel_rank
        return self.attn_dp_rank if rank is None else rank


class _ObjBatch(msgspec.Struct, _RankByEitherName, gc=False):
    """The newest vLLM's batch: a map."""

    ts: float
    events: list[_MapEvent]
    data_parallel_rank: _Rank | None = None
    attn_dp_rank: _Rank | None = None


class _RawBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    dp_rank: _Rank | None = None


class _RawObjBatch(msgspec.Struct, _RankByEitherName, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: _Rank | None = None
    attn_dp_rank: _Rank | None = None


_Batch = _ArrBatch | _MapBatch | _ObjBatch

# vLLM's KV cache group kinds that do not keep a prefix's state from its first token on
# (a window, a recurrent state) or do not hold the prompt's own prefix: the index never
# follows such a group. Every other kind (full_attention, mla_attention,
# sink_full_attention, and kinds this list does not know) can be followed.
PARTIAL_KINDS = frozenset(
    [
        "sliding_window",
        "sliding_window_mla",
        "chunked_local_attention",
        "mamba",
        "cross_attention",
        "encoder_only_attention",
    ]
)


# What msgspec raises on bad input: its own DecodeError (ValidationError is one), a
# RecursionError past its nesting limit, and UnicodeError for a str that is not
# UTF-8.
_MSGSPEC_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeError)

# First byte of a msgpack map: fixmap, map16, map32.
_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """One decoded message: the events that made sense and an error for each that did not."""

    ts: float
    dp_rank: int
    events: list[Stored | Removed | Cleared]
    errors: list[DecodeError]
    skipped: int = 0  # events of KV cache groups the index does not follow


@dataclass(frozen=True, slots=True)
class DecoderStats:
    num_batches: int
    num_bad_batches: int
    num_events: int
    num_bad_events: int
    num_skipped_events: int = 0  # events of KV cache groups the index does not follow
    group: int | None = None  # the KV cache group followed (None: none named yet)


class VllmEventDecoder:
    """Decode vLLM / SGLang KV event batches into the router's event model.

    ``block_size`` is the router's; a ``BlockStored`` of another size is reported as an
    error. A batch that is neither ``[ts, events, dp_rank?]`` nor ``{"ts", "events",
    "data_parallel_rank"?}`` raises :class:`DecodeError`; a bad event inside a good
    batch lands in ``errors`` and the rest are kept.

    One decoder follows one publisher: it learns which KV cache group to index from
    that publisher's events (see the module docstring).

    >>> decoder = VllmEventDecoder(block_size=2)
    >>> payload = encode_batch(KVEventBatch(0.5, [BlockStored([7], None, [1, 2], 2)], 3))
    >>> batch = decoder.decode(payload)
    >>> batch.dp_rank, batch.events[0].blocks[0].engine_hash
    (3, 7)
    """

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        # A publisher sticks to one form; the one that worked last is tried first.
        self._batch_decoders: list[Decoder[_ArrBatch] | Decoder[_MapBatch] | Decoder[_ObjBatch]]
        self._batch_decoders = [Decoder(_ArrBatch), Decoder(_MapBatch), Decoder(_ObjBatch)]
        self._raw_decoder = Decoder(_RawBatch)
        self._raw_obj_decoder = Decoder(_RawObjBatch)
        self._array_event_decoder = Decoder(_ArrEvent)
        self._map_event_decoder = Decoder(_MapEvent)
        self._num_batches = 0
        self._num_bad_batches = 0
        self._num_events = 0
        self._num_bad_events = 0
        self._num_skipped_events = 0
        self._group: int | None = None  # the KV cache group indexed, once named
        self._group_kinds: dict[int, Any] = {}  # every group seen -> its spec kind

    def stats(self) -> DecoderStats:
        """Counts since construction."""
        return DecoderStats(
            self._num_batches,
            self._num_bad_batches,
            self._num_events,
            self._num_bad_events,
            self._num_skipped_events,
            self._group,
        )

    def group_kinds(self) -> dict[int, Any]:
        """Every KV cache group named in a stored event so far, with its spec kind."""
        return dict(self._group_kinds)

    def decode(self, payload: bytes | bytearray | memoryview) -> DecodedBatch:
        """Decode one msgpack payload; raises :class:`DecodeError` if the batch is malformed."""
        self._num_batches += 1
        raw_events: Sequence[_MapEvent | None]
        parsed = self._decode_typed(payload)
        if parsed is None:
            ts, dp_rank, raw_events, errors = self._decode_per_event(payload)
        else:
            ts, dp_rank, raw_events, errors = parsed.ts, parsed.dp_rank, parsed.events, []
        return self._convert_all(ts, dp_rank or 0, raw_events, errors)

    def convert(self, batch: KVEventBatch) -> DecodedBatch:
        """Convert a batch handed over in-process, as the engine's structs, without bytes.

        Checks and results are those of :meth:`decode` on ``encode_batch(batch)``; an
        in-process engine (the virtual-time simulator) skips the msgpack round trip.
        """
        self._num_batches += 1
        return self._convert_all(batch.ts, batch.data_parallel_rank or 0, batch.events, [])

    def _convert_all(
        self,
        ts: float,
        dp_rank: int,
        raw_events: Sequence[_MapEvent | KVCacheEvent | None],
        errors: list[DecodeError],
    ) -> DecodedBatch:
        events: list[Stored | Removed | Cleared] = []
        append = events.append
        skipped = 0
        for index, raw in enumerate(raw_events):
            if raw is None:
                continue
            group = getattr(raw, "group_idx", None)
            if group is not None and group != self._group and not self._indexes_group(raw, group):
                skipped += 1
                continue
            try:
                append(self._convert(raw))
            except DecodeError as exc:
                errors.append(DecodeError(f"event {index}: {exc}", exc.kind))
        self._num_events += len(events)
        self._num_bad_events += len(errors)
        self._num_skipped_events += skipped
        return DecodedBatch(ts, dp_rank, events, errors, skipped)

    def _indexes_group(self, event: _MapEvent | KVCacheEvent, group: Any) -> bool:
        """Whether to index an event of a KV cache group other than the one followed.

        The first stored event of a group whose kind is not in :data:`PARTIAL_KINDS`
        (full attention, or a kind not given) names the group followed. Until then
        removals are applied whatever their group: removing a block the index does not
        hold costs nothing, while skipping one could leave a block in the index that
        the worker no longer has.
        """
        if not isinstance(group, int) or isinstance(group, bool):
            return True  # not a group number: treat as a single-group sender
        if isinstance(event, _MapStored | BlockStored):
            kind = event.kv_cache_spec_kind
            self._group_kinds.setdefault(group, kind)
            partial = isinstance(kind, str) and kind in PARTIAL_KINDS
            if self._group is None and not partial:
                self._group = group
                logger.info("indexing KV cache group %d (%s)", group, kind or "kind not given")
                return True
            return False
        return self._group is None and isinstance(event, _MapRemoved | BlockRemoved)

    def _decode_typed(self, payload: bytes | bytearray | memoryview) -> _Batch | None:
        """The fast path: the whole batch in one go, in the form the sender last used."""
        decoders = self._batch_decoders
        for position, decoder in enumerate(decoders):
            try:
                batch = decoder.decode(payload)
            except _MSGSPEC_ERRORS:
                continue
            if position:
                decoders.insert(0, decoders.pop(position))
            return batch
        return None

    def _decode_per_event(
        self, payload: bytes | bytearray | memoryview
    ) -> tuple[float, int | None, list[_MapEvent | None], list[DecodeError]]:
        """The slow path: keep every event that decodes, report the others."""
        batch: _RawBatch | _RawObjBatch
        try:
            if len(payload) and payload[0] in _MAP_MARKERS:
                batch = self._raw_obj_decoder.decode(payload)
            else:
                batch = self._raw_decoder.decode(payload)
        except _MSGSPEC_ERRORS as exc:
            self._num_bad_batches += 1
            raise DecodeError(
                "malformed KV event batch, expected [ts, events, dp_rank] or "
                f'{{"ts", "events", "data_parallel_rank"}}: {exc}'
            ) from exc
        events: list[_MapEvent | None] = []
        errors: list[DecodeError] = []
        for index, raw in enumerate(batch.events):
            try:
                events.append(self._decode_event(raw))
            except _MSGSPEC_ERRORS as exc:
                events.append(None)
                errors.append(DecodeError(f"event {index}: malformed event: {exc}"))
        return batch.ts, batch.dp_rank, events, errors

    def _decode_event(self, raw: msgspec.Raw) -> _MapEvent:
        data = memoryview(raw)
        if data and data[0] in _MAP_MARKERS:
            return cast(_MapEvent, self._map_event_decoder.decode(data))
        return cast(_ArrEvent, self._array_event_decoder.decode(data))

    def _convert(self, event: _MapEvent | KVCacheEvent) -> Stored | Removed | Cleared:
        if isinstance(event, _MapStored | BlockStored):
            return self._convert_stored(event)
        if isinstance(event, _MapRemoved | BlockRemoved):
            if not event.block_hashes:
                raise DecodeError("BlockRemoved has no block hashes")
            return Removed(_engine_hashes(event.block_hashes), event.medium or DEFAULT_MEDIUM)
        return Cleared()

    def _convert_stored(self, event: _MapStored | BlockStored) -> Stored:
        block_size = self.block_size
        if event.block_size != block_size:
            raise DecodeError(
                f"BlockStored block_size {event.block_size} does not match "
                f"the router's block_size {block_size}",
                "block_size_mismatch",
            )
        num_blocks = len(event.block_hashes)
        if num_blocks == 0:
            raise DecodeError("BlockStored has no block hashes")
        num_tokens = len(event.token_ids)
        if num_tokens != num_blocks * block_size:
            raise DecodeError(
                f"BlockStored has {num_tokens} token ids for {num_blocks} blocks of "
                f"{block_size} tokens; expected {num_blocks * block_size}"
            )
        lora_name = event.lora_name or None
        salt = make_salt(lora_name=lora_name) if lora_name else None
        parent = event.parent_block_hash
        # Only a chain's first block carries the request's cache salt.
        cache_salt = _cache_salt(event.extra_keys, lora_name) if parent is None else None
        try:
            local = compute_block_hashes(
                event.token_ids, block_size, salt=salt, cache_salt=cache_salt
            )
        except ValueError as exc:
            raise DecodeError(f"BlockStored token ids: {exc}") from exc
        if event.extra_keys is not None:
            _salt_content_blocks(local, event, block_size, lora_name, cache_salt)
        medium = event.medium or DEFAULT_MEDIUM
        blocks = tuple(
            map(_new_stored_block, zip(_engine_hashes(event.block_hashes), local, repeat(medium)))
        )
        return Stored(
            None if parent is None else _engine_hash(parent), blocks, lora_name, block_size
        )


def _salt_content_blocks(
    local: list[int],
    event: _MapStored | BlockStored,
    block_size: int,
    lora_name: str | None,
    cache_salt: str | None,
) -> None:
    """Re-hash, in place, the blocks whose extra keys name multimodal or embedded content.

    Such a block's tokens are placeholders that any image or embedding fills alike, so
    its hash takes the content identifiers as a salt (:func:`make_salt` ``mm_hashes``):
    the block, and through the chain everything after it, matches only a request
    hashed with the same content. A text request never matches it.
    """
    extra_keys = event.extra_keys
    if not isinstance(extra_keys, list | tuple):
        return
    for index, keys in enumerate(extra_keys[: len(local)]):
        content = _content_ids(keys)
        if not content:
            continue
        tokens = event.token_ids[index * block_size : (index + 1) * block_size]
        local[index] = compute_block_hashes(
            tokens,
            block_size,
            salt=make_salt(lora_name=lora_name, mm_hashes=content),
            cache_salt=cache_salt if index == 0 else None,
        )[0]


def _content_ids(keys: Any) -> list[str]:
    """Identifiers of the multimodal items and prompt embeddings among a block's keys."""
    if not isinstance(keys, list | tuple):
        return []
    out: list[str] = []
    for key in keys:
        if isinstance(key, bytes):  # prompt-embedding hash (older senders)
            out.append(key.hex())
        elif isinstance(key, list | tuple) and len(key) == 2 and isinstance(key[0], str):
            out.append(f"{key[0]}@{key[1]}")  # [mm identifier, offset] (older senders)
        elif isinstance(key, dict):  # event_version 1
            kind = key.get("type")
            if kind == "mm":
                out.append(f"{key.get('hash')}@{key.get('block_offset')}")
            elif kind == "prompt_embeds":
                value = key.get("hash")
                out.append(value.hex() if isinstance(value, bytes) else str(value))
    return out


def _cache_salt(extra_keys: Any, lora_name: str | None) -> str | None:
    """The request's ``cache_salt`` among the first block's extra keys, if any.

    vLLM lists per block what went into its hash besides the tokens. Older senders give
    bare values: the LoRA name (every block), ``[mm_id, offset]`` pairs, prompt-embedding
    bytes, and the cache salt (first block, last). Newer ones (``event_version`` 1) give
    tagged maps such as ``{"type": "cache_salt", "salt": ...}``. Anything else is no salt.
    """
    if not isinstance(extra_keys, list | tuple) or not extra_keys:
        return None
    first = extra_keys[0]
    if not isinstance(first, list | tuple):
        return None
    salt: str | None = None
    lora_pending = lora_name is not None
    for key in first:
        if isinstance(key, dict):
            if key.get("type") == "cache_salt" and isinstance(key.get("salt"), str):
                salt = key["salt"]
        elif isinstance(key, str):
            if lora_pending and key == lora_name:
                lora_pending = False  # the adapter's own key, not a salt
            else:
                salt = key
    return salt or None


def _engine_hashes(hashes: Sequence[int | bytes]) -> tuple[int, ...]:
    """Engine block hashes as u64: int64 is taken as two's complement, bytes by their
    last 8 bytes, big-endian (vLLM's sha256 hashes)."""
    return tuple(h & _U64 if type(h) is int else _engine_hash(h) for h in hashes)


def _engine_hash(value: int | bytes) -> int:
    if isinstance(value, int):
        return value & _U64
    if not value:
        raise DecodeError("empty bytes block hash")
    return int.from_bytes(value[-8:], "big")
