"""KV events: the router's event model and the wire codecs that produce it."""

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

__all__ = [
    "DEFAULT_MEDIUM",
    "Cleared",
    "EventData",
    "Removed",
    "RouterEvent",
    "Stored",
    "StoredBlock",
    "WorkerKey",
]
