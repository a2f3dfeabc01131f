"""The gateway's proxy mechanics against scripted backends on real loopback ports.

Each backend is a small aiohttp server whose behaviour a test sets (answer, refuse,
503, break a stream, stream slowly), so retries, mid-stream failures, admission and
disconnect cleanup are shown exactly. The gateway is the real one (real routing core).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvrouter.gateway.config import GatewayConfig, WorkerSpec
from kvrouter.gateway.overrides import RoutingOverrides
from kvrouter.gateway.prompts import parse_body, prepare_prompt
from kvrouter.gateway.server import GatewayServer
from kvrouter.gateway.top import fetch_dashboard_data
from kvrouter.hashing import hash_request, make_salt
from kvrouter.routing import ScheduleRequest
from kvrouter.tokenizer import ByteTokenizer
from tests.integration.apps import serve_app

pytestmark = pytest.mark.integration

CHUNK = b'data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}\n\n'
SLOW_START_S = 1.0


@dataclass
class Backend:
    """A scripted worker: ``mode`` is ok | drop | status503 | html | break | slow | steady |
    burst | hang | stall (slow: 200 chunks 20 ms apart; steady: 25; burst: 400 at once;
    stall: one chunk, then nothing)."""

    mode: str = "ok"
    kv_usage: float = 0.0
    healthy: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)  # on every route
    dp_ranks: list[str | None] = field(default_factory=list)  # X-data-parallel-rank
    tokenized: list[dict[str, Any]] = field(default_factory=list)  # /tokenize bodies
    lora_models: tuple[str, ...] = ()  # listed in /v1/models with "m" as their parent
    metrics_text: str | None = None  # the /metrics page, if not the default one
    models_status: int = 200
    paths: list[str] = field(default_factory=list)
    disconnects: int = 0
    url: str = ""

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.paths.append(request.path)
        self.request_ids.append(request.headers.get("x-request-id"))
        self.authorizations.append(request.headers.get("Authorization"))
        self.dp_ranks.append(request.headers.get("X-data-parallel-rank"))
        if self.mode == "drop":  # healthy, but drops every request before answering
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if self.mode == "status503":
            return web.json_response({"error": {"message": "busy"}}, status=503)
        if self.mode == "html":  # a 200 that is neither JSON nor an event stream
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        if body.get("prompt") == "refuse me":  # a worker's own 4xx, for this prompt only
            return web.json_response({"error": {"message": "refused", "code": 400}}, status=400)
        if self.mode == "hang":  # accepts, then says nothing until the gateway gives up
            await asyncio.sleep(30)
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "ok"}], "worker": self.url})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if body.get("prompt") == "slow start":  # accepted at once, a long prefill
            await asyncio.sleep(SLOW_START_S)
        if body.get("prompt") == "fail late":  # accepted, then gone before any token
            await asyncio.sleep(0.3)
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(CHUNK)
        if self.mode == "stall":  # a stuck engine: the connection stays open, silent
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.disconnects += 1
                raise
        if self.mode == "break":
            assert request.transport is not None
            request.transport.close()
            return response
        try:
            count = {"slow": 200, "steady": 25, "burst": 400}.get(self.mode, 2)
            for _ in range(count):
                await asyncio.sleep(0.02 if self.mode in ("slow", "steady") else 0)
                await response.write(CHUNK)
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        return response

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.paths.append(request.path)
        self.tokenized.append(body)
        if self.mode == "status503":
            return web.json_response({"error": {"message": "busy"}}, status=503)
        return web.json_response({"tokens": [1, 2, 3], "echo": body, "worker": self.url})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok", status=200 if self.healthy else 500)

    async def metrics(self, request: web.Request) -> web.Response:
        if self.metrics_text is not None:
            return web.Response(text=self.metrics_text)
        return web.Response(
            text=f"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
            f"vllm:kv_cache_usage_perc {self.kv_usage}\n"
        )

    async def models(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        if self.models_status != 200:
            return web.json_response({"error": {"message": "busy"}}, status=self.models_status)
        cards = [{"id": "m", "object": "model", "parent": None}]
        cards += [{"id": name, "object": "model", "parent": "m"} for name in self.lora_models]
        return web.json_response({"object": "list", "data": cards})


async def start_backend(stack: AsyncExitStack, backend: Backend) -> Backend:
    app = web.Application()
    app.router.add_post("/v1/completions", backend.generate)
    app.router.add_post("/v1/chat/completions", backend.generate)
    app.router.add_post("/v1/embeddings", backend.generate)
    app.router.add_post("/tokenize", backend.tokenize)
    app.router.add_post("/detokenize", backend.tokenize)
    app.router.add_get("/health", backend.health)
    app.router.add_get("/metrics", backend.metrics)
    app.router.add_get("/v1/models", backend.models)
    backend.url = await serve_app(
        stack, app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1
    )
    return backend


def assert_two_prompts_merged(text: str, gw: GatewayServer) -> None:
    """A merged stream of two prompts: each one's three events, one ``[DONE]`` at the
    end, and both bookings finished."""
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    indexes = Counter(json.loads(e)["choices"][0]["index"] for e in events[:-1])
    assert indexes == {0: 3, 1: 3}
    sched = gw.core.scheduler.stats()
    assert (sched.num_first_tokens, sched.num_finished, sched.active.num_requests) == (2, 2, 0)


def parse_prompt_hashes(gw: GatewayServer, prompt: str) -> list[int]:
    """The sequence hashes the gateway computes for a completion ``prompt``."""
    prepared = prepare_prompt(
        ByteTokenizer(),
        {"prompt": prompt},
        "completion",
        block_size=gw.core.block_size,
        max_prompt_tokens=10**6,
    )
    return prepared.sequence_hashes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def config(urls: list[str], **overrides: Any) -> GatewayConfig:
    settings: dict[str, Any] = {
        "port": 0,
        "workers": tuple(WorkerSpec(u) for u in urls),
        "block_size": 4,
        "health_check_interval_s": 30.0,
        "metrics_scrape_interval_s": 30.0,
        "connect_timeout_s": 1.0,
        "request_timeout_s": 10.0,
    }
    settings.update(overrides)
    return GatewayConfig(**settings)


async def test_a_model_that_is_a_lora_adapter_is_hashed_with_its_salt(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    # vLLM picks an adapter by `model` and lists it in /v1/models with its base model as
    # `parent`; it salts the adapter's blocks with its name, so the router must too.
    backend = await start_backend(stack, Backend(lora_models=("sql-lora",)))
    gw = await stack.enter_async_context(GatewayServer(config([backend.url])))
    for _ in range(100):  # read at the worker's first health check
        if gw.gateway.lora_models:
            break
        await asyncio.sleep(0.01)
    assert gw.gateway.lora_models == frozenset({"sql-lora"})
    backend.models_status = 503  # a busy moment forgets no adapter
    assert (await gw.gateway.list_models())["data"] == []
    assert gw.gateway.lora_models == frozenset({"sql-lora"})
    prompt = "abcdefghijklmnop"
    tokens = ByteTokenizer().encode(prompt)
    lora = hash_request(tokens, 4, salt=make_salt(lora_name="sql-lora"))[1]
    base = hash_request(tokens, 4)[1]
    assert lora != base
    prepared = [
        await gw.gateway.prepare(parse_body(json.dumps(b).encode(), "completion"), "completion")
        for b in ({"model": "sql-lora", "prompt": prompt}, {"model": "m", "prompt": prompt})
    ]
    assert [list(p.sequence_hashes) for p in prepared] == [lora, base]


async def test_ranks_of_one_server_are_named_in_each_request(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    # One server of two data-parallel ranks, and one of a single rank: requests to the
    # first name the chosen rank (or the server would pick one itself); to the second
    # they name none.
    # Both servers run two engines; the first is registered per rank, the second whole.
    page = (
        'vllm:num_requests_running{engine="0"} 3\nvllm:num_requests_running{engine="1"} 5\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.2\nvllm:kv_cache_usage_perc{engine="1"} 0.8\n'
    )
    shared = await start_backend(stack, Backend(metrics_text=page))
    single = await start_backend(stack, Backend(metrics_text=page))
    workers = (
        WorkerSpec(shared.url, dp_rank=0),
        WorkerSpec(shared.url, dp_rank=1),
        WorkerSpec(single.url),
    )
    gw = await stack.enter_async_context(
        GatewayServer(
            config([], workers=workers, router_mode="round_robin", metrics_scrape_interval_s=0.05)
        )
    )
    loads: dict[tuple[int, int], tuple[int, float]] = {}
    for _ in range(100):
        loads = {
            (e.worker_id, e.dp_rank): (e.request_active_slots, e.gpu_cache_usage_perc)
            for e in gw.core.aggregator.get_metrics().endpoints
        }
        if len(loads) == 3:
            break
        await asyncio.sleep(0.02)
    # Each rank reads its own engine's series; the server registered once, all of them.
    assert loads == {(0, 0): (3, 0.2), (1, 1): (5, 0.8), (2, 0): (8, 0.5)}
    for prompt in ("abcdefgh", "ijklmnop", "qrstuvwx", ["abcdefgh", "ijklmnop"]):
        for stream in (False, True):
            body = {"prompt": prompt, "stream": stream}
            async with client.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
    # 10 requests to the workers (a batch is one per prompt), in turn: 4, 3 and 3.
    assert Counter(shared.dp_ranks) == {"0": 4, "1": 3}
    assert single.dp_ranks == [None] * 3


async def test_failure_before_first_byte_is_retried_on_another_worker(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    dropping = await start_backend(stack, Backend(mode="drop"))
    good = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(config([dropping.url, good.url], router_mode="round_robin"))
    )
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-kvrouter-worker"] == "1"
        assert (await resp.json())["worker"] == good.url
    stats = gw.gateway.counters.stats()
    assert stats.num_retries == 1
    assert stats.num_upstream_errors == {"connect": 1}
    infos = {i.worker_id: i for i in gw.gateway.registry.infos()}
    assert not infos[0].healthy
    assert infos[1].healthy
    assert gw.core.scheduler.workers == (gw.core.scheduler.workers[0],)
    assert gw.core.scheduler.stats().active.num_requests == 0


async def test_every_worker_failing_is_a_502(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    busy = await start_backend(stack, Backend(mode="status503"))
    gw = await stack.enter_async_context(
        GatewayServer(config([busy.url, dead_url()], max_retries=1))
    )
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["type"] == "upstream_error"
    assert "ConnectionKey" not in body["error"]["message"]  # a reason, not an object's repr
    assert len(busy.requests) == 1
    # The unreachable one is out of rotation; the one that answered 503 is not.
    assert [w.worker_id for w in gw.gateway.registry.in_rotation()] == [0]
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as resp:
        assert resp.status == 502
    assert len(busy.requests) == 2
    assert gw.core.scheduler.stats().active.num_requests == 0


async def test_a_worker_answering_5xx_is_skipped_for_the_retry_but_stays_in_rotation(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    busy = await start_backend(stack, Backend(mode="status503"))
    good = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(config([busy.url, good.url], router_mode="round_robin"))
    )
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-kvrouter-worker"] == "1"
    assert len(busy.requests) == 1
    stats = gw.gateway.counters.stats()
    assert (stats.num_retries, stats.num_upstream_errors) == (1, {"status": 1})
    infos = {i.worker_id: i for i in gw.gateway.registry.infos()}
    assert (infos[0].healthy, infos[0].num_failures) == (True, 1)
    assert "answered 503" in (infos[0].last_error or "")
    assert [k.worker_id for k in gw.core.scheduler.workers] == [0, 1]
    assert gw.core.scheduler.stats().active.num_requests == 0
    # What was predicted for the refused attempt is withdrawn; the answered one stays.
    assert gw.core.indexer.stats().predicted_withdrawn == 2  # "abcdefgh": 2 blocks of 4
    seq = parse_prompt_hashes(gw, "abcdefgh")
    assert {k.worker_id for k in gw.core.indexer.find_matches_sequence(seq).scores} == {1}
    async with client.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    assert 'kvrouter_index_predictions_total{outcome="withdrawn"} 2.0' in text
    assert 'kvrouter_index_predictions_total{outcome="added"} 4.0' in text
    assert "kvrouter_index_predicted_entries 2.0" in text
    # Still a candidate for the next request: round robin comes back to it.
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as resp:
        assert resp.status == 200
    assert len(busy.requests) == 2


async def test_a_200_answer_that_is_not_json_or_an_event_stream_is_retried(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    broken = await start_backend(stack, Backend(mode="html"))
    good = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(config([broken.url, good.url], router_mode="round_robin"))
    )
    url = gw.url + "/v1/completions"
    # Pinned, there is no other worker: a clear 502 instead of a 200 nobody can parse.
    for stream, wanted in ((False, "not JSON"), (True, "not an event stream")):
        body = {"prompt": "abcdefgh", "stream": stream}
        async with client.post(url, json=body, headers={"x-kvrouter-worker": "0"}) as resp:
            assert resp.status == 502
            message = (await resp.json())["error"]["message"]
        assert message.endswith(f"answered 200 with text/html, {wanted}")
    # It answered, so it is alive: it stays in rotation.
    assert len(gw.gateway.registry.in_rotation()) == 2
    bodies: list[dict[str, Any]] = [
        {"prompt": "abcdefgh"},
        {"prompt": "abcdefgh", "stream": True},
        {"prompt": ["abcdefgh", "ijklmnop"]},
        {"prompt": ["abcdefgh", "ijklmnop"], "stream": True},
    ]
    for body in bodies:
        async with client.post(url, json=body) as resp:
            assert resp.status == 200
            assert set(resp.headers["x-kvrouter-worker"].split(",")) == {"1"}
            text = await resp.text()
        assert "maintenance" not in text
    assert len(broken.requests) >= 3  # round robin sent it some first; all were retried
    assert gw.core.scheduler.stats().active.num_requests == 0
    assert gw.gateway.counters.num_in_flight == 0


async def test_a_worker_failing_every_request_leaves_the_rotation(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    failing = await start_backend(stack, Backend(mode="status503"))
    good = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(config([failing.url, good.url], router_mode="round_robin"))
    )
    state = gw.gateway.registry.get(0)
    assert state is not None
    for i in range(50):  # its health check passes, but it fails whatever it is sent
        body = {"prompt": f"prompt {i}"}
        async with client.post(gw.url + "/v1/completions", json=body) as r:
            assert r.status == 200
        if not state.healthy:
            break
    assert not state.healthy
    assert len(failing.requests) == state.consecutive_errors == 5  # five in a row
    assert "answered 503" in (state.last_error or "")
    assert gw.core.scheduler.workers == (gw.gateway.registry.get(1).key,)  # type: ignore[union-attr]
    assert gw.core.indexer.tree_size(state.key) == 0
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as r:
        assert r.status == 200
    assert len(failing.requests) == 5
    assert gw.core.scheduler.stats().active.num_requests == 0


async def test_a_timeout_before_the_first_byte_is_retried_once(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    slow = [await start_backend(stack, Backend(mode="hang")) for _ in range(3)]
    gw = await stack.enter_async_context(
        GatewayServer(config([b.url for b in slow], max_retries=2, request_timeout_s=0.3))
    )
    # Three slow workers and two retries allowed, but only one retry is spent on
    # timeouts: two attempts, then 504.
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == 504
    assert sorted(len(b.requests) for b in slow) == [0, 1, 1]
    stats = gw.gateway.counters.stats()
    assert (stats.num_retries, stats.num_upstream_errors) == (1, {"timeout": 2})
    # Slow is not dead: every worker stays in rotation, and nothing stays booked.
    assert len(gw.gateway.registry.in_rotation()) == 3
    assert gw.core.scheduler.stats().active.num_requests == 0


async def test_a_timeout_is_retried_on_a_worker_that_answers(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    slow = await start_backend(stack, Backend(mode="hang"))
    good = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(
            config([slow.url, good.url], router_mode="round_robin", request_timeout_s=0.3)
        )
    )
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-kvrouter-worker"] == "1"
    assert (len(slow.requests), len(good.requests)) == (1, 1)
    assert gw.gateway.counters.stats().num_retries == 1


async def test_a_worker_whose_answers_keep_timing_out_leaves_the_rotation(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    # A stalled engine: its health check passes, it accepts every request, answers none.
    stalled = await start_backend(stack, Backend(mode="hang"))
    good = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(
            config([stalled.url, good.url], router_mode="round_robin", request_timeout_s=0.2)
        )
    )
    state = gw.gateway.registry.get(0)
    assert state is not None
    for i in range(30):
        async with client.post(gw.url + "/v1/completions", json={"prompt": f"p {i}"}) as r:
            assert r.status == 200  # each timeout was retried on the good worker
            assert r.headers["x-kvrouter-worker"] == "1"
        if not state.healthy:
            break
    assert not state.healthy
    assert len(stalled.requests) == state.consecutive_errors == 5  # five in a row
    assert "did not answer in time" in (state.last_error or "")
    # Out of rotation: the next requests go straight to the good worker.
    for i in range(4):
        async with client.post(gw.url + "/v1/completions", json={"prompt": f"q {i}"}) as r:
            assert r.status == 200
    assert len(stalled.requests) == 5
    assert gw.gateway.counters.stats().num_upstream_errors == {"timeout": 5}
    assert gw.core.scheduler.stats().active.num_requests == 0


async def test_failure_after_first_byte_ends_the_stream_with_an_error_event(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    breaking = await start_backend(stack, Backend(mode="break"))
    gw = await stack.enter_async_context(GatewayServer(config([breaking.url])))
    body = {"prompt": "abcdefgh", "stream": True}
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[0] == CHUNK.decode().strip()
    error = json.loads(events[-2].removeprefix("data: "))
    assert error["error"]["type"] == "upstream_error"
    assert events[-1] == "data: [DONE]"
    assert gw.gateway.counters.stats().num_upstream_errors == {"stream": 1}
    assert gw.core.scheduler.stats().active.num_requests == 0
    # The connection dropped mid-stream: the worker looks down, as when it refuses one.
    state = gw.gateway.registry.get(0)
    assert state is not None and not state.healthy
    assert "broke off the stream" in (state.last_error or "")


async def test_a_stream_may_outlast_the_request_timeout_while_chunks_keep_coming(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    # 26 chunks 20 ms apart: about 0.5 s, past a 0.2 s request timeout. Only the wait
    # for the first chunk and the silences between chunks are limited.
    steady = await start_backend(stack, Backend(mode="steady"))
    gw = await stack.enter_async_context(
        GatewayServer(config([steady.url], request_timeout_s=0.2, stream_idle_timeout_s=0.2))
    )
    body = {"prompt": "abcdefgh", "stream": True}
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        data = await resp.read()
    assert data == CHUNK * 26 + b"data: [DONE]\n\n"
    assert gw.gateway.counters.stats().num_upstream_errors == {}
    assert gw.core.scheduler.stats().num_finished == 1


async def test_a_stream_silent_past_the_idle_timeout_ends_with_an_error_event(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    stalling = await start_backend(stack, Backend(mode="stall"))
    gw = await stack.enter_async_context(
        GatewayServer(config([stalling.url], stream_idle_timeout_s=0.3))
    )
    body = {"prompt": "abcdefgh", "stream": True}
    started = asyncio.get_running_loop().time()
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    elapsed = asyncio.get_running_loop().time() - started
    assert 0.3 <= elapsed < 5.0  # the 30 s stall was cut at the idle timeout
    events = [e for e in text.split("\n\n") if e]
    assert events[0] == CHUNK.decode().strip()
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == 504
    assert "sent nothing for 0.3 s" in error["message"]
    assert events[-1] == "data: [DONE]"
    assert gw.gateway.counters.stats().num_upstream_errors == {"timeout": 1}
    # The upstream connection is closed: the worker sees the request abandoned.
    for _ in range(100):
        if stalling.disconnects:
            break
        await asyncio.sleep(0.02)
    assert stalling.disconnects == 1
    assert gw.core.scheduler.stats().active.num_requests == 0
    assert gw.gateway.counters.num_in_flight == 0
    # A silent stream is a failed answer: one in a row, not yet enough to leave.
    state = gw.gateway.registry.get(0)
    assert state is not None and state.healthy
    assert state.consecutive_errors == 1
    assert "sent nothing for 0.3 s" in (state.last_error or "")
    # In a batch, the stalled prompt's stream ends the merged answer the same way.
    batch = {"prompt": ["abcdefgh", "ijklmnop"], "stream": True}
    async with client.post(gw.url + "/v1/completions", json=batch) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    error = json.loads([e for e in text.split("\n\n") if e][-2].removeprefix("data: "))
    assert "sent nothing for 0.3 s" in error["error"]["message"]
    for _ in range(100):
        if gw.gateway.counters.num_in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert gw.core.scheduler.stats().active.num_requests == 0
    assert gw.gateway.counters.num_in_flight == 0


async def test_a_stream_whose_first_chunk_is_late_is_retried_once_then_a_504(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    # Both answer 200 at once, then take SLOW_START_S (1 s) to the first chunk.
    slow = [await start_backend(stack, Backend()) for _ in range(2)]
    gw = await stack.enter_async_context(
        GatewayServer(
            config(
                [b.url for b in slow],
                router_mode="round_robin",
                request_timeout_s=0.3,
                stream_idle_timeout_s=30.0,
            )
        )
    )
    body = {"prompt": "slow start", "stream": True}
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.status == 504
        message = (await resp.json())["error"]["message"]
    assert message == "worker sent no data before the request timeout"
    assert [len(b.requests) for b in slow] == [1, 1]
    stats = gw.gateway.counters.stats()
    assert (stats.num_retries, stats.num_upstream_errors) == (1, {"timeout": 2})
    assert gw.core.scheduler.stats().active.num_requests == 0


async def test_an_api_key_guards_the_openai_api_and_is_not_passed_on(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([backend.url], api_key="client-key")))
    url = gw.url + "/v1/completions"
    body = {"prompt": "abcdefgh"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "client-key"}):
        async with client.post(url, json=body, headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            error = (await resp.json())["error"]
        assert error["type"] == "authentication_error"
        assert "Authorization: Bearer" in error["message"]
    assert backend.requests == []  # refused before anything was routed
    async with client.post(url, json=body, headers={"Authorization": "Bearer client-key"}) as r:
        assert r.status == 200
    # The client's key is the gateway's, not the worker's: it is not passed on (the
    # completion's is the last recorded; the others are the gateway's own model reads).
    assert backend.authorizations[-1] is None
    assert set(backend.authorizations) == {None}
    # The admin API takes the same key when no admin key is set; probes stay open.
    async with client.get(gw.url + "/admin/workers") as resp:
        assert resp.status == 401
    for path in ("/v1/embeddings", "/tokenize", "/detokenize"):
        async with client.post(gw.url + path, json={"input": "x", "prompt": "x"}) as resp:
            assert resp.status == 401, path
    auth = {"Authorization": "Bearer client-key"}
    async with client.get(gw.url + "/admin/workers", headers=auth) as resp:
        assert resp.status == 200
    async with client.get(gw.url + "/health") as resp:
        assert resp.status == 200
    async with client.get(gw.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert 'kvrouter_requests_total{route="/v1/completions",status="401"} 3.0' in text
    assert 'kvrouter_requests_total{route="/admin/workers",status="401"} 1.0' in text


async def test_an_admin_key_guards_admin_debug_and_dashboard_data(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(config([backend.url], admin_api_key="admin-key"))
    )
    admin = {"Authorization": "Bearer admin-key"}
    # No api_key: the OpenAI API is open, and a client's header goes on to the worker.
    client_auth = {"Authorization": "Bearer for-the-worker"}
    async with client.post(
        gw.url + "/v1/completions", json={"prompt": "abcdefgh"}, headers=client_auth
    ) as resp:
        assert resp.status == 200
    # The completion's is the last recorded; before it, the gateway's own model reads.
    assert backend.authorizations[-1] == "Bearer for-the-worker"
    assert set(backend.authorizations[:-1]) <= {None}
    for method, path in (
        ("GET", "/admin/workers"),
        ("POST", "/admin/workers"),
        ("DELETE", "/admin/workers/0"),
        ("GET", "/debug/decisions"),
        ("POST", "/debug/explain"),
        ("GET", "/dashboard/data"),
    ):
        async with client.request(method, gw.url + path, json={}) as resp:
            assert resp.status == 401, path
        async with client.request(method, gw.url + path, json={}, headers=client_auth) as resp:
            assert resp.status == 401, path
    assert len(gw.gateway.registry.infos()) == 1  # the DELETE did not go through
    for path in ("/admin/workers", "/debug/decisions", "/dashboard/data"):
        async with client.get(gw.url + path, headers=admin) as resp:
            assert resp.status == 200, path
    async with client.get(gw.url + "/dashboard") as resp:  # the page; it sends #key=
        assert resp.status == 200
        assert "#key=" in await resp.text()
    # kvrouter top reads the same document with the key.
    data = await asyncio.to_thread(fetch_dashboard_data, gw.url, 2.0, "admin-key")
    assert data["workers"][0]["url"] == backend.url
    with pytest.raises(OSError, match="401"):
        await asyncio.to_thread(fetch_dashboard_data, gw.url, 2.0, None)


async def test_a_worker_key_is_sent_to_the_workers(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(config([backend.url], worker_api_key="worker-key"))
    )
    # The client's own header does not replace the gateway's key for the workers.
    headers = {"Authorization": "Bearer something-else"}
    for body in ({"prompt": "abcdefgh"}, {"prompt": "abcdefgh", "stream": True}):
        async with client.post(gw.url + "/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200
            await resp.read()
    async with client.get(gw.url + "/v1/models") as resp:
        assert resp.status == 200
    # Two completions and the models list, plus the gateway's own model reads: all keyed.
    assert len(backend.authorizations) >= 3
    assert set(backend.authorizations) == {"Bearer worker-key"}


async def test_embeddings_are_routed_by_their_input_and_forwarded_whole(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backends = [await start_backend(stack, Backend()) for _ in range(2)]
    gw = await stack.enter_async_context(GatewayServer(config([b.url for b in backends])))
    url = gw.url + "/v1/embeddings"
    first = {"model": "m", "input": "abcdefghijklmnop"}
    async with client.post(url, json=first) as resp:
        assert resp.status == 200
        worker = resp.headers["x-kvrouter-worker"]
        assert (await resp.json())["worker"] == backends[int(worker)].url
    # A batch is routed by its first input, which the chosen worker now caches, and
    # sent whole, as it came.
    batch = {"model": "m", "input": ["abcdefghijklmnop", "something else"]}
    async with client.post(url, json=batch) as resp:
        assert resp.status == 200
        assert resp.headers["x-kvrouter-worker"] == worker
    chosen = backends[int(worker)]
    assert chosen.requests == [first, batch]
    assert chosen.paths == ["/v1/embeddings"] * 2
    decisions = gw.gateway.counters.recent_decisions(2)
    assert [d.overlap_blocks for d in decisions] == [4, 0]  # newest first; 4 blocks of 4
    sched = gw.core.scheduler.stats()
    assert (sched.num_finished, sched.active.num_requests) == (2, 0)
    for bad, message in (
        ({"model": "m"}, "'input' is required"),
        ({"input": []}, "'input' is required"),
        ({"input": [{"text": "x"}]}, "'input' must be a string"),
    ):
        async with client.post(url, json=bad) as resp:
            assert resp.status == 400
            assert message in (await resp.json())["error"]["message"]


async def test_worker_tokenization_sends_what_changes_the_rendered_prompt(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([backend.url], tokenizer="worker")))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Find it."}],
        "tools": tools,
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": 2,
    }
    async with client.post(gw.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
    [sent] = backend.tokenized
    assert sent["tools"] == tools
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert sent["messages"] == body["messages"] and sent["model"] == "m"
    assert "max_tokens" not in sent


async def test_tokenize_and_detokenize_pass_through_to_a_worker(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    busy = await start_backend(stack, Backend(mode="status503"))
    good = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([busy.url, good.url])))
    for path in ("/tokenize", "/detokenize", "/tokenize"):
        async with client.post(gw.url + path, json={"prompt": "hello"}) as resp:
            assert resp.status == 200
            assert resp.headers["x-kvrouter-worker"] == "1"
            answer = await resp.json()
        # The one that said 503 passed it on; the body went through as it came.
        assert answer == {"tokens": [1, 2, 3], "echo": {"prompt": "hello"}, "worker": good.url}
    assert good.paths == ["/tokenize", "/detokenize", "/tokenize"]
    assert 1 <= len(busy.paths) <= 3  # workers take turns: it was asked first at times
    assert gw.core.scheduler.stats().num_decisions == 0  # nothing was routed or booked


async def test_streaming_passes_chunks_through(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([backend.url])))
    body = {"prompt": "abcdefgh", "stream": True, "stream_options": {"include_usage": True}}
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        data = await resp.read()
    assert data == CHUNK * 3 + b"data: [DONE]\n\n"
    assert backend.requests == [body]
    sched = gw.core.scheduler.stats()
    assert (sched.num_first_tokens, sched.num_finished, sched.active.num_requests) == (1, 1, 0)


async def test_client_disconnect_cancels_upstream_and_frees_the_booking(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    slow = await start_backend(stack, Backend(mode="slow"))
    gw = await stack.enter_async_context(GatewayServer(config([slow.url])))
    resp = await client.post(
        gw.url + "/v1/completions", json={"prompt": "abcdefgh", "stream": True}
    )
    assert await resp.content.readline() == CHUNK.split(b"\n")[0] + b"\n"
    assert gw.core.scheduler.stats().active.num_requests == 1
    assert gw.gateway.counters.num_in_flight == 1
    resp.close()  # the client goes away mid-stream
    for _ in range(100):
        if slow.disconnects and gw.core.scheduler.stats().active.num_requests == 0:
            break
        await asyncio.sleep(0.02)
    assert slow.disconnects == 1
    assert gw.core.scheduler.stats().active.num_requests == 0
    assert gw.gateway.counters.num_in_flight == 0
    assert gw.gateway.counters.num_disconnects == 1


async def test_a_client_leaving_before_its_answer_is_counted_and_freed(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    hanging = await start_backend(stack, Backend(mode="hang"))
    gw = await stack.enter_async_context(GatewayServer(config([hanging.url])))
    leaving = asyncio.ensure_future(
        client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"})
    )
    for _ in range(100):
        if hanging.requests:
            break
        await asyncio.sleep(0.02)
    assert gw.gateway.counters.num_in_flight == 1
    leaving.cancel()  # a client that gives up on a (non-streaming) answer
    await asyncio.gather(leaving, return_exceptions=True)
    for _ in range(100):
        if gw.gateway.counters.num_in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert gw.gateway.counters.num_in_flight == 0
    assert gw.core.scheduler.stats().active.num_requests == 0
    assert gw.gateway.counters.num_disconnects == 1


async def test_a_queued_request_whose_worker_leaves_before_it_resumes_is_routed_again(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backends = [await start_backend(stack, Backend()) for _ in range(2)]
    gw = await stack.enter_async_context(
        GatewayServer(
            config([b.url for b in backends], router_queue_threshold=1.0, max_num_batched_tokens=8)
        )
    )
    sched = gw.core.scheduler
    for worker in sched.workers:  # a long prefill on each: requests wait in the queue
        sched.schedule(ScheduleRequest(f"hold-{worker.worker_id}", token_ids=[1] * 64,
                                       worker=worker))  # fmt: skip
    waiting = asyncio.ensure_future(
        client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"})
    )
    for _ in range(100):
        if gw.core.queue_stats().pending == 1:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.02)
    # Room on worker 0: the queue routes the request there, and before the request
    # resumes, a dropped connection takes worker 0 out of rotation.
    gw.core.on_finish("hold-0")
    assert gw.core.queue_stats().pending == 0  # type: ignore[union-attr]
    gw.gateway.registry.mark_failed(0, "connection dropped")
    async with await waiting as resp:
        assert resp.status == 200
        assert resp.headers["x-kvrouter-worker"] == "1"
    assert (len(backends[0].requests), len(backends[1].requests)) == (0, 1)
    gw.core.on_finish("hold-1")
    assert sched.stats().active.num_requests == 0


async def test_a_request_routed_while_a_worker_is_being_removed_avoids_it(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend())
    b = await start_backend(stack, Backend())
    # Worker 0 has an event feed (to an address with no publisher): stopping it takes
    # a moment, during which requests keep coming.
    workers = (WorkerSpec(a.url, kv_events=f"tcp://127.0.0.1:{free_port()}"), WorkerSpec(b.url))
    gw = await stack.enter_async_context(
        GatewayServer(config([], workers=workers, router_mode="round_robin"))
    )
    removing = asyncio.ensure_future(gw.gateway.remove_worker(0))
    await asyncio.sleep(0)  # the removal runs up to stopping the feed
    assert not removing.done()
    parsed = parse_body(b'{"prompt": "abcdefgh"}', "completion")
    prompt = await gw.gateway.prepare(parsed, "completion")
    for i in range(2):  # round robin would come to worker 0
        attempt = gw.gateway.forwarder.choose(f"r{i}", prompt, RoutingOverrides())
        assert attempt.state.worker_id == 1
        gw.core.on_finish(f"r{i}")
    await removing
    assert gw.core.scheduler.stats().active.num_requests == 0


async def _start_stream(
    client: aiohttp.ClientSession, url: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    resp = await client.post(url + "/v1/completions", json={"prompt": "abcdefgh", "stream": True})
    assert resp.status == 200
    return resp, await resp.content.readany()


async def test_shutdown_lets_streams_in_flight_finish(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend(mode="steady"))
    gw = GatewayServer(config([a.url], shutdown_grace_s=10.0))
    await gw.start()
    resp, first = await _start_stream(client, gw.url)
    closing = asyncio.create_task(gw.aclose())
    rest = await resp.read()
    await closing
    text = (first + rest).decode()
    assert text.endswith("data: [DONE]\n\n") and "error" not in text
    assert text.count("data: {") == 26  # every chunk of the worker's answer


async def test_shutdown_ends_a_stream_that_outlives_the_grace_with_an_error_event(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend(mode="slow"))  # 4 s of chunks
    gw = GatewayServer(config([a.url], shutdown_grace_s=0.3))
    await gw.start()
    resp, first = await _start_stream(client, gw.url)
    started = asyncio.get_running_loop().time()
    closing = asyncio.create_task(gw.aclose())
    rest = await resp.read()
    await closing
    assert asyncio.get_running_loop().time() - started < 3.5  # the stream has 4 s left
    text = (first + rest).decode()
    assert "the router is shutting down" in text and '"code": 503' in text.replace('":', '": ')
    assert gw.gateway.counters.stats().num_disconnects == 0  # not the client's doing


async def test_shutdown_ends_a_streamed_batch_with_an_error_event_too(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend(mode="slow"))
    gw = GatewayServer(config([a.url], shutdown_grace_s=0.3))
    await gw.start()
    body = {"prompt": ["abcdefgh", "ijklmnop"], "stream": True}
    resp = await client.post(gw.url + "/v1/completions", json=body)
    assert resp.status == 200
    first = await resp.content.readany()
    closing = asyncio.create_task(gw.aclose())
    text = (first + await resp.read()).decode()
    await closing
    assert text.count("the router is shutting down") == 1
    assert gw.core.scheduler.stats().active.num_requests == 0  # both prompts freed


async def test_shutdown_answers_a_request_still_waiting_with_a_503(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend(mode="hang"))  # says nothing for 30 s
    gw = GatewayServer(config([a.url], shutdown_grace_s=0.3))
    await gw.start()
    pending = asyncio.create_task(
        client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"})
    )
    for _ in range(250):  # until the worker has it
        if a.requests:
            break
        await asyncio.sleep(0.02)
    assert len(a.requests) == 1
    await gw.aclose()
    resp = await pending
    assert resp.status == 503 and "Retry-After" in resp.headers
    assert "shutting down" in (await resp.json())["error"]["message"]
    assert gw.core.scheduler.stats().active.num_requests == 0


async def test_all_workers_busy_is_503_with_retry_after(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    loaded = await start_backend(stack, Backend(kv_usage=0.97))
    gw = await stack.enter_async_context(
        GatewayServer(config([loaded.url], busy_kv_usage=0.9, retry_after_s=2.5))
    )
    assert await gw.gateway.scrape_metrics(gw.gateway.registry.in_rotation()[0])
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "3"
        body = await resp.json()
    assert body["error"]["type"] == "service_unavailable"
    assert "kv usage 97% > 90%" in body["error"]["message"]
    assert loaded.requests == []


async def test_limits_and_bad_input_are_4xx_never_500(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(config([backend.url], max_body_bytes=2000, max_prompt_tokens=50))
    )
    url = gw.url + "/v1/completions"
    cases: list[tuple[bytes, int, str]] = [
        (json.dumps({"prompt": "x" * 3000}).encode(), 413, "over the limit of 2000"),
        (json.dumps({"prompt": "x" * 60}).encode(), 413, "60 tokens, over the limit of 50"),
        (b"{not json", 400, "not valid JSON"),
        (b'{"prompt": 1}', 400, "'prompt' must be"),
        (json.dumps({"prompt": "abcd", "kvrouter": {"speed": 1}}).encode(), 400, "unknown key"),
        (b'{"prompt": "\xff"}', 400, "not valid UTF-8"),
        (b'{"prompt": "ab", "x": ' + b"[" * 980 + b"]" * 980 + b"}", 400, "nested too deeply"),
    ]
    for path in ("/v1/completions", "/v1/chat/completions", "/debug/explain"):
        for body, status, message in cases[-2:]:
            async with client.post(gw.url + path, data=body) as resp:
                assert resp.status == status, (path, body)
                assert message in (await resp.json())["error"]["message"]
    for body, status, message in cases:
        async with client.post(url, data=body) as resp:
            assert resp.status == status, body
            error = (await resp.json())["error"]
            assert message in error["message"]
            assert error["code"] == status
    not_gzip = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with client.post(url, data=b'{"prompt": "abcd"}', headers=not_gzip) as resp:
        assert resp.status == 400
        assert "could not be read" in (await resp.json())["error"]["message"]
    async with client.get(gw.url + "/v1/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"
    async with client.get(url) as resp:
        assert resp.status == 405
    async with client.post(url, json={"prompt": "abcd"}, headers={"x-kvrouter-worker": "9"}) as r:
        assert r.status == 400
    assert backend.requests == []


async def test_an_unexpected_error_is_a_logged_and_counted_json_500(
    stack: AsyncExitStack,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([backend.url])))

    def broken(self: object, n: int) -> list[object]:
        raise KeyError("a bug")

    monkeypatch.setattr(type(gw.gateway.counters), "recent_decisions", broken)
    async with client.get(gw.url + "/debug/decisions") as r:
        assert r.status == 500
        error = (await r.json())["error"]
    assert error["type"] == "internal_error" and "KeyError" in error["message"]
    assert any("GET /debug/decisions failed" in m for m in caplog.messages)
    async with client.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert 'kvrouter_requests_total{route="/debug/decisions",status="500"} 1.0' in text


async def test_direct_routing_and_body_overrides_are_stripped(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend())
    b = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([a.url, b.url])))
    for _ in range(3):
        async with client.post(
            gw.url + "/v1/completions",
            json={"prompt": "abcdefgh", "kvrouter": {"worker": 1, "overlap_weight": 2}},
        ) as resp:
            assert resp.status == 200
    assert a.requests == []
    assert b.requests == [{"prompt": "abcdefgh"}] * 3
    recent = gw.gateway.counters.recent_decisions(3)
    assert [(d.worker_id, d.policy, d.pinned) for d in recent] == [(1, "direct", True)] * 3


async def test_a_chat_request_with_an_image_is_routed_and_forwarded_unchanged(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([a.url])))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    text = {"type": "text", "text": "What is in this picture?"}
    other = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAAAAAAAA="}}
    bodies = [
        {"model": "m", "messages": [{"role": "user", "content": [text, picture]}]}
        for picture in (image, image, other)
    ]
    for body in bodies:
        async with client.post(gw.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
    assert a.requests == bodies  # the worker gets the images, not the routing markers
    different, same, first = gw.gateway.counters.recent_decisions(3)  # newest first
    assert first.overlap_blocks == 0 and first.request_blocks > 10
    assert same.overlap_blocks == same.request_blocks  # predicted from the first one
    assert 0 < different.overlap_blocks < different.request_blocks - 8  # the text only


async def test_direct_mode_needs_every_request_to_name_its_worker(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend())
    b = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(config([a.url, b.url], router_mode="direct"))
    )
    url = gw.url + "/v1/completions"
    async with client.post(url, json={"prompt": "abcdefgh"}) as resp:
        assert resp.status == 400
        assert "x-kvrouter-worker" in (await resp.json())["error"]["message"]
    pinned = {"x-kvrouter-worker": "1"}
    async with client.post(url, json={"prompt": "abcdefgh"}, headers=pinned) as resp:
        assert resp.status == 200
    assert a.requests == [] and b.requests == [{"prompt": "abcdefgh"}]


async def test_admin_api_adds_lists_and_removes_workers(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend())
    b = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([a.url])))
    async with client.post(gw.url + "/admin/workers", json={"url": b.url, "worker_id": 5}) as r:
        assert r.status == 201
        added = await r.json()
    assert (added["worker_id"], added["healthy"], added["url"]) == (5, True, b.url)
    async with client.post(gw.url + "/admin/workers", json={"url": "nope"}) as r:
        assert r.status == 400
    async with client.post(gw.url + "/admin/workers", data=b'{"url": "\xff"}') as r:
        assert r.status == 400
    # The same worker spelled another way is still the same worker.
    again = {"url": b.url.replace("http://", "HTTP://") + "/"}
    async with client.post(gw.url + "/admin/workers", json=again) as r:
        assert r.status == 400
        assert "already registered" in (await r.json())["error"]["message"]
    for bad in ({"url": a.url + "/v1"}, {"url": "http://127.0.0.1:9", "dp_rank": -1}):
        async with client.post(gw.url + "/admin/workers", json=bad) as r:
            assert r.status == 400, bad
    c = await start_backend(stack, Backend())
    async with client.post(gw.url + "/admin/workers", json={"url": c.url}) as r:
        assert r.status == 201
        assigned = (await r.json())["worker_id"]  # the id the gateway gave it
    assert isinstance(assigned, int) and assigned not in (0, 5)
    async with client.delete(gw.url + f"/admin/workers/{assigned}") as r:
        assert r.status == 200
    async with client.get(gw.url + "/admin/workers") as r:
        listed = (await r.json())["workers"]
    assert [(w["worker_id"], w["url"], w["healthy"], w["mode"]) for w in listed] == [
        (0, a.url, True, "approximate"),
        (5, b.url, True, "approximate"),
    ]
    assert set(listed[0]) >= {"metrics_age_s", "index_size", "active_blocks"}
    async with client.delete(gw.url + "/admin/workers/0") as r:
        assert r.status == 200
    async with client.delete(gw.url + "/admin/workers/0") as r:
        assert r.status == 404
    assert gw.core.scheduler.workers == (gw.gateway.registry.get(5).key,)  # type: ignore[union-attr]
    async with client.get(gw.url + "/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["m"]


async def test_a_scrape_that_fails_unexpectedly_does_not_stop_scraping(
    stack: AsyncExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(stack, Backend(kv_usage=0.5))
    gw = await stack.enter_async_context(
        GatewayServer(config([backend.url], metrics_scrape_interval_s=0.05))
    )
    real = gw.core.update_metrics_text
    calls = []

    def failing_once(worker: Any, text: str, **options: Any) -> bool:
        calls.append(worker)
        if len(calls) == 1:
            raise OverflowError("cannot convert float infinity to integer")
        return real(worker, text, **options)

    gw.core.update_metrics_text = failing_once  # type: ignore[method-assign]
    for _ in range(100):
        if len(calls) >= 3:
            break
        await asyncio.sleep(0.02)
    assert len(calls) >= 3  # the loop went on after the failure
    assert "metrics scrape of worker 0 failed" in caplog.text
    [endpoint] = gw.core.aggregator.get_metrics().endpoints
    assert endpoint.gpu_cache_usage_perc == 0.5


async def test_health_checks_take_workers_out_and_back(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([a.url])))
    state = gw.gateway.registry.in_rotation()[0]
    # Approximate mode: the scheduler's predicted entries are the index.
    async with client.post(gw.url + "/v1/completions", json={"prompt": "abcdefgh"}) as r:
        assert r.status == 200
    assert gw.core.indexer.tree_size(state.key) == 2
    a.healthy = False
    assert not await gw.gateway.check_health(state)
    assert gw.gateway.registry.in_rotation() == []
    assert gw.core.indexer.tree_size(state.key) == 0
    async with client.get(gw.url + "/health") as r:
        assert r.status == 503
    a.healthy = True
    assert await gw.gateway.check_health(state)
    assert gw.core.scheduler.workers == (state.key,)
    async with client.get(gw.url + "/health") as r:
        assert (r.status, (await r.json())["workers_in_rotation"]) == (200, 1)


async def test_debug_endpoints_and_metrics(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    a = await start_backend(stack, Backend())
    b = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([a.url, b.url])))
    prompt = {"prompt": "abcdefghijklmnop"}
    async with client.post(gw.url + "/v1/completions", json=prompt) as r:
        first = r.headers["x-kvrouter-worker"]
    async with client.post(gw.url + "/debug/explain", json=prompt) as r:
        explained = await r.json()
    assert str(explained["worker_id"]) == first
    assert (explained["request_blocks"], explained["overlap_blocks"]) == (4, 4)
    assert len(explained["explanation"]) == 2
    assert gw.core.scheduler.stats().num_decisions == 1  # explaining is not deciding
    # A batch is explained prompt by prompt; only the first prompt's prefix is cached.
    batch = {"prompt": [prompt["prompt"], "qrstuvwxyzABCDEF"]}
    async with client.post(gw.url + "/debug/explain", json=batch) as r:
        explained_batch = (await r.json())["prompts"]
    assert [str(p["worker_id"]) for p in explained_batch][:1] == [first]
    assert [(p["request_blocks"], p["overlap_blocks"]) for p in explained_batch] == [
        (4, 4),
        (4, 0),
    ]
    async with client.post(gw.url + "/debug/explain", json={"prompt": ["ok", 3.5]}) as r:
        assert r.status == 400
    assert gw.core.scheduler.stats().num_decisions == 1
    async with client.get(gw.url + "/debug/decisions?n=5") as r:
        decisions = (await r.json())["decisions"]
    assert len(decisions) == 1
    assert any("(Selected)" in line for line in decisions[0]["explanation"])
    for bad in ("x", "-1"):
        async with client.get(gw.url + f"/debug/decisions?n={bad}") as r:
            assert r.status == 400
    async with client.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert f'kvrouter_decisions_total{{policy="kv",worker="{first}"}} 1.0' in text
    assert 'kvrouter_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert "kvrouter_requests_in_flight 0.0" in text
    assert "kvrouter_decision_latency_seconds_count 1.0" in text
    assert "kvrouter_kv_events_skipped_total 0.0" in text
    async with client.get(gw.url + "/dashboard") as r:
        assert "kvrouter dashboard" in await r.text()
    for _ in range(2):  # its own polls, like the scrapes above, are not API requests
        async with client.get(gw.url + "/dashboard/data") as r:
            data = await r.json()
    assert data["core"]["decisions"] == 1
    assert data["requests"] == 1
    assert len(data["workers"]) == 2


async def test_batch_prompts_fan_out_with_retries_and_merge(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    dropping = await start_backend(stack, Backend(mode="drop"))
    good = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(
        GatewayServer(config([dropping.url, good.url], router_mode="round_robin"))
    )
    body = {"prompt": ["abcdefgh", "ijklmnop", [5, 6, 7, 8]], "max_tokens": 2}
    headers = {"x-request-id": "client-7"}
    async with client.post(gw.url + "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-kvrouter-worker"] == "1,1,1"
        answer = await resp.json()
    assert answer["choices"] == [{"text": "ok", "index": i} for i in range(3)]
    assert sorted(r["prompt"] for r in good.requests if isinstance(r["prompt"], str)) == [
        "abcdefgh",
        "ijklmnop",
    ]
    assert [r["prompt"] for r in good.requests if isinstance(r["prompt"], list)] == [[5, 6, 7, 8]]
    assert all(r["max_tokens"] == 2 for r in good.requests)
    # A client's request id reaches each worker made distinct by the prompt's index.
    assert sorted(good.request_ids) == ["client-7-0", "client-7-1", "client-7-2"]
    assert gw.gateway.counters.stats().num_batches == 1
    assert gw.core.scheduler.stats().active.num_requests == 0


async def test_a_refused_prompt_fails_its_batch_with_the_workers_answer(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([backend.url])))
    url = gw.url + "/v1/completions"
    for stream in (False, True):
        body = {"prompt": ["abcdefgh", "refuse me"], "stream": stream}
        async with client.post(url, json=body) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["message"] == "refused"
    async with client.post(url, json={"prompt": ["abcdefgh", {"x": 1}]}) as resp:
        assert resp.status == 400
        assert "prompt[1] must be" in (await resp.json())["error"]["message"]
    assert gw.core.scheduler.stats().active.num_requests == 0
    assert gw.gateway.counters.num_in_flight == 0


async def test_a_streamed_batch_merges_events_and_ends_once(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backends = [await start_backend(stack, Backend()) for _ in range(2)]
    gw = await stack.enter_async_context(GatewayServer(config([b.url for b in backends])))
    body = {"prompt": ["abcdefgh", "ijklmnop"], "stream": True}
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        text = (await resp.read()).decode()
    assert_two_prompts_merged(text, gw)


async def test_a_streamed_batch_starts_with_its_fastest_prompt(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([backend.url])))
    body = {"prompt": ["slow start", "abcdefgh"], "stream": True}
    loop = asyncio.get_running_loop()
    sent = loop.time()
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        first = await resp.content.readline()
        first_s = loop.time() - sent
        text = (first + await resp.read()).decode()
        total_s = loop.time() - sent
    # The fast prompt's tokens flow while the slow one is still in its prefill.
    assert json.loads(first.removeprefix(b"data: "))["choices"][0]["index"] == 1
    assert first_s < SLOW_START_S / 2 < SLOW_START_S <= total_s
    assert_two_prompts_merged(text, gw)


async def test_a_streamed_batch_broken_mid_stream_names_its_prompt(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    good = await start_backend(stack, Backend(mode="steady"))
    breaking = await start_backend(stack, Backend(mode="break"))
    gw = await stack.enter_async_context(
        GatewayServer(config([good.url, breaking.url], router_mode="round_robin"))
    )
    body = {"prompt": ["abcdefgh", "ijklmnop"], "stream": True}
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        workers = resp.headers["x-kvrouter-worker"].split(",")
        text = (await resp.read()).decode()
    index = workers.index("1")  # the prompt the breaking worker took
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    [error] = [e["error"] for e in events if "error" in e]
    assert error["message"].startswith(f"prompt {index}: worker 1 failed mid-stream:")
    assert "400, message=" not in error["message"]  # no HTTP status nobody sent
    assert text.endswith("data: [DONE]\n\n")  # once, after the error, as vLLM ends
    assert text.count("data: [DONE]") == 1


async def _read_then_reset(url: str, body: dict[str, Any], read_bytes: int) -> None:
    """POST over a raw socket, read a little of the answer, then reset the connection."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    got = 0
    while got < read_bytes and (data := await reader.read(4096)):
        got += len(data)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    writer.close()


