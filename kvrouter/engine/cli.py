"""Commands of the simulated engine: ``kvrouter mocker`` and ``kvrouter bench engine``.

``kvrouter mocker --num-workers 4 --base-port 8001 --kv-events-base-port 5557`` runs
four simulated vLLM workers; worker ``i`` serves HTTP on ``base_port + i``, publishes
KV events on ``kv_events_base_port + i`` and answers replay requests on
``replay_base_port + i``. A base port of 0 lets the system pick free ports; the
addresses are printed either way. See ``docs/mocker.md``.

Heavy imports (aiohttp, zmq, the engine) happen inside the command bodies so that
``kvrouter --help`` stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from kvrouter.engine.server import EngineServer
    from kvrouter.events.vllm import EventForm

__all__ = ["EngineBenchResult", "MockerOptions", "WorkerAddresses", "register", "start_workers"]

_CHILD_POLL_S = 0.1  # how often ``--processes`` looks at its workers
_CHILD_STOP_TIMEOUT_S = 15.0  # then a worker that ignores SIGTERM is killed


@dataclass(frozen=True, slots=True)
class MockerOptions:
    """Settings of ``kvrouter mocker`` (one value for every worker it starts)."""

    num_workers: int = 1
    host: str = "127.0.0.1"
    base_port: int = 8001
    kv_events_base_port: int | None = 5557
    replay_base_port: int | None = None
    metrics_base_port: int | None = None
    kv_events_topic: str = ""
    kv_events_form: EventForm = "array"
    nats_url: str | None = None  # publish KV events and metrics on NATS, not ZeroMQ
    worker_id_base: int = 0
    block_size: int = 64
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    speedup_ratio: float = 1.0
    model_name: str = "kvrouter-mock"
    max_model_len: int = 131072
    tokenizer: str | None = None
    chat_template: str | None = None

    def port(self, base: int | None, index: int) -> int | None:
        """Worker ``index``'s port from ``base`` (0: any free port; None: disabled)."""
        if base is None:
            return None
        return 0 if base == 0 else base + index


@dataclass(frozen=True, slots=True)
class WorkerAddresses:
    """Where one started worker listens."""

    worker_id: int
    http_url: str
    kv_events: str | None
    replay: str | None
    metrics: str | None = None

    def describe(self) -> str:
        events, replay, metrics = self.kv_events or "-", self.replay or "-", self.metrics or "-"
        return (
            f"worker {self.worker_id}: http {self.http_url} kv-events {events} "
            f"replay {replay} metrics {metrics}"
        )


async def start_worker(
    options: MockerOptions, index: int, stack: AsyncExitStack
) -> tuple[EngineServer, WorkerAddresses]:
    """Start worker ``index`` (core, KV event publisher, HTTP server) inside ``stack``."""
    from kvrouter.engine import EngineConfig, EngineCore
    from kvrouter.engine.server import EngineServer, ServerConfig
    from kvrouter.errors import ConfigError
    from kvrouter.tokenizer import load_tokenizer

    worker_id = options.worker_id_base + index
    tokenizer = load_tokenizer(options.tokenizer, options.chat_template)
    config = EngineConfig(
        block_size=options.block_size,
        num_gpu_blocks=options.num_gpu_blocks,
        max_num_seqs=options.max_num_seqs,
        max_num_batched_tokens=options.max_num_batched_tokens,
        speedup_ratio=options.speedup_ratio,
    )
    core = EngineCore(config, worker_id=worker_id)
    publisher = await _start_publisher(options, index, stack)
    metrics_publisher = await _start_metrics_publisher(options, index, stack)
    server_config = ServerConfig(
        host=options.host,
        port=options.port(options.base_port, index) or 0,
        model_name=options.model_name,
        max_model_len=options.max_model_len,
    )
    server = EngineServer(
        core,
        tokenizer,
        server_config,
        kv_publisher=publisher,
        metrics_publisher=metrics_publisher,
    )
    try:
        await stack.enter_async_context(server)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(
            f"worker {worker_id}: cannot listen for HTTP on "
            f"{options.host}:{server_config.port}: {why}"
        ) from exc
    transport = publisher.transport if publisher is not None else None
    addresses = WorkerAddresses(
        worker_id=worker_id,
        http_url=server.url,
        kv_events=transport.publish_address if transport is not None else None,
        replay=transport.replay_address if transport is not None else None,
        metrics=(
            metrics_publisher.transport.publish_address if metrics_publisher is not None else None
        ),
    )
    nats_url = options.nats_url
    if nats_url:  # subjects are printed as nats://host:port/subject, as the gateway takes them
        addresses = replace(
            addresses,
            kv_events=_on_nats(nats_url, addresses.kv_events),
            replay=_on_nats(nats_url, addresses.replay),
            metrics=_on_nats(nats_url, addresses.metrics),
        )
    return server, addresses


