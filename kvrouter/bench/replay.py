"""Live replay: send a workload to any OpenAI-compatible endpoint and measure it.

Open loop (trace timestamps / speedup, or Poisson): each request is sent at its
arrival time whether or not earlier ones finished, as real users would. Closed loop
(fixed concurrency): ``concurrency`` requests stay in flight. Every request is a
streaming ``POST /v1/completions`` with ``max_tokens`` = ``min_tokens`` = its output
length and ``ignore_eos``, asking for usage in the last chunk so the server's
``usage.prompt_tokens_details.cached_tokens`` can be read.

The result has the same shape as one simulated policy (:mod:`kvrouter.bench.results`).
If the server names the worker that served a request in a ``x-kvrouter-worker``
response header, per-worker figures are filled in too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import msgspec

from kvrouter.bench.results import RequestRecord, RunResult, Series, summarize
from kvrouter.bench.workloads import Arrivals, Request, apply_arrivals, prompt_text
from kvrouter.errors import ConfigError
from kvrouter.lifecycle import cancel_and_wait

__all__ = ["WORKER_HEADER", "ReplayConfig", "fetch_model", "replay", "run_replay"]

logger = logging.getLogger(__name__)

WORKER_HEADER = "x-kvrouter-worker"
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """How to talk to the endpoint.

    ``max_in_flight`` bounds an open loop: a server that falls that far behind gets
    later requests late (counted as ``late_starts`` in the result) rather than an
    unbounded pile of sockets.
    """

    url: str
    model: str | None = None
    prompt_mode: Literal["tokens", "text"] = "tokens"
    request_timeout_s: float = 600.0
    max_in_flight: int = 2048
    sample_interval_s: float = 1.0


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


@dataclass(slots=True)
class _Outcome:
    """Mutable while a request streams; turned into a RequestRecord at the end."""

    first_token_s: float | None = None
    finish_s: float | None = None
    num_chunks: int = 0
    usage: _Usage | None = None
    worker: int | None = None
    error: str | None = None


def _body(request: Request, config: ReplayConfig, model: str) -> dict[str, Any]:
    text = config.prompt_mode == "text"
    prompt: list[int] | str = prompt_text(request) if text else request.token_list()
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": request.output_length,
        "min_tokens": request.output_length,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def fetch_model(session: aiohttp.ClientSession, url: str) -> str:
    """The first model id ``GET /v1/models`` lists."""
    async with session.get(f"{url}/v1/models") as resp:
        if resp.status != 200:
            raise ConfigError(f"{url}/v1/models answered {resp.status}; pass --model")
        try:
            data = await resp.json(content_type=None)
        except ValueError as exc:
            raise ConfigError(f"{url}/v1/models did not answer JSON; pass --model") from exc
    models = data.get("data") if isinstance(data, dict) else None
    first = models[0] if isinstance(models, list) and models else None
    model_id = first.get("id") if isinstance(first, dict) else None
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"{url}/v1/models lists no model; pass --model")
    return model_id


async def _send(run: _Run, request: Request) -> _Outcome:
    outcome = _Outcome()
    config = run.config
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    body = _body(request, config, run.model)
    try:
        async with run.session.post(
            f"{config.url}/v1/completions", json=body, timeout=timeout
        ) as resp:
            outcome.worker = _worker_of(resp.headers.get(WORKER_HEADER))
            if resp.status != 200:
                text = await resp.text()
                outcome.error = f"HTTP {resp.status}: {text[:200]}"
                return outcome
            await _read_stream(resp, outcome, run.start)
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    except msgspec.DecodeError as exc:
        outcome.error = f"bad stream chunk: {exc}"
    return outcome


async def _read_stream(resp: aiohttp.ClientResponse, outcome: _Outcome, start: float) -> None:
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            outcome.finish_s = time.monotonic() - start
            # Read to the end of the body: closing a connection before the server's
            # final empty chunk makes it see a reset, and the connection is not reused.
            await resp.read()
            return
        chunk = _chunk_decoder.decode(data)
        if chunk.usage is not None:
            outcome.usage = chunk.usage
        if chunk.choices:
            if outcome.first_token_s is None:
                outcome.first_token_s = time.monotonic() - start
            outcome.num_chunks += 1
    outcome.error = "stream ended without [DONE]"


def _worker_of(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _record(request: Request, outcome: _Outcome, sent_s: float) -> RequestRecord:
    usage = outcome.usage
    prompt_tokens = request.input_length
    output_tokens = outcome.num_chunks
    cached = 0
    if usage is not None:
        prompt_tokens = usage.prompt_tokens or prompt_tokens
        output_tokens = usage.completion_tokens or output_tokens
        if usage.prompt_tokens_details is not None:
            cached = usage.prompt_tokens_details.cached_tokens or 0
    error = outcome.error
    if error is None and outcome.first_token_s is None:
        error = "no tokens received"
    return RequestRecord(
        request_id=request.request_id,
        arrival_s=sent_s,
        first_token_s=outcome.first_token_s,
        finish_s=outcome.finish_s if error is None else None,
        prompt_tokens=prompt_tokens,
        cached_tokens=cached,
        output_tokens=output_tokens,
        worker=outcome.worker,
        error=error,
    )


class _Run:
    """One replay: where to send, records, progress and the sampled series."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: ReplayConfig,
        model: str,
        total: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.session = session
        self.config = config
        self.model = model
        self.start = time.monotonic()
        self.records: list[RequestRecord] = []
        self.in_flight = 0
        self.late_starts = 0
        self.cached_reported = False  # any answer had usage.prompt_tokens_details
        self.total = total
        self.progress = progress
        self.series = Series(active={"all": []})
        self._window_prompt = 0
        self._window_cached = 0

    def finish(self, record: RequestRecord) -> None:
        self.records.append(record)
        self._window_prompt += record.prompt_tokens
        self._window_cached += record.cached_tokens
        if self.progress is not None:
            self.progress(len(self.records), self.total)

    def sample(self, now_s: float) -> None:
        self.series.t_s.append(round(now_s, 3))
        self.series.active["all"].append(self.in_flight)
        prompt = self._window_prompt
        self.series.hit_rate.append(self._window_cached / prompt if prompt else None)
        self._window_prompt = self._window_cached = 0


