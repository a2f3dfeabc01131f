"""``kvrouter mocker`` as a real subprocess: HTTP through the openai client, KV events
read off its ZeroMQ PUB socket with a raw SUB socket, replay through a DEALER."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import msgspec
import openai
import pytest
import zmq
import zmq.asyncio

pytestmark = pytest.mark.integration

BLOCK_SIZE = 16
END_SEQ = b"\xff" * 8
_WORKER_LINE = re.compile(
    r"worker (?P<id>\d+): http (?P<http>\S+) kv-events (?P<events>\S+) replay (?P<replay>\S+)"
)


@dataclass
class Mocker:
    process: subprocess.Popen[str]
    workers: dict[int, dict[str, str]]


def start_mocker(*args: str, num_workers: int, timeout_s: float = 30.0) -> Mocker:
    command = [sys.executable, "-m", "kvrouter", "mocker", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert process.stdout is not None
    workers: dict[int, dict[str, str]] = {}
    deadline = time.monotonic() + timeout_s
    while len(workers) < num_workers:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"mocker exited early with {process.wait()}")
        if match := _WORKER_LINE.search(line):
            workers[int(match["id"])] = match.groupdict()
        assert time.monotonic() < deadline, "mocker did not start in time"
    return Mocker(process, workers)


def stop(process: subprocess.Popen[str], timeout_s: float = 20.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
def mocker() -> Iterator[Mocker]:
    m = start_mocker(
        "--num-workers", "2", "--base-port", "0", "--kv-events-base-port", "0",
        "--replay-base-port", "0", "--block-size", str(BLOCK_SIZE),
        "--num-gpu-blocks", "256", "--speedup-ratio", "1000", "--model-name", "sim",
        num_workers=2,
    )  # fmt: skip
    yield m
    assert stop(m.process) == 0


async def wait_healthy(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} not healthy"
            await asyncio.sleep(0.05)


@pytest.fixture
async def zmq_context() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


async def test_mocker_serves_http_and_publishes_vllm_events(
    mocker: Mocker, zmq_context: zmq.asyncio.Context
) -> None:
    worker = mocker.workers[0]
    await wait_healthy(worker["http"])
    sub = zmq_context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(worker["events"])
    await asyncio.sleep(0.3)  # PUB/SUB slow joiner: let the subscription reach the publisher

    client = openai.AsyncOpenAI(base_url=worker["http"] + "/v1", api_key="unused", max_retries=0)
    prompt = list(range(100, 100 + 3 * BLOCK_SIZE + 5))  # 3 full blocks and a partial one
    result = await client.completions.create(model="sim", prompt=prompt, max_tokens=2)
    assert result.usage is not None and result.usage.prompt_tokens == len(prompt)
    again = await client.completions.create(model="sim", prompt=prompt, max_tokens=2)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == 3 * BLOCK_SIZE
    await client.close()

    topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5.0)
    assert topic == b""
    assert len(seq) == 8 and int.from_bytes(seq, "big") == 0
    ts, events, dp_rank = msgspec.msgpack.decode(payload)
    assert isinstance(ts, float) and ts > 0
    assert dp_rank is None or dp_rank == 0
    assert len(events) == 1
    event = events[0]
    assert event[0] == "BlockStored"
    block_hashes, parent, token_ids, block_size = event[1], event[2], event[3], event[4]
    assert len(block_hashes) == 3
    assert all(isinstance(h, int) for h in block_hashes)
    assert parent is None
    assert token_ids == prompt[: 3 * BLOCK_SIZE]
    assert block_size == BLOCK_SIZE
    sub.close(linger=0)

    # Replay: everything from seq 0 on, then the end marker.
    dealer = zmq_context.socket(zmq.DEALER)
    dealer.connect(worker["replay"])
    await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    first = await asyncio.wait_for(dealer.recv_multipart(), 5.0)
    assert first[0] == b""
    assert first[-2] == seq and first[-1] == payload
    replies = [first]
    while replies[-1][-2] != END_SEQ:
        replies.append(await asyncio.wait_for(dealer.recv_multipart(), 5.0))
    assert replies[-1][-1] == b""
    dealer.close(linger=0)


async def test_workers_are_independent(mocker: Mocker) -> None:
    urls = [mocker.workers[i]["http"] for i in (0, 1)]
    assert len(set(urls)) == 2
    async with aiohttp.ClientSession() as session:
        for url in urls:
            await wait_healthy(url)
            async with session.get(url + "/v1/models") as response:
                models = await response.json()
            assert [m["id"] for m in models["data"]] == ["sim"]
            async with session.post(url + "/tokenize", json={"prompt": "abc"}) as response:
                assert (await response.json())["tokens"] == [100, 101, 102]


async def test_mocker_answers_like_a_vllm_server(mocker: Mocker) -> None:
    url = mocker.workers[0]["http"]
    await wait_healthy(url)
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/ping") as response:
            assert response.status == 200
        async with session.get(url + "/version") as response:
            assert "version" in await response.json()
        async with session.post(url + "/detokenize", json={"tokens": [100, 101]}) as response:
            assert await response.json() == {"prompt": "ab"}
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    result = await client.completions.create(
        model="sim", prompt="hello", max_tokens=2, n=2, echo=True
    )
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.text.startswith("hello") and len(c.text) == 7 for c in result.choices)
    assert result.usage is not None and result.usage.prompt_tokens == 5
    scored = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True
    )
    content = scored.choices[0].logprobs and scored.choices[0].logprobs.content
    assert content is not None and len(content) == 3
    await client.close()


async def test_processes_mode_starts_one_process_per_worker_and_stops_cleanly() -> None:
    m = start_mocker(
        "--num-workers", "2", "--base-port", "0", "--kv-events-base-port", "-1",
        "--speedup-ratio", "1000", "--processes",
        num_workers=2,
    )  # fmt: skip
    try:
        for worker in m.workers.values():
            assert worker["events"] == "-"
            await wait_healthy(worker["http"])
    finally:
        assert stop(m.process) == 0


def _taken_port_after_a_free_one() -> tuple[socket.socket, int]:
    """A listening socket on port p + 1 while p is free: a base port whose second
    worker cannot bind."""
    for _ in range(50):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        base = taken.getsockname()[1] - 1
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base))
            except OSError:
                taken.close()
                continue
        taken.listen()
        return taken, base
    raise AssertionError("no free port pair found")


def test_processes_mode_stops_every_worker_when_one_cannot_start() -> None:
    taken, base = _taken_port_after_a_free_one()
    command = [
        sys.executable, "-m", "kvrouter", "mocker", "--num-workers", "2", "--processes",
        "--base-port", str(base), "--kv-events-base-port", "-1", "--speedup-ratio", "1000",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with taken:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        try:
            output, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode != 0, output
    assert "worker 1 exited with status" in output
    assert "stopping the other workers" in output
    # Worker 0 had started on the free port; it is gone with the command.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", base)) != 0, output
