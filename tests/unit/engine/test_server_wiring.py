"""The engine server's wiring: load metrics pushed per step, and the mocker's options."""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack

import msgspec
import openai

from kvrouter.engine import EngineConfig, EngineCore
from kvrouter.engine.cli import MockerOptions, _child_command, start_workers
from kvrouter.engine.server import EngineServer, ServerConfig
from kvrouter.tokenizer import ByteTokenizer
from kvrouter.transport.base import Message, SubscriptionEndpoint, parse_frames
from kvrouter.transport.inproc import InProcBus, InProcTransport
from kvrouter.transport.metrics import MetricsEnvelope, WorkerMetricsPublisher


async def test_load_metrics_are_pushed_while_serving() -> None:
    bus = InProcBus()
    subscriber = InProcTransport(bus)
    subscription = await subscriber.subscribe(SubscriptionEndpoint("metrics-3"))
    config = EngineConfig(block_size=4, num_gpu_blocks=64, max_num_seqs=8, speedup_ratio=1000.0)
    core = EngineCore(config, worker_id=3)
    publisher = WorkerMetricsPublisher(InProcTransport(bus, "metrics-3"), min_interval_s=0.0)
    async with (
        publisher,
        EngineServer(core, ByteTokenizer(), ServerConfig(), metrics_publisher=publisher) as server,
    ):
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        await client.completions.create(model="kvrouter-mock", prompt="hello", max_tokens=2)
        await client.close()
        message = parse_frames(await asyncio.wait_for(subscription.recv(), 5.0))
    await subscriber.aclose()
    assert isinstance(message, Message)
    envelope = msgspec.msgpack.decode(message.payload, type=MetricsEnvelope)
    assert envelope.metrics.worker_id == 3
    assert envelope.metrics.request_total_slots == 8
    assert envelope.metrics.kv_total_blocks == 64


async def test_start_workers_in_one_loop_with_events_disabled() -> None:
    options = MockerOptions(
        num_workers=2, base_port=0, kv_events_base_port=None, worker_id_base=5, speedup_ratio=100.0
    )
    async with AsyncExitStack() as stack:
        workers = await start_workers(options, stack)
        assert [a.worker_id for _, a in workers] == [5, 6]
        assert all(a.kv_events is None and a.replay is None for _, a in workers)
        assert len({a.http_url for _, a in workers}) == 2
        servers = [server for server, _ in workers]
    assert all(s.stats().num_active == 0 for s in servers)


def test_child_command_gives_each_process_its_own_ports() -> None:
    options = MockerOptions(
        num_workers=3,
        base_port=8001,
        kv_events_base_port=5557,
        replay_base_port=None,
        speedup_ratio=2.5,
        tokenizer="byte",
    )
    args = _child_command(options, 2)
    assert args[:4] == [sys.executable, "-m", "kvrouter", "mocker"]
    pairs = dict(zip(args[4::2], args[5::2], strict=True))
    assert pairs["--base-port"] == "8003"
    assert pairs["--kv-events-base-port"] == "5559"
    assert pairs["--replay-base-port"] == "-1"
    assert pairs["--metrics-base-port"] == "-1"
    assert pairs["--worker-id-base"] == "2"
    assert pairs["--speedup-ratio"] == "2.5"
    assert "--num-workers" not in pairs
    assert "--chat-template" not in pairs


def test_port_zero_stays_zero_for_every_worker() -> None:
    options = MockerOptions(base_port=0, kv_events_base_port=0)
    assert [options.port(options.base_port, i) for i in range(3)] == [0, 0, 0]
    assert options.port(None, 1) is None