async def test_many_clients_leaving_streamed_batches_free_every_prompt(
    stack: AsyncExitStack,
) -> None:
    # Clients that reset mid-stream cancel the handler again while it cleans up; that
    # must not skip ending any prompt's booking (it once did, under this load).
    backends = [await start_backend(stack, Backend(mode="burst")) for _ in range(2)]
    gw = await stack.enter_async_context(GatewayServer(config([b.url for b in backends])))
    bodies = [
        {"prompt": [f"batch {i} prompt {j} " + "c" * 64 for j in range(3)], "stream": True}
        for i in range(40)
    ]
    await asyncio.gather(*(_read_then_reset(gw.url, body, 2000) for body in bodies))
    for _ in range(250):
        if gw.gateway.counters.num_in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert gw.gateway.counters.num_in_flight == 0
    active = gw.core.scheduler.stats().active
    assert (active.num_requests, active.num_active_blocks, active.num_prefill_tokens) == (0, 0, 0)
    # Each client that left is counted once (a reset seen on a write, then the cancel of
    # the same handler, are one disconnect); a stream that finished first is not one.
    assert 0 < gw.gateway.counters.num_disconnects <= len(bodies)


async def test_a_client_leaving_a_batch_before_its_first_token_frees_every_prompt(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend())
    gw = await stack.enter_async_context(GatewayServer(config([backend.url])))
    body = {"prompt": ["slow start", "slow start"], "stream": True}
    request = asyncio.create_task(client.post(gw.url + "/v1/completions", json=body))
    for _ in range(100):  # both prompts booked and waiting for their first token
        if gw.gateway.counters.num_in_flight == 2:
            break
        await asyncio.sleep(0.01)
    assert gw.gateway.counters.num_in_flight == 2
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)
    for _ in range(100):
        if gw.gateway.counters.num_in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert gw.gateway.counters.num_in_flight == 0
    assert gw.core.scheduler.stats().active.num_requests == 0
    assert gw.gateway.counters.stats().num_disconnects == 1


