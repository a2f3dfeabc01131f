"""The gateway in front of real simulated workers (``kvrouter mocker`` processes).

Workers run as child processes speaking HTTP and ZeroMQ KV events (with replay); the
gateway runs in this process on a loopback port, so tests can look into its index and
scheduler while driving it over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest

from kvrouter.gateway import service
from kvrouter.gateway.config import GatewayConfig, WorkerSpec
from kvrouter.gateway.server import GatewayServer
from kvrouter.hashing import compute_block_hashes
from kvrouter.routing import KvScheduler, ScheduleRequest
from kvrouter.tokenizer import ByteTokenizer, media_marker

pytestmark = pytest.mark.integration

BLOCK = 16
_LINE = re.compile(r"worker (\d+): http (\S+) kv-events (\S+) replay (\S+)")


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    spec: WorkerSpec

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_pipe()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()


def start_workers(
    worker_ids: list[int],
    *,
    events: bool = True,
    speedup: float = 100.0,
    gpu_blocks: int = 4096,
    event_form: str = "array",
) -> list[Worker]:
    """Start one mocker process per id (in parallel); wait until each prints its ports."""
    procs = []
    for worker_id in worker_ids:
        command = [
            sys.executable, "-m", "kvrouter", "mocker", "--base-port", "0",
            "--kv-events-base-port", "0" if events else "-1",
            "--replay-base-port", "0" if events else "-1",
            "--worker-id-base", str(worker_id), "--block-size", str(BLOCK),
            "--num-gpu-blocks", str(gpu_blocks), "--speedup-ratio", str(speedup),
            "--kv-events-form", event_form,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs.append(
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
            )
        )
    workers = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = _LINE.search(line)
        assert match, f"mocker did not start: {line!r}"
        wid, url, kv, replay = match.groups()
        spec = WorkerSpec(
            url=url,
            kv_events=None if kv == "-" else kv,
            replay=None if replay == "-" else replay,
            worker_id=int(wid),
        )
        workers.append(Worker(proc, spec))
    return workers


@pytest.fixture(scope="module")
def fleet() -> Iterator[list[Worker]]:
    """Three event-publishing workers shared by the tests that do not harm them."""
    workers = start_workers([0, 1, 2])
    yield workers
    for w in workers:
        w.stop()


def gateway_config(workers: list[Worker], **overrides: Any) -> GatewayConfig:
    settings: dict[str, Any] = {
        "port": 0,
        "workers": tuple(w.spec for w in workers),
        "block_size": BLOCK,
        "health_check_interval_s": 0.2,
        "health_check_timeout_s": 0.5,
        "metrics_scrape_interval_s": 0.2,
        "connect_timeout_s": 1.0,
        "request_timeout_s": 20.0,
    }
    settings.update(overrides)
    return GatewayConfig(**settings)


async def eventually(check: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def complete(
    client: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int = 4, **extra: Any
) -> tuple[int, dict[str, Any]]:
    body = {"model": "kvrouter-mock", "prompt": prompt, "max_tokens": max_tokens, **extra}
    async with client.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return int(resp.headers["x-kvrouter-worker"]), await resp.json()


def prompt_hashes(text: str) -> list[int]:
    return compute_block_hashes(ByteTokenizer().encode(text), BLOCK)


async def test_same_prefix_goes_where_the_prefix_is_cached(
    fleet: list[Worker], client: aiohttp.ClientSession
) -> None:
    async with GatewayServer(gateway_config(fleet)) as gw:
        shared = "You are a careful assistant. " * 20  # 580 bytes: 36 full blocks
        first, _ = await complete(client, gw.url, shared + "Question one?")
        key = gw.gateway.registry.get(first).key  # type: ignore[union-attr]
        # The engine's BlockStored events reach the index over ZeroMQ.
        await eventually(lambda: gw.core.indexer.stats().events_applied > 0)
        scores = gw.core.indexer.find_matches(prompt_hashes(shared)).scores
        assert scores[key] == len(prompt_hashes(shared))
        chosen = []
        for i in range(4):
            worker, body = await complete(client, gw.url, shared + f"Another question {i}?")
            chosen.append(worker)
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 36 * BLOCK
        assert chosen == [first] * 4
        decisions = gw.gateway.counters.recent_decisions(4)
        assert all(d.overlap_blocks >= 36 for d in decisions)


async def test_a_block_size_mismatch_is_shown_per_worker(
    fleet: list[Worker], client: aiohttp.ClientSession
) -> None:
    # A router configured with another block size than its workers can use none of
    # their events: the worker list says so, not only a log line and a counter.
    async with GatewayServer(gateway_config(fleet, block_size=2 * BLOCK)) as gw:
        worker, _ = await complete(client, gw.url, "A prompt of several blocks. " * 8)
        errors = gw.gateway.event_stream_errors
        await eventually(lambda: errors().get(worker, (0, None))[0] > 0)
        async with client.get(gw.url + "/admin/workers") as resp:
            listed = {w["worker_id"]: w for w in (await resp.json())["workers"]}
    entry = listed[worker]
    assert entry["event_errors"] >= 1
    assert f"block_size {BLOCK}" in entry["last_event_error"]
    assert f"block_size {2 * BLOCK}" in entry["last_event_error"]


@pytest.mark.parametrize("event_form", ["map", "map-batch"])
async def test_every_vllm_event_form_feeds_the_index(
    event_form: str, client: aiohttp.ClientSession
) -> None:
    # Workers that encode their KV events as newer vLLM releases do: map events in an
    # array batch, and (the newest) the batch itself a map.
    workers = start_workers([5, 6], event_form=event_form)
    try:
        async with GatewayServer(gateway_config(workers)) as gw:
            shared = "Map-encoded events carry the same blocks. " * 12
            first, _ = await complete(client, gw.url, shared + "First?")
            key = gw.gateway.registry.get(first).key  # type: ignore[union-attr]
            await eventually(lambda: gw.core.indexer.stats().events_applied > 0)
            scores = gw.core.indexer.find_matches(prompt_hashes(shared)).scores
            assert scores[key] == len(prompt_hashes(shared))
            worker, body = await complete(client, gw.url, shared + "Second?")
            assert worker == first
            cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= len(prompt_hashes(shared)) * BLOCK
            feeds = gw.feeds.stats()
            assert (feeds.num_decode_errors, feeds.num_skipped_events) == (0, 0)
            assert feeds.num_events > 0
    finally:
        for w in workers:
            w.stop()


async def test_a_cache_salted_prefix_is_found_again(
    fleet: list[Worker], client: aiohttp.ClientSession
) -> None:
    # vLLM announces a request's cache_salt among the first block's extra keys; the
    # router hashes the salted prompt the same way, so a tenant's prefix is routed to.
    async with GatewayServer(gateway_config(fleet)) as gw:
        shared = "Salted tenant prompt, kept apart. " * 17  # 578 bytes: 36 full blocks
        first, _ = await complete(client, gw.url, shared + "One?", cache_salt="tenant-s")
        key = gw.gateway.registry.get(first).key  # type: ignore[union-attr]
        tokens = ByteTokenizer().encode(shared)
        salted = compute_block_hashes(tokens, BLOCK, cache_salt="tenant-s")
        await eventually(lambda: gw.core.indexer.find_matches(salted).scores.get(key, 0) == 36)
        assert not gw.core.indexer.find_matches(prompt_hashes(shared)).scores  # unsalted: no
        for i in range(3):
            worker, body = await complete(client, gw.url, shared + f"Q{i}?", cache_salt="tenant-s")
            assert worker == first
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 36 * BLOCK
        assert all(d.overlap_blocks >= 36 for d in gw.gateway.counters.recent_decisions(3))
        # Another tenant's identical prompt shares nothing with it.
        _, body = await complete(client, gw.url, shared + "Q0?", cache_salt="tenant-t")
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert gw.gateway.counters.recent_decisions(1)[0].overlap_blocks == 0


async def test_distinct_prompts_are_balanced_under_load(
    fleet: list[Worker], client: aiohttp.ClientSession
) -> None:
    async with GatewayServer(gateway_config(fleet)) as gw:
        prompts = [f"{i:03d} distinct topic " * 30 for i in range(12)]
        results = await asyncio.gather(
            *(complete(client, gw.url, p, max_tokens=40) for p in prompts)
        )
        per_worker = Counter(worker for worker, _ in results)
        assert set(per_worker) == {0, 1, 2}
        assert max(per_worker.values()) - min(per_worker.values()) <= 2, per_worker
        assert gw.core.scheduler.stats().active.num_requests == 0


async def test_streaming_through_the_openai_client(fleet: list[Worker]) -> None:
    async with GatewayServer(gateway_config(fleet)) as gw:
        api = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        try:
            stream = await api.completions.create(
                model="kvrouter-mock",
                prompt="Stream me something. " * 5,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            assert sum(1 for c in chunks if c.choices) == 8
            assert chunks[-1].usage is not None
            assert chunks[-1].usage.completion_tokens == 8
            chat = await api.chat.completions.create(
                model="kvrouter-mock",
                messages=[{"role": "user", "content": "Hello there, how are you?"}],
                max_tokens=5,
                stream=True,
                # Pinned, as the synthetic tokens follow the request id: with some ids
                # a byte is held back and its chunk's text is empty.
                extra_headers={"x-request-id": "chat-stream"},
            )
            deltas = [c.choices[0].delta.content async for c in chat if c.choices]
            assert len([d for d in deltas if d]) == 5
            models = await api.models.list()
            assert [m.id for m in models.data] == ["kvrouter-mock"]
        finally:
            await api.close()
        sched = gw.core.scheduler.stats()
        assert (sched.num_decisions, sched.active.num_requests) == (2, 0)


async def test_a_responses_conversation_stays_on_the_worker_that_stores_it(
    fleet: list[Worker],
) -> None:
    # Round robin would send every turn elsewhere, where the stored response is unknown.
    async with GatewayServer(gateway_config(fleet, router_mode="round_robin")) as gw:
        api = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        try:
            instructions = "You are a patient assistant. " * 4
            turn = await api.responses.create(
                model="kvrouter-mock", instructions=instructions, input="Hello, who are you?"
            )
            first_tokens = turn.usage.input_tokens if turn.usage else 0
            for i in range(3):
                if i == 1:  # one turn streamed: the id comes from its first event
                    stream = await api.responses.create(
                        model="kvrouter-mock",
                        instructions=instructions,
                        input=f"Tell me more ({i}).",
                        previous_response_id=turn.id,
                        stream=True,
                    )
                    events = [e async for e in stream]
                    assert events[-1].type == "response.completed"
                    turn = events[-1].response  # type: ignore[union-attr]
                else:
                    turn = await api.responses.create(
                        model="kvrouter-mock",
                        instructions=instructions,
                        input=f"Tell me more ({i}).",
                        previous_response_id=turn.id,
                    )
                assert turn.usage is not None
                # The conversation so far is cached where it was stored.
                assert turn.usage.input_tokens_details.cached_tokens >= first_tokens - BLOCK
            assert (await api.responses.retrieve(turn.id)).id == turn.id
        finally:
            await api.close()
        sched = gw.core.scheduler.stats()
        assert sched.num_decisions == 4
        assert sorted(sched.decisions_by_worker.values()) == [4]  # one worker, every turn
        assert sched.active.num_requests == 0


async def test_a_batch_prompt_sends_each_prompt_to_the_worker_that_caches_it(
    fleet: list[Worker], client: aiohttp.ClientSession
) -> None:
    async with GatewayServer(gateway_config(fleet)) as gw:
        prefixes = [f"Batch prefix {name}, cached on one worker. " * 14 for name in "AB"]
        homes = []
        for prefix, pin in zip(prefixes, (1, 2), strict=True):
            url = gw.url + "/v1/completions"
            body = {"prompt": prefix + "warm up", "max_tokens": 2}
            async with client.post(url, json=body, headers={"x-kvrouter-worker": str(pin)}) as r:
                assert r.status == 200
            key = gw.gateway.registry.get(pin).key  # type: ignore[union-attr]
            hashes = prompt_hashes(prefix)
            await eventually(
                lambda h=hashes, k=key: gw.core.indexer.find_matches(h).scores.get(k) == len(h)
            )
            homes.append(pin)
        batch = [prefixes[1] + "second?", prefixes[0] + "first?", "no shared prefix at all"]
        body = {"model": "kvrouter-mock", "prompt": batch, "max_tokens": 3, "n": 1}
        async with client.post(gw.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            workers = [int(w) for w in resp.headers["x-kvrouter-worker"].split(",")]
            answer = await resp.json()
        assert workers[:2] == [homes[1], homes[0]]
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
        assert all(c["finish_reason"] == "length" for c in answer["choices"])
        usage = answer["usage"]
        assert usage["prompt_tokens"] == sum(len(p.encode()) for p in batch)
        assert usage["completion_tokens"] == 9
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert cached >= sum(len(prompt_hashes(p)) for p in prefixes) * BLOCK
        assert gw.gateway.counters.stats().num_batch_prompts == 3
        assert gw.core.scheduler.stats().active.num_requests == 0


async def test_a_streamed_batch_is_one_merged_stream(fleet: list[Worker]) -> None:
    async with GatewayServer(gateway_config(fleet)) as gw:
        api = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        prompts = [f"Streamed batch prompt number {i}. " * 4 for i in range(3)]
        try:
            stream = await api.completions.create(
                model="kvrouter-mock",
                prompt=prompts,
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
                # Pinned: the synthetic tokens follow the request id, and some ids give
                # a byte the streamed text holds back until the next one.
                extra_headers={"x-request-id": "merged-batch"},
            )
            chunks = [chunk async for chunk in stream]
        finally:
            await api.close()
        ids = {c.id for c in chunks}
        assert len(ids) == 1
        per_choice = Counter(ch.index for c in chunks for ch in c.choices if ch.text)
        assert per_choice == {0: 5, 1: 5, 2: 5}
        finished = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
        assert sorted(finished) == [0, 1, 2]
        usage_chunks = [c for c in chunks if c.usage is not None]
        assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
        assert usage_chunks[0].usage.completion_tokens == 15  # type: ignore[union-attr]
        assert usage_chunks[0].usage.prompt_tokens == sum(len(p) for p in prompts)  # type: ignore[union-attr]
        sched = gw.core.scheduler.stats()
        assert (sched.num_decisions, sched.num_finished, sched.active.num_requests) == (3, 3, 0)


async def test_failover_when_a_worker_dies(client: aiohttp.ClientSession) -> None:
    workers = start_workers([10, 11])
    try:
        async with GatewayServer(gateway_config(workers)) as gw:
            text = "Failover keeps serving. " * 20
            victim_id, _ = await complete(client, gw.url, text)
            victim = next(w for w in workers if w.spec.worker_id == victim_id)
            key = gw.gateway.registry.get(victim_id).key  # type: ignore[union-attr]
            await eventually(lambda: gw.core.indexer.tree_size(key) >= len(prompt_hashes(text)))
            victim.kill()
            # Requests keep succeeding (retried before their first byte if they hit it).
            for i in range(4):
                worker, _ = await complete(client, gw.url, text + str(i))
                assert worker != victim_id
            await eventually(lambda: not gw.gateway.registry.get(victim_id).healthy)  # type: ignore[union-attr]
            assert gw.core.indexer.tree_size(key) == 0
            assert key not in gw.core.scheduler.workers
            assert gw.core.scheduler.stats().active.num_requests == 0
    finally:
        for w in workers:
            w.stop()


async def test_a_worker_back_in_rotation_has_its_cache_indexed_again(
    client: aiohttp.ClientSession,
) -> None:
    workers = start_workers([15])
    try:
        async with GatewayServer(gateway_config(workers)) as gw:
            text = "Out of rotation and back. " * 10
            await complete(client, gw.url, text)
            index = gw.core.indexer
            blocks = len(prompt_hashes(text))
            await eventually(lambda: index.stats().num_entries >= blocks)
            # A dropped connection takes the worker out and its blocks leave the index,
            # though the worker is alive and keeps its cache.
            gw.gateway.registry.mark_failed(15, "connection dropped")
            assert index.stats().num_entries == 0
            await eventually(lambda: gw.gateway.registry.get(15).healthy)  # type: ignore[union-attr]
            # Back in rotation, the index learns the cache the worker kept (a replay)...
            await eventually(lambda: index.stats().num_entries >= blocks, timeout_s=15.0)
            # ...so events that build on it are applied, not rejected.
            longer = text + "And a follow-up question that continues it. " * 4
            await complete(client, gw.url, longer)
            longer_blocks = len(prompt_hashes(longer))
            await eventually(lambda: index.stats().num_entries >= longer_blocks, timeout_s=15.0)
            assert index.stats().rejected["unknown_parent"] == 0
            assert gw.core.scheduler.stats().active.num_requests == 0
    finally:
        for w in workers:
            w.stop()


async def test_busy_workers_answer_503_and_disconnects_free_their_load(
    client: aiohttp.ClientSession,
) -> None:
    (worker,) = start_workers([20], speedup=1.0, gpu_blocks=64)
    try:
        cfg = gateway_config([worker], busy_kv_usage=0.3, metrics_scrape_interval_s=30.0)
        async with GatewayServer(cfg) as gw:
            state = gw.gateway.registry.in_rotation()[0]
            assert await gw.gateway.scrape_metrics(state)  # learns the 64-block cache size
            body = {"prompt": "Hold the cache. " * 30, "max_tokens": 400, "stream": True}
            held = await client.post(gw.url + "/v1/completions", json=body)
            assert held.status == 200
            await held.content.readline()  # first byte: it is running
            assert gw.core.scheduler.stats().active.num_requests == 1
            async with client.post(gw.url + "/v1/completions", json={"prompt": "more"}) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert (await resp.json())["error"]["type"] == "service_unavailable"
            held.close()  # the client goes away: the booking must be freed
            await eventually(lambda: gw.core.scheduler.stats().active.num_requests == 0)
            assert gw.gateway.counters.num_in_flight == 0
            _, answer = await complete(client, gw.url, "now there is room")
            assert answer["usage"]["completion_tokens"] == 4
    finally:
        worker.stop()


async def test_workers_without_events_are_routed_by_predicted_entries(
    client: aiohttp.ClientSession,
) -> None:
    workers = start_workers([30, 31], events=False)
    try:
        async with AsyncExitStack() as stack:
            gw = await stack.enter_async_context(GatewayServer(gateway_config(workers)))
            infos = gw.gateway.registry.infos()
            assert [i.mode for i in infos] == ["approximate", "approximate"]
            shared = "Approximate mode shares this prefix. " * 10
            first, _ = await complete(client, gw.url, shared + "a")
            for suffix in ("b", "c", "d"):
                worker, _ = await complete(client, gw.url, shared + suffix)
                assert worker == first
            index = gw.core.indexer.stats()
            assert index.events_applied == 0
            assert index.num_predicted >= len(prompt_hashes(shared))
    finally:
        for w in workers:
            w.stop()


async def test_worker_tokenizer_mode_asks_the_worker(
    fleet: list[Worker], client: aiohttp.ClientSession
) -> None:
    async with GatewayServer(gateway_config(fleet, tokenizer="worker")) as gw:
        assert gw.gateway.tokenizer is None
        messages = [{"role": "user", "content": "Tokenized by the worker, not the router. " * 3}]
        body = {"model": "kvrouter-mock", "messages": messages, "max_tokens": 2}
        async with client.post(gw.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            usage = (await resp.json())["usage"]
        tok = ByteTokenizer()
        expected = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        assert usage["prompt_tokens"] == len(expected)
        (first,) = gw.gateway.counters.recent_decisions(1)
        assert first.request_blocks == len(expected) // BLOCK
        # An image goes to the worker's tokenizer as a marker: routed on the text before
        # it. (This simulated model takes text only: its own 400 reaches the client.)
        image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        text = {"type": "text", "text": "What is in this picture? " * 3}
        body["messages"] = [{"role": "user", "content": [text, image]}]
        async with client.post(gw.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 400
            assert "non-text part" in (await resp.json())["error"]["message"]
        (decision,) = gw.gateway.counters.recent_decisions(1)
        assert decision.request_id != first.request_id  # routed, then refused
        marked = [{"role": "user", "content": text["text"] + media_marker(image)}]
        routed = tok.encode(tok.apply_chat_template(marked), add_special_tokens=False)
        assert decision.request_blocks == len(routed) // BLOCK


async def test_router_queue_holds_requests_until_a_worker_has_room(
    fleet: list[Worker], client: aiohttp.ClientSession
) -> None:
    # A threshold of 8 prompt tokens: each worker prefills one request at a time, the
    # rest wait at the router and go as first tokens come back.
    cfg = gateway_config(fleet, router_queue_threshold=1.0, max_num_batched_tokens=8)
    async with GatewayServer(cfg) as gw:
        prompts = [f"{i:03d} queued topic " * 20 for i in range(12)]
        results = await asyncio.gather(
            *(complete(client, gw.url, p, max_tokens=8) for p in prompts)
        )
        assert all(body["usage"]["completion_tokens"] == 8 for _, body in results)
        stats = gw.core.queue_stats()
        assert stats is not None
        assert stats.num_queued > 0 and stats.num_dispatched == 12 and stats.pending == 0
        assert gw.core.scheduler.stats().active.num_requests == 0
        async with client.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert "kvrouter_router_queue_pending 0.0" in text
        assert f"kvrouter_router_queue_queued_total {stats.num_queued}.0" in text


async def test_router_queue_waits_end_cleanly(
    fleet: list[Worker], client: aiohttp.ClientSession
) -> None:
    cfg = gateway_config(
        fleet, router_queue_threshold=1.0, max_num_batched_tokens=8, request_timeout_s=1.0
    )
    async with GatewayServer(cfg) as gw:
        # Bookings that never see a first token keep every worker saturated (until they
        # expire, after twice the request timeout: they are booked again below).
        sched = gw.core.scheduler
        _hold_every_worker(sched)
        body = {"model": "kvrouter-mock", "prompt": "Waiting in line. " * 4, "max_tokens": 2}
        # A client that gives up while queued takes its request out of the queue.
        leaving = asyncio.ensure_future(client.post(gw.url + "/v1/completions", json=body))
        await eventually(lambda: gw.core.queue_stats().pending == 1)  # type: ignore[union-attr]
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await eventually(lambda: gw.core.queue_stats().pending == 0)  # type: ignore[union-attr]
        assert gw.core.queue_stats().num_cancelled == 1  # type: ignore[union-attr]
        # A wait past request_timeout_s is a 503 with a reason.
        for worker in sched.workers:
            gw.core.on_finish(f"hold-{worker.worker_id}")
        _hold_every_worker(sched, token=2)
        async with client.post(gw.url + "/v1/completions", json=body) as resp:
            assert resp.status == 503
            assert "router queue" in (await resp.json())["error"]["message"]
        # Room again: a queued request goes and completes; nothing is left booked.
        waiting = asyncio.ensure_future(complete(client, gw.url, body["prompt"], max_tokens=2))
        await eventually(lambda: gw.core.queue_stats().pending == 1)  # type: ignore[union-attr]
        gw.core.on_finish("hold-0")
        _, answer = await waiting
        assert answer["usage"]["completion_tokens"] == 2
        for worker in (1, 2):
            gw.core.on_finish(f"hold-{worker}")
        assert sched.stats().active.num_requests == 0
        assert gw.core.queue_stats().pending == 0  # type: ignore[union-attr]


def _hold_every_worker(sched: KvScheduler, token: int = 1) -> None:
    # A fresh prompt each time: one the worker is predicted to hold costs no prefill.
    for worker in sched.workers:
        sched.schedule(ScheduleRequest(f"hold-{worker.worker_id}", token_ids=[token] * 64,
                                       worker=worker))  # fmt: skip


async def test_router_queue_routes_past_bookings_that_expire(
    fleet: list[Worker], client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lost bookings (no first token, no finish) expire after twice the request timeout;
    # no event announces it, so the gateway's queue loop looks for the freed room.
    monkeypatch.setattr(service, "QUEUE_POLL_INTERVAL_S", 0.05)
    cfg = gateway_config(
        fleet, router_queue_threshold=1.0, max_num_batched_tokens=8, request_timeout_s=2.0
    )
    async with GatewayServer(cfg) as gw:
        sched = gw.core.scheduler
        _hold_every_worker(sched)  # they expire 4 s from now
        await asyncio.sleep(3.0)
        waiting = asyncio.ensure_future(complete(client, gw.url, "Behind lost ones. " * 4))
        await eventually(lambda: gw.core.queue_stats().pending == 1)  # type: ignore[union-attr]
        _, answer = await waiting  # routed within about a second, under its 2 s limit
        assert answer["usage"]["completion_tokens"] > 0
        assert sched.stats().active.num_requests == 0  # the holds are gone
