"""KV events: the router's event model and the wire codecs that produce it."""

from kvrouter.events.dynamo import decode_dynamo_event, encode_dynamo_event
from kvrouter.events.model import (
    DEFAULT_MEDIUM,
    Cleared,
    EventData,
    Removed,
    RouterEvent,
    Stored,
    StoredBlock,
    WorkerKey,
)
from kvrouter.events.vllm import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    DecoderStats,
    KVCacheEvent,
    KVEventBatch,
    VllmEventDecoder,
    encode_batch,
)

__all__ = [
    "DEFAULT_MEDIUM",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "Cleared",
    "DecodedBatch",
    "DecoderStats",
    "EventData",
    "KVCacheEvent",
    "KVEventBatch",
    "Removed",
    "RouterEvent",
    "Stored",
    "StoredBlock",
    "VllmEventDecoder",
    "WorkerKey",
    "decode_dynamo_event",
    "encode_batch",
    "encode_dynamo_event",
]
