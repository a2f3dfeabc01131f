"""Live replay against a real simulated worker on a loopback port."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from kvrouter.bench.replay import ReplayConfig, replay
from kvrouter.bench.results import FIGURE_KEYS, results_document
from kvrouter.bench.workloads import Arrivals, Request, shared_prefix_requests
from kvrouter.engine.cli import MockerOptions, start_workers

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
