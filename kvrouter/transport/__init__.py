"""Transports: how KV events and load metrics travel between workers and the router.

* :mod:`~kvrouter.transport.base` — the interface (publish / subscribe / close), the
  ``[topic, seq, payload]`` message and :func:`make_event_transport`.
* :mod:`~kvrouter.transport.inproc` — in-process bus (tests, embedded mode, simulator).
* :mod:`~kvrouter.transport.zmq_transport` — ZeroMQ PUB + ROUTER replay, vLLM's format.
* :mod:`~kvrouter.transport.nats_transport` — the same messages and replay over NATS.
* :mod:`~kvrouter.transport.publisher` — :class:`KvEventPublisher` (worker side).
* :mod:`~kvrouter.transport.subscriber` — :class:`KvEventSubscriber` (router side).
* :mod:`~kvrouter.transport.metrics` — :class:`WorkerMetricsPublisher`,
  :class:`MetricsSubscriber`, :func:`render_vllm_metrics`.

The ZeroMQ and NATS modules are imported lazily by the factory, so ``import kvrouter.transport``
stays cheap.
"""

from kvrouter.transport.base import (
    END_SEQ,
    EventTransport,
    Malformed,
    Message,
    Subscription,
    SubscriptionEndpoint,
    TransportStats,
    make_event_transport,
    parse_frames,
)
from kvrouter.transport.inproc import InProcBus, InProcTransport
from kvrouter.transport.metrics import (
    MetricsSubscriber,
    WorkerMetricsPublisher,
    render_vllm_metrics,
)
from kvrouter.transport.publisher import KvEventPublisher, PublisherStats
from kvrouter.transport.subscriber import (
    EventIndex,
    KvEventSubscriber,
    StreamStats,
    SubscriberStats,
    WorkerEndpoint,
)

__all__ = [
    "END_SEQ",
    "EventIndex",
    "EventTransport",
    "InProcBus",
    "InProcTransport",
    "KvEventPublisher",
    "KvEventSubscriber",
    "Malformed",
    "Message",
    "MetricsSubscriber",
    "PublisherStats",
    "StreamStats",
    "SubscriberStats",
    "Subscription",
    "SubscriptionEndpoint",
    "TransportStats",
    "WorkerEndpoint",
    "WorkerMetricsPublisher",
    "make_event_transport",
    "parse_frames",
    "render_vllm_metrics",
]
