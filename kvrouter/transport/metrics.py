"""Load metrics on the wire: a worker pushes, the router listens; and vLLM's ``/metrics``.

:class:`WorkerMetricsPublisher` sends :class:`~kvrouter.load.metrics.ForwardPassMetrics`
over any :class:`~kvrouter.transport.base.EventTransport` when they change, at most
once per ``min_interval_s`` (the latest value wins), and re-sends the latest every
``keepalive_s`` even when nothing changed, so the router can tell a quiet worker from a
dead one. :class:`MetricsSubscriber` is the router side: it hands every snapshot to
its listeners (e.g. ``KvMetricsAggregator.update``).

Message payload: msgpack ``[ts, {ForwardPassMetrics fields}]`` in the usual
``[topic, seq, payload]`` frames (topic ``b"kv-metrics"`` by default).

:func:`render_vllm_metrics` writes the Prometheus text an engine serves on ``/metrics``
under vLLM's names, so the router's scraper reads our engines and vLLM's alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import msgspec

from kvrouter.clock import Clock
from kvrouter.lifecycle import AsyncLifecycle, cancel_and_wait
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.lograte import warn_sparingly
from kvrouter.transport.base import EventTransport, Malformed, Message, Subscription, parse_frames
from kvrouter.transport.subscriber import WorkerEndpoint, follow

__all__ = [
    "METRICS_TOPIC",
    "MetricsEnvelope",
    "MetricsPublisherStats",
    "MetricsStreamStats",
    "MetricsSubscriber",
    "WorkerMetricsPublisher",
    "render_vllm_metrics",
]

logger = logging.getLogger(__name__)

METRICS_TOPIC = b"kv-metrics"

MetricsListener = Callable[[ForwardPassMetrics], object]


class MetricsEnvelope(msgspec.Struct, array_like=True, gc=False):
    """The wire payload: when the snapshot was taken and the snapshot."""

    ts: float
    metrics: ForwardPassMetrics


_ENCODER = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class MetricsPublisherStats:
    num_sent: int
    num_keepalives: int
    num_updates: int
    num_dropped: int


class WorkerMetricsPublisher(AsyncLifecycle):
    """Publish a worker's load metrics: on change (debounced) and as a keep-alive.

    Takes ownership of ``transport``. ``clock`` stamps messages (wall-clock seconds by
    default); debouncing uses monotonic time::

        publisher = WorkerMetricsPublisher(transport, min_interval_s=0.05)
        publisher.update(ForwardPassMetrics(worker_id=1, num_requests_waiting=3))
    """

    def __init__(
        self,
        transport: EventTransport,
        *,
        topic: bytes = METRICS_TOPIC,
        min_interval_s: float = 0.05,
        keepalive_s: float = 1.0,
        clock: Clock = time.time,
    ) -> None:
        if min_interval_s < 0 or keepalive_s <= 0:
            raise ValueError(
                f"need min_interval_s >= 0 and keepalive_s > 0, got {min_interval_s}, {keepalive_s}"
            )
        self.transport = transport
        self.topic = topic
        self.min_interval_s = min_interval_s
        self.keepalive_s = keepalive_s
        self._clock = clock
        self._latest: ForwardPassMetrics | None = None
        self._sent: ForwardPassMetrics | None = None
        self._last_send_s = -math.inf
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seq = 0
        self._num_keepalives = 0
        self._num_updates = 0
        self._num_dropped = 0
        self._closed = False

    def update(self, metrics: ForwardPassMetrics) -> None:
        """Record the latest metrics; they go out within ``min_interval_s`` if changed."""
        self._num_updates += 1
        self._latest = metrics
        if metrics != self._sent:
            self._wake.set()

    def send_now(self) -> int | None:
        """Send the latest metrics immediately (no debounce); returns the seq used."""
        if self._latest is None:
            return None
        if self._closed:
            raise ValueError("metrics publisher is closed")
        metrics = self._latest
        payload = _ENCODER.encode(MetricsEnvelope(self._clock(), metrics))
        seq = self._seq
        self._seq += 1
        if not self.transport.publish(Message(self.topic, seq, payload)):
            self._num_dropped += 1
        self._sent = metrics
        self._last_send_s = time.monotonic()
        return seq

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            changed = self._latest is not None and self._latest != self._sent
            if changed and now >= self._last_send_s + self.min_interval_s:
                self.send_now()
                continue
            if self._latest is not None and now >= self._last_send_s + self.keepalive_s:
                self._num_keepalives += 1
                self.send_now()
                continue
            interval_s = self.min_interval_s if changed else self.keepalive_s
            wait_s = self._last_send_s + interval_s - now if self._latest is not None else None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()

    async def start(self) -> None:
        """Start the transport and the send loop; idempotent."""
        if self._closed:
            raise ValueError("metrics publisher is closed")
        if self._task is None:
            await self.transport.start()
            self._task = asyncio.create_task(self._run(), name="metrics-publisher")

    async def aclose(self) -> None:
        """Stop the send loop and close the transport; idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self.transport.aclose()

    def stats(self) -> MetricsPublisherStats:
        return MetricsPublisherStats(
            num_sent=self._seq,
            num_keepalives=self._num_keepalives,
            num_updates=self._num_updates,
            num_dropped=self._num_dropped,
        )