def _on_nats(nats_url: str, subject: str | None) -> str | None:
    from kvrouter.transport.nats_transport import nats_endpoint

    return None if subject is None else nats_endpoint(nats_url, subject)


def _event_transport(options: MockerOptions, subject: str, port: int, **zmq: Any) -> Any:
    """The worker's transport for one stream: a NATS subject, or a ZeroMQ port."""
    from kvrouter.transport.base import make_event_transport

    if options.nats_url:
        return make_event_transport("nats", servers=options.nats_url, address=subject)
    return make_event_transport("zmq", endpoint=_zmq_endpoint(options.host, port), **zmq)


async def _start_publisher(options: MockerOptions, index: int, stack: AsyncExitStack) -> Any:
    events_port = options.port(options.kv_events_base_port, index)
    if events_port is None:
        return None
    from kvrouter.transport.publisher import KvEventPublisher

    replay_port = options.port(options.replay_base_port, index)
    transport = _event_transport(
        options,
        f"kvr.events.w{options.worker_id_base + index}",
        events_port,
        replay_endpoint=None if replay_port is None else _zmq_endpoint(options.host, replay_port),
    )
    publisher = KvEventPublisher(
        transport,
        block_size=options.block_size,
        topic=options.kv_events_topic,
        form=options.kv_events_form,
    )
    return await stack.enter_async_context(publisher)


async def _start_metrics_publisher(
    options: MockerOptions, index: int, stack: AsyncExitStack
) -> Any:
    port = options.port(options.metrics_base_port, index)
    if port is None:
        return None
    from kvrouter.transport.metrics import WorkerMetricsPublisher

    subject = f"kvr.metrics.w{options.worker_id_base + index}"
    transport = _event_transport(options, subject, port)
    return await stack.enter_async_context(WorkerMetricsPublisher(transport))


def _event_form(value: str) -> EventForm:
    from kvrouter.events.vllm import EVENT_FORMS

    if value not in EVENT_FORMS:
        raise typer.BadParameter(
            f"{value!r} is not one of {', '.join(EVENT_FORMS)}", param_hint="--kv-events-form"
        )
    return value


def _zmq_endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port if port else '*'}"


async def start_workers(
    options: MockerOptions, stack: AsyncExitStack
) -> list[tuple[EngineServer, WorkerAddresses]]:
    """Start ``options.num_workers`` workers in this event loop, all owned by ``stack``."""
    return [await start_worker(options, i, stack) for i in range(options.num_workers)]


