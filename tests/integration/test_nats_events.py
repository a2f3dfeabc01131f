"""KV events and load metrics over a real nats-server: publisher -> subscriber -> index,
replay for late joiners, and KV-aware routing of NATS runtime calls."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from kvrouter.events.model import WorkerKey
from kvrouter.events.vllm import BlockStored, KVEventBatch, encode_batch
from kvrouter.gateway.config import GatewayConfig, WorkerSpec
from kvrouter.gateway.server import GatewayServer
from kvrouter.hashing import compute_block_hashes
from kvrouter.index import KvIndexer
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.routing.scheduler import KvScheduler
from kvrouter.runtime import KvRouterClient, NatsRuntime, endpoint, service
from kvrouter.transport import (
    KvEventPublisher,
    KvEventSubscriber,
    MetricsSubscriber,
    StreamStats,
    WorkerEndpoint,
    WorkerMetricsPublisher,
    make_event_transport,
)
from kvrouter.transport.base import Message
from kvrouter.transport.nats_transport import NatsTransport, pack_envelope, unpack_envelope
from tests.unit.transport.helpers import BLOCK_SIZE, tokens, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SUBJECT = "kvr.events.w1"


def events_at(worker_id: int = 1, subject: str = SUBJECT) -> WorkerEndpoint:
    return WorkerEndpoint(worker_id, subject, subject + ".replay")


def only_stream(subscriber: KvEventSubscriber) -> StreamStats:
    return subscriber.stats().streams[0]


def store(publisher: KvEventPublisher, start: int, hashes: list[int], parent: int | None) -> None:
    publisher.publish_stored(tokens(start, len(hashes)), hashes, parent)
    publisher.flush()


def test_envelope_round_trip_and_malformed() -> None:
    message = Message(b"kv", 2**64 - 2, b"\x93\x01\x02")
    assert unpack_envelope(pack_envelope(message)) == [
        b"kv",
        (2**64 - 2).to_bytes(8),
        b"\x93\x01\x02",
    ]
    assert unpack_envelope(pack_envelope(Message(b"", 0, b""))) == [b"", bytes(8), b""]
    assert unpack_envelope(b"\x00") == [b"\x00"]  # too short: one frame, reported upstream
    assert unpack_envelope(b"\x00\x05abc") == [b"\x00\x05abc"]


async def test_events_reach_the_index_and_late_joiners_replay(nats_url: str) -> None:
    index = KvIndexer(block_size=BLOCK_SIZE)
    transport = make_event_transport("nats", servers=nats_url, address=SUBJECT)
    async with KvEventPublisher(transport, block_size=BLOCK_SIZE) as publisher:
        assert transport.publish_address == SUBJECT
        assert transport.replay_address == SUBJECT + ".replay"
        # Published before anyone listens: only the replay buffer has them.
        store(publisher, 0, [11, 12], None)
        store(publisher, 8, [13], 12)
        async with (
            NatsTransport(nats_url) as side,
            KvEventSubscriber(
                index, block_size=BLOCK_SIZE, transport=side, endpoints=[events_at()]
            ) as subscriber,
        ):
            await wait_until(lambda: only_stream(subscriber).connected)
            store(publisher, 12, [14], 13)  # seq 2: the subscriber asks for 0.. first
            await wait_until(lambda: only_stream(subscriber).last_seq == 2)
            assert index.find_matches_for_request(tokens(0, 4)) == {1: 4}
            stats = only_stream(subscriber)
            assert (stats.num_late_joins, stats.num_resets, stats.num_events) == (1, 0, 3)
            publisher.publish_removed([14])
            publisher.flush()
            await wait_until(lambda: only_stream(subscriber).last_seq == 3)
            assert index.find_matches_for_request(tokens(0, 4)) == {1: 3}
        assert transport.stats().num_replay_requests == 1
        assert transport.stats().num_published == 4


async def test_malformed_envelopes_are_counted_and_the_stream_goes_on(nats_url: str) -> None:
    index = KvIndexer(block_size=BLOCK_SIZE)
    async with NatsTransport(nats_url) as side:
        nc = side.connection
        good = KVEventBatch(1.0, [BlockStored([12], 11, tokens(4, 1), BLOCK_SIZE)])
        async with (
            KvEventPublisher(
                NatsTransport(connection=nc, address=SUBJECT), block_size=BLOCK_SIZE
            ) as publisher,
            KvEventSubscriber(
                index, block_size=BLOCK_SIZE, transport=side, endpoints=[events_at()]
            ) as subscriber,
        ):
            await wait_until(lambda: only_stream(subscriber).connected)
            store(publisher, 0, [11], None)
            await wait_until(lambda: only_stream(subscriber).last_seq == 0)
            await nc.publish(SUBJECT, b"\x00")  # not an envelope
            await nc.publish(SUBJECT, pack_envelope(Message(b"", 1, b"\xc1")))  # not msgpack
            await nc.publish(SUBJECT, pack_envelope(Message(b"", 2, encode_batch(good))))
            await wait_until(lambda: only_stream(subscriber).last_seq == 2)
            assert dict(only_stream(subscriber).decode_errors) == {"frame_count": 1, "batch": 1}
            assert index.find_matches_for_request(tokens(0, 2)) == {1: 2}


def test_bad_settings_are_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="not a usable NATS subject"):
        NatsTransport(address="kvr.events.w1.replay")
    with pytest.raises(ValueError, match="buffer_steps must be >= 0"):
        NatsTransport(buffer_steps=-1)
    with pytest.raises(ValueError, match="no started publishing subject"):
        NatsTransport(address=SUBJECT).publish(Message(b"", 0, b""))


async def test_a_full_outgoing_queue_drops_and_counts(nats_url: str) -> None:
    async with NatsTransport(nats_url, SUBJECT, queue_size=1) as transport:
        assert transport.publish(Message(b"", 0, b"a"))
        assert not transport.publish(Message(b"", 1, b"b"))  # the sender has not run yet
        stats = transport.stats()
        assert (stats.num_published, stats.num_dropped, stats.num_buffered) == (2, 1, 2)


async def test_replay_without_a_publisher_answers_none_at_once(nats_url: str) -> None:
    async with NatsTransport(nats_url) as transport:
        subscription = await transport.subscribe(events_at().subscription_endpoint())
        started = asyncio.get_running_loop().time()
        assert await subscription.replay(0, timeout_s=5.0) is None  # no responders
        assert asyncio.get_running_loop().time() - started < 2.0
        await subscription.aclose()


async def test_metrics_over_nats(nats_url: str) -> None:
    received: list[ForwardPassMetrics] = []
    transport = NatsTransport(nats_url, "kvr.metrics.w4", buffer_steps=0)
    async with WorkerMetricsPublisher(transport, min_interval_s=0.0, keepalive_s=5.0) as pub:
        assert transport.replay_address is None
        async with (
            NatsTransport(nats_url) as side,
            MetricsSubscriber(
                transport=side,
                endpoints=[WorkerEndpoint(4, "kvr.metrics.w4")],
                listeners=[received.append],
            ) as sub,
        ):
            await wait_until(lambda: sub.stats()[0].connected)
            pub.update(ForwardPassMetrics(worker_id=4, kv_active_blocks=7))
            await wait_until(lambda: len(received) == 1)
            assert received[0] == ForwardPassMetrics(worker_id=4, kv_active_blocks=7)


@service(namespace="natskv")
class CachingEngine:
    """Answers with its name and announces the prompt's blocks as cached, over NATS."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: KvEventPublisher | None = None

    @endpoint
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[str]:
        token_ids: list[int] = request["token_ids"]
        num_blocks = len(token_ids) // BLOCK_SIZE
        if self.events is not None and num_blocks:
            base = 1000 * (1 + ord(self.name[0]))
            hashes = [base + i for i in range(num_blocks)]
            self.events.publish_stored(token_ids[: num_blocks * BLOCK_SIZE], hashes, None)
            self.events.flush()
        yield self.name


