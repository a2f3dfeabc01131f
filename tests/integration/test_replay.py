"""Live replay against a real simulated worker on a loopback port."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack

import pytest
from aiohttp import web

from kvrouter.bench.replay import ReplayConfig, replay
from kvrouter.bench.results import FIGURE_KEYS, results_document
from kvrouter.bench.workloads import Arrivals, Request, shared_prefix_requests
from kvrouter.engine.cli import MockerOptions, start_workers
from tests.integration.apps import serve_app

pytestmark = pytest.mark.integration


async def _serve(stack: AsyncExitStack) -> str:
    options = MockerOptions(
        num_workers=1,
        base_port=0,
        kv_events_base_port=None,
        block_size=16,
        num_gpu_blocks=4096,
        speedup_ratio=20.0,
    )
    [(_, addresses)] = await start_workers(options, stack)
    return addresses.http_url


def _requests() -> list[Request]:
    return shared_prefix_requests(
        num_groups=2, prompts_per_group=6, system_prompt_len=256, question_len=32, output_len=5
    )


@pytest.mark.parametrize(
    "arrivals",
    [Arrivals("poisson", rate=50.0, seed=1), Arrivals("concurrency", concurrency=3)],
    ids=["poisson", "concurrency"],
)
async def test_replay_against_a_simulated_worker(arrivals: Arrivals) -> None:
    async with AsyncExitStack() as stack:
        url = await _serve(stack)
        result = await replay(
            _requests(),
            arrivals,
            ReplayConfig(url=url, request_timeout_s=30.0, sample_interval_s=0.05),
        )
    figures = result.figures
    assert result.extra["errors"] == 0
    assert figures["completed"] == 12
    assert figures["ttft_mean_ms"] > 0
    assert figures["itl_mean_ms"] > 0
    assert figures["throughput_tok_s"] > 0
    # Both groups' 256-token system prompts are served from cache after their first use.
    assert figures["prefix_reuse"] > 0.5
    assert sum(1 for t in result.ttft_ms if t > 0) == 12
    doc = results_document({"live": result}, reuse_limit=None)
    assert set(FIGURE_KEYS) <= set(doc["policies"]["live"])


async def test_replay_text_prompts_and_a_bad_url() -> None:
    async with AsyncExitStack() as stack:
        url = await _serve(stack)
        config = ReplayConfig(url=url, prompt_mode="text", request_timeout_s=30.0)
        ok = await replay(_requests()[:3], Arrivals("concurrency", concurrency=1), config)
        bad = await replay(
            _requests()[:2],
            Arrivals("concurrency", concurrency=1),
            ReplayConfig(url=url + "/nowhere", model="m", request_timeout_s=5.0),
        )
    assert ok.extra["errors"] == 0
    assert ok.figures["completed"] == 3
    assert bad.extra["errors"] == 2
    assert bad.figures["completed"] == 0
    # The results say why: one message, counted twice.
    [(message, count)] = bad.extra["error_messages"].items()
    assert message.startswith("HTTP 404") and count == 2
    assert "error_messages" not in ok.extra


async def _server_without_cache_report(stack: AsyncExitStack) -> str:
    """A worker like vLLM without --enable-prompt-tokens-details: usage, no details."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        usage = {"prompt_tokens": 10, "completion_tokens": body["max_tokens"]}
        last = {"choices": [], "usage": usage}
        await response.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return await serve_app(stack, app)


async def test_a_server_that_reports_no_cached_tokens_gives_unknown_reuse() -> None:
    async with AsyncExitStack() as stack:
        url = await _server_without_cache_report(stack)
        result = await replay(
            _requests()[:4],
            Arrivals("concurrency", concurrency=2),
            ReplayConfig(url=url, request_timeout_s=10.0),
        )
    assert result.figures["completed"] == 4
    assert result.figures["prefix_reuse"] is None  # unknown, not zero
    assert result.extra["cached_tokens_reported"] is False