async def _serve_in_process(options: MockerOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        workers = await start_workers(options, stack)
        for _, addresses in workers:
            _say(addresses.describe())
        _say(f"ready: {len(workers)} worker(s) serving model {options.model_name}")
        await stop.wait()
        _say("shutting down")


def _say(line: str) -> None:
    """One line to stdout in one write: with ``--processes`` the workers share the
    parent's stdout, and ``print`` unbuffered (``PYTHONUNBUFFERED``) writes the text and
    its newline separately, so two workers' lines could interleave mid-line."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _serve_in_processes(options: MockerOptions) -> None:
    """One child process per worker; signals are forwarded, children are reaped.

    The workers stand or fall together: when one exits on its own (it could not bind its
    port, say, or it crashed), the others are stopped too and the command fails, rather
    than serving a fleet with a hole in it until someone notices."""
    # Own sessions: a terminal's Ctrl-C reaches only this process, which forwards it
    # once; a child signalled twice could die mid-shutdown.
    children = [
        subprocess.Popen(_child_command(options, i), start_new_session=True)
        for i in range(options.num_workers)
    ]
    stopping = False

    def stop_all(signum: int) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    def forward(signum: int, frame: object) -> None:
        stop_all(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    deadline: float | None = None
    while None in (codes := [child.poll() for child in children]):
        failed = next((i for i, code in enumerate(codes) if code is not None), None)
        if not stopping and failed is not None:
            print(
                f"worker {options.worker_id_base + failed} exited with status {codes[failed]}; "
                "stopping the other workers",
                file=sys.stderr,
            )
            stop_all(signal.SIGTERM)
        if stopping and deadline is None:
            deadline = time.monotonic() + _CHILD_STOP_TIMEOUT_S
        if deadline is not None and time.monotonic() > deadline:
            for child in children:
                if child.poll() is None:
                    child.kill()
        time.sleep(_CHILD_POLL_S)
    if any(codes):
        raise typer.Exit(max(abs(code or 0) for code in codes))


def _child_command(options: MockerOptions, index: int) -> list[str]:
    child = replace(
        options,
        num_workers=1,
        worker_id_base=options.worker_id_base + index,
        base_port=options.port(options.base_port, index) or 0,
        kv_events_base_port=options.port(options.kv_events_base_port, index),
        replay_base_port=options.port(options.replay_base_port, index),
        metrics_base_port=options.port(options.metrics_base_port, index),
    )
    args = [sys.executable, "-m", "kvrouter", "mocker"]
    for name, value in asdict(child).items():
        disabled_port = name.endswith("_base_port") and value is None
        if disabled_port:
            args += [f"--{name.replace('_', '-')}", "-1"]  # the command line's "disabled"
        elif value is not None and name != "num_workers":
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def run_event_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# --- bench engine -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineBenchResult:
    """What ``kvrouter bench engine`` measured."""

    num_requests: int
    concurrency: int
    input_tokens: int
    output_tokens: int
    stream: bool
    elapsed_s: float
    requests_per_s: float
    output_tokens_per_s: float
    worker_cpu_s: float | None
    worker_cpu_per_request_ms: float | None
    num_errors: int


async def _bench_client(
    url: str,
    num_requests: int,
    concurrency: int,
    *,
    input_len: int,
    output_len: int,
    stream: bool,
) -> tuple[float, int, int]:
    """Send the requests; returns (elapsed_s, output tokens received, errors)."""
    import aiohttp

    received = 0
    errors = 0
    next_index = 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal received, errors
        # Distinct first token per request: no two prompts share a cached prefix.
        prompt = [1000 + i % 30000] + [7] * (input_len - 1)
        body = {"prompt": prompt, "max_tokens": output_len, "stream": stream, "ignore_eos": True}
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                errors += 1
                await response.read()
                return
            if stream:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        received += 1
            else:
                payload = await response.json()
                received += payload["usage"]["completion_tokens"]

    async def lane(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < num_requests:
            i = next_index
            next_index += 1
            await one(session, i)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(lane(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, received, errors


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux ``/proc``); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def _wait_healthy(url: str, timeout_s: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker at {url} not healthy after {timeout_s} s")
            await asyncio.sleep(0.05)


def run_engine_bench(
    *,
    num_requests: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    stream: bool,
    speedup_ratio: float,
) -> EngineBenchResult:
    """Start one worker process, load it from this process, measure it."""
    from kvrouter.bench.net import free_port

    port = free_port()
    options = MockerOptions(
        base_port=port, kv_events_base_port=0, speedup_ratio=speedup_ratio, block_size=64
    )
    worker = subprocess.Popen(_child_command(options, 0), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        run_event_loop(_wait_healthy(url, 30.0))
        # A short warm-up so imports and first-request costs are not measured.
        send = functools.partial(
            _bench_client, url, input_len=input_len, output_len=output_len, stream=stream
        )
        run_event_loop(send(20, 4))
        cpu_before = _process_cpu_s(worker.pid)
        elapsed, received, errors = run_event_loop(send(num_requests, concurrency))
        cpu_after = _process_cpu_s(worker.pid)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    cpu_s = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return EngineBenchResult(
        num_requests=num_requests,
        concurrency=concurrency,
        input_tokens=input_len,
        output_tokens=output_len,
        stream=stream,
        elapsed_s=elapsed,
        requests_per_s=num_requests / elapsed,
        output_tokens_per_s=received / elapsed,
        worker_cpu_s=cpu_s,
        worker_cpu_per_request_ms=None if cpu_s is None else 1000.0 * cpu_s / num_requests,
        num_errors=errors,
    )


# --- registration -----------------------------------------------------------------


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to the top-level ``app`` and the ``bench`` group."""
    app.command("mocker")(mocker)
    bench.command("engine")(bench_engine)


def mocker(
    *,
    num_workers: int = typer.Option(1, help="Workers to start."),
    host: str = typer.Option("127.0.0.1", help="Address to bind HTTP and ZeroMQ on."),
    base_port: int = typer.Option(8001, help="HTTP port of worker 0 (0: any free port)."),
    kv_events_base_port: int = typer.Option(
        5557, help="KV event PUB port of worker 0 (0: any free port; -1: no events)."
    ),
    replay_base_port: int = typer.Option(
        -1, help="Replay ROUTER port of worker 0 (0: any free port; -1: no replay)."
    ),
    metrics_base_port: int = typer.Option(
        -1, help="Load-metrics PUB port of worker 0 (0: any free port; -1: none)."
    ),
    kv_events_topic: str = typer.Option("", help="Topic frame of every KV event message."),
    kv_events_form: str = typer.Option(
        "array",
        help="KV event encoding: array (older vLLM, SGLang), map (map events), "
        "map-batch (the newest vLLM: the batch a map too).",
    ),
    nats_url: str = typer.Option(
        "",
        help="Publish KV events and pushed metrics on this NATS server, on subjects "
        "kvr.events.w{id} (replay: .replay) and kvr.metrics.w{id}, instead of ZeroMQ "
        "ports (the port options then only switch a stream on or off).",
    ),
    worker_id_base: int = typer.Option(0, help="Worker id of worker 0."),
    block_size: int = typer.Option(64, help="Tokens per KV block."),
    num_gpu_blocks: int = typer.Option(16384, help="KV blocks per worker."),
    max_num_seqs: int = typer.Option(256, help="Most requests running at once."),
    max_num_batched_tokens: int = typer.Option(8192, help="Most tokens in one step."),
    speedup_ratio: float = typer.Option(1.0, help="Divide every step time by this."),
    model_name: str = typer.Option("kvrouter-mock", help="Served model name."),
    max_model_len: int = typer.Option(131072, help="Longest prompt + output, in tokens."),
    tokenizer: str = typer.Option("byte", help="'byte' or a tokenizer.json path."),
    chat_template: str | None = typer.Option(None, help="Chat template file."),
    processes: bool = typer.Option(False, "--processes", help="One process per worker."),
) -> None:
    """Run simulated vLLM workers until interrupted (SIGINT / SIGTERM)."""
    options = MockerOptions(
        num_workers=num_workers,
        host=host,
        base_port=base_port,
        kv_events_base_port=None if kv_events_base_port < 0 else kv_events_base_port,
        replay_base_port=None if replay_base_port < 0 else replay_base_port,
        metrics_base_port=None if metrics_base_port < 0 else metrics_base_port,
        kv_events_topic=kv_events_topic,
        kv_events_form=_event_form(kv_events_form),
        nats_url=nats_url or None,
        worker_id_base=worker_id_base,
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        speedup_ratio=speedup_ratio,
        model_name=model_name,
        max_model_len=max_model_len,
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    if num_workers < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--num-workers")
    if processes and num_workers > 1:
        _serve_in_processes(options)
    else:
        run_event_loop(_serve_in_process(options))


def bench_engine(
    *,
    num_requests: int = typer.Option(2000, help="Requests to send."),
    concurrency: int = typer.Option(64, help="Requests in flight."),
    input_len: int = typer.Option(512, help="Prompt tokens per request."),
    output_len: int = typer.Option(64, help="Output tokens per request."),
    stream: bool = typer.Option(True, help="Stream (SSE) or not."),
    speedup_ratio: float = typer.Option(1e6, help="Step-time divisor; high = timing is free."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """How many requests/s and streamed tokens/s one simulated worker process serves."""
    result = run_engine_bench(
        num_requests=num_requests,
        concurrency=concurrency,
        input_len=input_len,
        output_len=output_len,
        stream=stream,
        speedup_ratio=speedup_ratio,
    )
    if as_json:
        print(json.dumps(asdict(result)))
        return
    print(
        f"one worker process, {num_requests} requests x {input_len} in / {output_len} out, "
        f"concurrency {concurrency}, stream={stream}, speedup {speedup_ratio:g}"
    )
    print(f"  elapsed             {result.elapsed_s:8.2f} s")
    print(f"  requests/s          {result.requests_per_s:8.1f}")
    print(f"  output tokens/s     {result.output_tokens_per_s:8.0f}")
    if result.worker_cpu_per_request_ms is not None:
        print(f"  worker CPU/request  {result.worker_cpu_per_request_ms:8.3f} ms")
    print(f"  errors              {result.num_errors:8d}")