async def replay(
    requests: Sequence[Request],
    arrivals: Arrivals,
    config: ReplayConfig,
    *,
    progress: ProgressCallback | None = None,
) -> RunResult:
    """Send every request, wait for all of them, and summarise.

    >>> # result = await replay(requests, Arrivals("poisson", rate=5), ReplayConfig(url))
    """
    ordered = apply_arrivals(requests, arrivals)
    connector = aiohttp.TCPConnector(limit=config.max_in_flight)
    wall_start = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:
        model = config.model or await fetch_model(session, config.url)
        run = _Run(session, config, model, len(ordered), progress)
        sampler = asyncio.create_task(_sample_loop(run, config.sample_interval_s))
        try:
            if arrivals.closed_loop:
                await _closed_loop(run, ordered, arrivals.concurrency)
            else:
                await _open_loop(run, ordered)
        finally:
            await cancel_and_wait(sampler)
        run.sample(time.monotonic() - run.start)
    extra = {"late_starts": run.late_starts, "model": model}
    result = summarize(
        run.records, wall_s=time.monotonic() - wall_start, series=run.series, extra=extra
    )
    if not run.cached_reported:
        # vLLM reports cached tokens only with --enable-prompt-tokens-details (SGLang:
        # --enable-cache-report): none at all is "unknown", not a reuse of zero.
        result.figures["prefix_reuse"] = None
        result.extra["cached_tokens_reported"] = False
    return result


async def _one(run: _Run, request: Request) -> None:
    sent_s = time.monotonic() - run.start
    run.in_flight += 1
    try:
        outcome = await _send(run, request)
    finally:
        run.in_flight -= 1
    if outcome.usage is not None and outcome.usage.prompt_tokens_details is not None:
        run.cached_reported = True
    run.finish(_record(request, outcome, sent_s))


async def _open_loop(run: _Run, requests: Sequence[Request]) -> None:
    slots = asyncio.Semaphore(run.config.max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def guarded(request: Request) -> None:
        try:
            await _one(run, request)
        finally:
            slots.release()

    for request in requests:
        delay = request.arrival_s - (time.monotonic() - run.start)
        if delay > 0:
            await asyncio.sleep(delay)
        if slots.locked():
            run.late_starts += 1
        await slots.acquire()
        task = asyncio.create_task(guarded(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _closed_loop(run: _Run, requests: Sequence[Request], concurrency: int) -> None:
    pending = iter(requests)

    async def user() -> None:
        for request in pending:
            await _one(run, request)

    await asyncio.gather(*(user() for _ in range(min(concurrency, len(requests)))))


async def _sample_loop(run: _Run, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        run.sample(time.monotonic() - run.start)


def run_replay(
    requests: Sequence[Request],
    arrivals: Arrivals,
    config: ReplayConfig,
    *,
    show_progress: bool = True,
) -> RunResult:
    """Run :func:`replay` on a fresh event loop, with a rich progress bar."""
    if not show_progress:
        return asyncio.run(replay(requests, arrivals, config))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ) as bar:
        task_id = bar.add_task("replay", total=len(requests))

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        return asyncio.run(replay(requests, arrivals, config, progress=update))