@dataclass(frozen=True, slots=True)
class MetricsStreamStats:
    worker_id: int
    address: str
    connected: bool
    last_seq: int | None
    num_messages: int
    decode_errors: Mapping[str, int]


@dataclass(eq=False, slots=True)
class _MetricsStream:
    endpoint: WorkerEndpoint
    task: asyncio.Task[None] | None = None
    subscription: Subscription | None = None
    last_seq: int | None = None
    num_messages: int = 0
    decode_errors: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> MetricsStreamStats:
        sub = self.subscription
        return MetricsStreamStats(
            worker_id=self.endpoint.worker_id,
            address=self.endpoint.address,
            connected=sub is not None and sub.connected,
            last_seq=self.last_seq,
            num_messages=self.num_messages,
            decode_errors=MappingProxyType(dict(self.decode_errors)),
        )


class MetricsSubscriber(AsyncLifecycle):
    """Router side of :class:`WorkerMetricsPublisher`: listens to many workers.

    Every received snapshot goes to each listener with ``worker_id`` (and a forced
    ``dp_rank``) taken from the endpoint, so a misconfigured worker cannot speak for
    another. Implements ``add_listener`` (``kvrouter.load.MetricsSource``).
    ``transport``: default a subscribe-only ZeroMQ transport owned by the subscriber.
    """

    def __init__(
        self,
        *,
        transport: EventTransport | None = None,
        endpoints: Iterable[WorkerEndpoint] = (),
        listeners: Iterable[MetricsListener] = (),
        backoff_s: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self._owns_transport = transport is None
        if transport is None:
            from kvrouter.transport.zmq_transport import ZmqTransport

            transport = ZmqTransport()
        self._transport = transport
        self._listeners = list(listeners)
        self._backoff_s = backoff_s
        self._decoder = msgspec.msgpack.Decoder(MetricsEnvelope)
        self._streams: dict[tuple[int, int | None], _MetricsStream] = {}
        self._started = False
        self._closed = False
        for endpoint in endpoints:
            self.add_endpoint(endpoint)

    def add_listener(self, callback: MetricsListener) -> None:
        """Call ``callback(metrics)`` for every snapshot received."""
        self._listeners.append(callback)

    def add_endpoint(self, endpoint: WorkerEndpoint) -> None:
        """Start following a worker's metrics endpoint (now if started)."""
        if self._closed:
            raise ValueError("metrics subscriber is closed")
        if endpoint.key in self._streams:
            raise ValueError(f"worker {endpoint.worker_id} metrics are already subscribed")
        stream = self._streams[endpoint.key] = _MetricsStream(endpoint)
        if self._started:
            self._launch(stream)

    async def remove_endpoint(self, worker_id: int, dp_rank: int | None = None) -> int:
        """Stop following a worker; returns how many endpoints were removed."""
        keys = [
            k for k in self._streams if k[0] == worker_id and (dp_rank is None or k[1] == dp_rank)
        ]
        for key in keys:
            await cancel_and_wait(self._streams.pop(key).task)
        return len(keys)

    async def start(self) -> None:
        """Start one task per endpoint; idempotent."""
        if self._closed:
            raise ValueError("metrics subscriber is closed")
        if not self._started:
            self._started = True
            await self._transport.start()
            for stream in self._streams.values():
                self._launch(stream)

    async def aclose(self) -> None:
        """Cancel the tasks and close an owned transport; idempotent."""
        if self._closed:
            return
        self._closed = True
        for stream in self._streams.values():
            await cancel_and_wait(stream.task)
        if self._owns_transport:
            await self._transport.aclose()

    def stats(self) -> tuple[MetricsStreamStats, ...]:
        """Per-endpoint counters."""
        return tuple(stream.snapshot() for stream in self._streams.values())

    def _launch(self, stream: _MetricsStream) -> None:
        name = f"kv-metrics-{stream.endpoint.worker_id}"
        stream.task = asyncio.create_task(self._follow(stream), name=name)

    async def _follow(self, stream: _MetricsStream) -> None:
        async def on_frames(frames: list[bytes]) -> None:
            self._on_frames(stream, frames)

        await follow(self._transport, stream, on_frames, backoff_s=self._backoff_s, what="metrics")

    def _on_frames(self, stream: _MetricsStream, frames: list[bytes]) -> None:
        message = parse_frames(frames)
        if isinstance(message, Malformed):
            self._count_malformed(stream, message.kind, None, message.reason)
            return
        try:
            envelope = self._decoder.decode(message.payload)
        except msgspec.DecodeError as exc:
            self._count_malformed(stream, "payload", message.seq, str(exc))
            return
        stream.num_messages += 1
        stream.last_seq = message.seq
        endpoint = stream.endpoint
        fields: dict[str, int] = {"worker_id": endpoint.worker_id}
        if endpoint.dp_rank is not None:
            fields["data_parallel_rank"] = endpoint.dp_rank
        metrics = msgspec.structs.replace(envelope.metrics, **fields)
        for listener in self._listeners:
            try:
                listener(metrics)
            except Exception:  # a listener's bug must not end this worker's stream
                logger.exception(
                    "worker %d metrics: a listener failed on seq %d",
                    endpoint.worker_id,
                    message.seq,
                )

    def _count_malformed(
        self, stream: _MetricsStream, kind: str, seq: int | None, reason: str
    ) -> None:
        stream.decode_errors[kind] += 1
        warn_sparingly(
            logger,
            sum(stream.decode_errors.values()),
            "worker %d metrics: malformed message (%s) at seq %s: %s",
            stream.endpoint.worker_id,
            kind,
            "?" if seq is None else seq,
            reason,
        )


# ------------------------------------------------------------------ Prometheus text


@dataclass(frozen=True, slots=True)
class _Series:
    name: str
    kind: str  # "gauge" | "counter"
    help: str


_RUNNING = _Series("vllm:num_requests_running", "gauge", "Number of requests running now.")
_WAITING = _Series("vllm:num_requests_waiting", "gauge", "Number of requests waiting to run.")
_USAGE = _Series("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage; 1 means 100 percent.")
_GPU_USAGE = _Series(
    "vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage (older name); 1 means 100 percent."
)
_QUERIES = _Series("vllm:prefix_cache_queries_total", "counter", "Prefix-cache queries, in tokens.")
_HITS = _Series("vllm:prefix_cache_hits_total", "counter", "Prefix-cache hits, in tokens.")


def render_vllm_metrics(
    metrics: ForwardPassMetrics,
    *,
    model_name: str,
    prefix_cache_queries_total: int = 0,
    prefix_cache_hits_total: int = 0,
) -> str:
    """Prometheus text (format 0.0.4) with vLLM's series names and a ``model_name`` label.

    >>> text = render_vllm_metrics(ForwardPassMetrics(request_active_slots=2), model_name="m")
    >>> 'vllm:num_requests_running{model_name="m"} 2' in text
    True
    """
    label = '{model_name="' + _escape_label(model_name) + '"}'
    values: list[tuple[_Series, float | int]] = [
        (_RUNNING, metrics.request_active_slots),
        (_WAITING, metrics.num_requests_waiting),
        (_USAGE, metrics.gpu_cache_usage_perc),
        (_GPU_USAGE, metrics.gpu_cache_usage_perc),
        (_QUERIES, prefix_cache_queries_total),
        (_HITS, prefix_cache_hits_total),
    ]
    lines: list[str] = []
    for series, value in values:
        lines.append(f"# HELP {series.name} {series.help}")
        lines.append(f"# TYPE {series.name} {series.kind}")
        lines.append(f"{series.name}{label} {_format_value(value)}")
    return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