async def test_runtime_calls_are_routed_by_kv_events_over_nats(nats_url: str) -> None:
    async with await NatsRuntime.connect(nats_url) as rt:
        engines = {name: CachingEngine(name) for name in ("a", "b")}
        served = {name: await rt.serve(engine) for name, engine in engines.items()}
        publishers = []
        for name, engine in engines.items():
            subject = f"kvr.events.{served[name].instance_id:x}"
            transport = NatsTransport(connection=rt.connection, address=subject)
            engine.events = KvEventPublisher(transport, block_size=BLOCK_SIZE)
            await engine.events.start()
            publishers.append(engine.events)

        index = KvIndexer(block_size=BLOCK_SIZE)
        scheduler = KvScheduler(index, block_size=BLOCK_SIZE, predict_cache=False)
        follow = [
            events_at(s.instance_id, f"kvr.events.{s.instance_id:x}") for s in served.values()
        ]
        async with (
            NatsTransport(connection=rt.connection) as side,
            KvEventSubscriber(
                index, block_size=BLOCK_SIZE, transport=side, endpoints=follow
            ) as subscriber,
        ):
            client = await rt.client("natskv", "CachingEngine", "generate")
            await client.wait_for_instances(minimum=2, timeout_s=10)
            router = KvRouterClient(client, scheduler)
            prompt = list(range(10 * BLOCK_SIZE))
            first = [item async for item in router.generate({"token_ids": prompt})]
            key = WorkerKey(served[first[0]].instance_id)
            await wait_until(lambda: index.tree_size(key) == 10)
            for _ in range(4):
                again = [item async for item in router.generate({"token_ids": prompt})]
                assert again == first
            assert subscriber.stats().num_decode_errors == 0
            matched = index.find_matches_for_request(prompt)
            assert matched == {key.worker_id: len(compute_block_hashes(prompt, BLOCK_SIZE))}
        for publisher in publishers:
            await publisher.aclose()