async def test_a_prompt_failing_after_the_batch_stream_started_ends_it_with_an_error(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    backend = await start_backend(stack, Backend(mode="slow"))
    gw = await stack.enter_async_context(GatewayServer(config([backend.url])))
    body = {"prompt": ["abcdefgh", "fail late"], "stream": True}
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert json.loads(events[0])["choices"][0]["index"] == 0
    error = json.loads(events[-2])["error"]
    assert error["message"].startswith("prompt 1 failed: ") and error["code"] == 502
    assert events[-1] == "[DONE]"
    # Both bookings end (just after the stream's end), and the slow prompt's worker is
    # told to stop.
    for _ in range(100):
        if backend.disconnects == 1 and gw.gateway.counters.num_in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert backend.disconnects == 1
    assert gw.gateway.counters.num_in_flight == 0
    assert gw.core.scheduler.stats().active.num_requests == 0


async def test_a_batch_stream_broken_mid_way_ends_with_an_error_event(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    breaking = await start_backend(stack, Backend(mode="break"))
    gw = await stack.enter_async_context(GatewayServer(config([breaking.url])))
    body = {"prompt": ["abcdefgh", "ijklmnop"], "stream": True}
    async with client.post(gw.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    error = json.loads(events[-2].removeprefix("data: "))
    assert error["error"]["type"] == "upstream_error"
    assert events[-1] == "data: [DONE]"
    assert gw.gateway.counters.stats().num_upstream_errors["stream"] >= 1
    assert gw.core.scheduler.stats().active.num_requests == 0
    assert gw.gateway.counters.num_in_flight == 0


async def test_a_client_leaving_a_batch_stream_frees_every_prompt(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    slow = await start_backend(stack, Backend(mode="slow"))
    gw = await stack.enter_async_context(GatewayServer(config([slow.url])))
    resp = await client.post(
        gw.url + "/v1/completions", json={"prompt": ["abcdefgh", "ijklmnop"], "stream": True}
    )
    assert (await resp.content.readline()).startswith(b"data: ")
    assert gw.core.scheduler.stats().active.num_requests == 2
    resp.close()
    for _ in range(100):
        if slow.disconnects == 2 and gw.core.scheduler.stats().active.num_requests == 0:
            break
        await asyncio.sleep(0.02)
    assert slow.disconnects == 2
    assert gw.core.scheduler.stats().active.num_requests == 0
    assert gw.gateway.counters.num_in_flight == 0
