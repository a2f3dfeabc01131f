"""``/v1/responses`` through the gateway, against scripted workers on loopback ports.

Each worker keeps the responses it answered in its own memory, as vLLM does, so a
follow-up (``previous_response_id``) only works on the worker that stored the response
it continues: the tests route round robin, which would send it elsewhere unpinned.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvrouter.gateway.config import GatewayConfig, WorkerSpec
from kvrouter.gateway.server import GatewayServer
from tests.integration.apps import serve_app

pytestmark = pytest.mark.integration

_ids = itertools.count()


@dataclass
class ResponsesWorker:
    """Stores every response it answers; refuses an unknown ``previous_response_id``."""

    url: str = ""
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored:
            return _not_found(previous)
        response = {
            "id": f"resp_{next(_ids)}",
            "object": "response",
            "status": "completed",
            "output": [{"type": "message", "role": "assistant", "content": []}],
            "worker": self.url,
        }
        self.stored[response["id"]] = response
        if not body.get("stream"):
            return web.json_response(response)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        created = json.dumps({"type": "response.created", "response": response}).encode()
        event = b"event: response.created\ndata: " + created + b"\n\n"
        # The id arrives split over two writes (and so, usually, two chunks).
        cut = event.index(b'"id"') + 7
        await stream.write(event[:cut])
        await asyncio.sleep(0.01)
        await stream.write(event[cut:])
        if body.get("input") == "break":  # gone after its first event
            assert request.transport is not None
            request.transport.close()
            return stream
        done = json.dumps({"type": "response.completed", "response": response}).encode()
        await stream.write(b"event: response.completed\ndata: " + done + b"\n\n")
        await stream.write_eof()
        return stream

    async def get(self, request: web.Request) -> web.Response:
        response_id = request.match_info["id"]
        if response_id not in self.stored:
            return _not_found(response_id)
        if request.query.get("stream") == "true":  # vLLM replays a response's events
            after = request.query.get("starting_after", "-1")
            events = f'event: response.completed\ndata: {{"after": {after}}}\n\n'
            return web.Response(text=events, content_type="text/event-stream")
        return web.json_response(self.stored[response_id])

    async def cancel(self, request: web.Request) -> web.Response:
        self.cancelled.append(request.match_info["id"])
        return web.json_response({"error": {"message": "not a background response"}}, status=400)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def _not_found(response_id: str) -> web.Response:
    error = {"message": f"Response with id '{response_id}' not found.", "code": 404}
    return web.json_response({"error": error}, status=404)


async def start_worker(stack: AsyncExitStack) -> ResponsesWorker:
    worker = ResponsesWorker()
    app = web.Application()
    app.router.add_post("/v1/responses", worker.create)
    app.router.add_get("/v1/responses/{id}", worker.get)
    app.router.add_post("/v1/responses/{id}/cancel", worker.cancel)
    app.router.add_get("/health", worker.health)
    worker.url = await serve_app(stack, app, access_log=None, shutdown_timeout=0.1)
    return worker


def config(urls: list[str]) -> GatewayConfig:
    return GatewayConfig(
        port=0,
        workers=tuple(WorkerSpec(u) for u in urls),
        block_size=4,
        router_mode="round_robin",
        health_check_interval_s=30.0,
        metrics_scrape_interval_s=30.0,
    )


async def test_a_follow_up_goes_to_the_worker_that_stored_its_response(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    workers = [await start_worker(stack) for _ in range(2)]
    gw = await stack.enter_async_context(GatewayServer(config([w.url for w in workers])))
    url = gw.url + "/v1/responses"
    first = {"model": "m", "instructions": "Be brief.", "input": "What is a KV cache?"}
    async with client.post(url, json=first) as resp:
        assert resp.status == 200
        home = resp.headers["x-kvrouter-worker"]
        previous = (await resp.json())["id"]
    # Round robin would alternate; every turn of the conversation stays on its worker.
    for turn in range(3):
        body = {"model": "m", "input": f"And then? ({turn})", "previous_response_id": previous}
        async with client.post(url, json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-kvrouter-worker"] == home
            previous = (await resp.json())["id"]
    owner = workers[int(home)]
    assert len(owner.bodies) == 4
    assert owner.bodies[0] == first  # forwarded as it came
    # A stored response is fetched from its worker; cancel reaches it too.
    async with client.get(f"{url}/{previous}") as resp:
        assert resp.status == 200
        assert resp.headers["x-kvrouter-worker"] == home
        assert (await resp.json())["worker"] == owner.url
    # Its query reaches the worker, and an event stream comes back as one.
    async with client.get(f"{url}/{previous}?stream=true&starting_after=3") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert await resp.text() == 'event: response.completed\ndata: {"after": 3}\n\n'
    async with client.post(f"{url}/{previous}/cancel") as resp:
        assert resp.status == 400  # the worker's own answer, passed on
    assert owner.cancelled == [previous]
    # An id no worker answered through this gateway: a clear 404.
    async with client.get(f"{url}/resp_unknown") as resp:
        assert resp.status == 404
        assert "not known to this router" in (await resp.json())["error"]["message"]
    # A follow-up to an unknown response is routed as usual; the worker says no.
    body = {"input": "hello", "previous_response_id": "resp_unknown"}
    async with client.post(url, json=body) as resp:
        assert resp.status == 404
        assert "not found" in (await resp.json())["error"]["message"]
    stats = gw.core.scheduler.stats()
    assert stats.active.num_requests == 0
    assert stats.num_decisions == 5


async def test_a_streamed_response_is_pinned_from_its_first_event(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    workers = [await start_worker(stack) for _ in range(2)]
    gw = await stack.enter_async_context(GatewayServer(config([w.url for w in workers])))
    url = gw.url + "/v1/responses"
    body: dict[str, Any] = {"input": [{"role": "user", "content": "hi"}], "stream": True}
    async with client.post(url, json=body) as resp:
        assert resp.status == 200
        home = resp.headers["x-kvrouter-worker"]
        text = (await resp.read()).decode()
    assert text.startswith("event: response.created\n")
    assert text.rstrip().endswith("}")  # no [DONE] is added: the Responses API has none
    created = json.loads(text.split("\n")[1].removeprefix("data: "))
    previous = created["response"]["id"]
    for _ in range(2):
        follow = {"input": "more", "previous_response_id": previous, "stream": True}
        async with client.post(url, json=follow) as resp:
            assert resp.status == 200
            assert resp.headers["x-kvrouter-worker"] == home
            await resp.read()
    assert len(workers[int(home)].bodies) == 3
    # A stream its worker breaks ends with the Responses API's own error event.
    async with client.post(url, json={"input": "break", "stream": True}) as resp:
        assert resp.status == 200
        events = (await resp.read()).decode().strip().split("\n\n")
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])
    assert (error["type"], error["code"]) == ("error", "502")
    assert "broke off the stream" in error["message"]
    # Out of rotation, its conversations cannot go on elsewhere: a 503 that says why.
    state = gw.gateway.registry.get(int(home))
    assert state is not None
    gw.gateway.registry.mark_failed(state.worker_id, "test")
    follow = {"input": "more", "previous_response_id": previous}
    async with client.post(url, json=follow) as resp:
        assert resp.status == 503
        assert "holds response" in (await resp.json())["error"]["message"]


async def test_bad_responses_requests_get_a_400(
    stack: AsyncExitStack, client: aiohttp.ClientSession
) -> None:
    worker = await start_worker(stack)
    gw = await stack.enter_async_context(GatewayServer(config([worker.url])))
    url = gw.url + "/v1/responses"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "m"}, "'input' is required"),
        ({"input": []}, "'input' is required"),
        ({"input": "hi", "instructions": 3}, "'instructions' must be a string"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role must be one of"),
        ({"input": ["text"]}, "input[0] must be an object"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "holds no message"),
    ]
    for body, message in cases:
        async with client.post(url, json=body) as resp:
            assert resp.status == 400, body
            assert message in (await resp.json())["error"]["message"]
    assert worker.bodies == []