_WORKER_LINE = re.compile(r"worker (\d+): http (\S+) kv-events (\S+) replay (\S+) metrics (\S+)")


async def test_gateway_follows_mocker_workers_over_nats(nats_url: str) -> None:
    """``kvrouter mocker --nats-url`` workers and a gateway whose worker specs name NATS
    subjects: events, replay and pushed metrics all travel over the NATS server."""
    command = [
        sys.executable, "-m", "kvrouter", "mocker", "--num-workers", "2", "--base-port", "0",
        "--nats-url", nats_url, "--metrics-base-port", "0", "--block-size", str(BLOCK_SIZE),
        "--num-gpu-blocks", "2048", "--speedup-ratio", "100",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        specs = []
        for _ in range(2):
            line = proc.stdout.readline()
            match = _WORKER_LINE.search(line)
            assert match, line
            wid, url, events, replay, metrics = match.groups()
            assert (events, replay) == (
                f"{nats_url}/kvr.events.w{wid}",
                f"{nats_url}/kvr.events.w{wid}.replay",
            )
            specs.append(WorkerSpec(url=url, kv_events=events, metrics=metrics, worker_id=int(wid)))
        cfg = GatewayConfig(port=0, workers=tuple(specs), block_size=BLOCK_SIZE)
        async with GatewayServer(cfg) as gw, aiohttp.ClientSession() as session:
            prompt = "Events over NATS reach the gateway's index. " * 8
            body = {"model": "kvrouter-mock", "prompt": prompt, "max_tokens": 2}
            chosen = []
            cached = []
            for _ in range(3):
                async with session.post(gw.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    chosen.append(resp.headers["x-kvrouter-worker"])
                    usage = (await resp.json())["usage"]
                    cached.append(usage["prompt_tokens_details"]["cached_tokens"])
                await wait_until(lambda: gw.core.indexer.stats().events_applied > 0)
            assert len(set(chosen)) == 1
            assert cached[0] == 0 and min(cached[1:]) > 0
            feeds = gw.feeds.stats()
            assert len(feeds.streams) == 2
            assert feeds.num_decode_errors == 0
            await wait_until(lambda: len(gw.metrics_feeds.stats()) == 2)
            await wait_until(lambda: all(s.num_messages > 0 for s in gw.metrics_feeds.stats()))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
