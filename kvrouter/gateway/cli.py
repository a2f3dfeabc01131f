"""Commands of the gateway: ``kvrouter serve``, ``kvrouter run``, ``kvrouter top``,
``kvrouter bench gateway``.

``kvrouter serve --port 8000 --workers http://127.0.0.1:8001 http://127.0.0.1:8002``
runs the router in front of existing workers; every flag also comes from
``KVROUTER_*`` environment variables and a YAML file (``--config``), flags first.
``kvrouter run`` is the embedded default behind ``make run``: the gateway plus
simulated workers on loopback. Heavy imports happen inside the command bodies.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

__all__ = ["register"]


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to the top-level ``app`` and the ``bench`` group."""
    app.command(
        "serve",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(serve)
    app.command("run")(run)
    app.command("top")(top)
    bench.command("gateway")(bench_gateway)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _workers_from_args(workers: list[str] | None, extra: list[str]) -> list[str] | None:
    """``--workers a b c``: click gives ``a`` to the option and ``b c`` as extra args."""
    unknown = [arg for arg in extra if arg.startswith("-")]
    if unknown:
        _fail(f"unknown option(s): {' '.join(unknown)} (see kvrouter serve --help)")
    merged = list(workers or []) + list(extra)
    return merged or None


def serve(
    ctx: typer.Context,
    *,
    config: Path | None = typer.Option(None, help="YAML file of settings (also KVROUTER_CONFIG)."),
    host: str | None = typer.Option(None, help="Address to listen on (default: 127.0.0.1)."),
    port: int | None = typer.Option(
        None, help="Port to listen on; 0: any free port (default: 8000)."
    ),
    workers: list[str] | None = typer.Option(
        None,
        help="Worker URLs, space separated. Each may add its KV event and replay "
        "sockets and ids after commas: URL,kv_events=tcp://h:5557,replay=tcp://h:5558 "
        "(also ,dp_rank=0 ,worker_id=3).",
    ),
    router_mode: str | None = typer.Option(
        None,
        help="kv | prefix_affinity | score | random | round_robin | power_of_two"
        " | least_loaded | direct (default: kv).",
    ),
    router_policy: str | None = typer.Option(
        None, help="A policy name or a user policy 'pkg.mod:func' (overrides --router-mode)."
    ),
    overlap_weight: float | None = typer.Option(
        None, help="kv policy: weight of prefill (default: 1.0)."
    ),
    temperature: float | None = typer.Option(
        None, help="kv policy: softmax temperature (default: 0)."
    ),
    weight_cache: float | None = typer.Option(
        None, help="score policy: cache weight (default: 1.0)."
    ),
    weight_load: float | None = typer.Option(
        None, help="score policy: load weight (default: 1.0)."
    ),
    cache_weight: float | None = typer.Option(
        None, help="prefix_affinity policy: weight of uncached tokens (default: 16)."
    ),
    block_size: int | None = typer.Option(
        None, help="Tokens per KV block; must match workers (default: 16)."
    ),
    tokenizer: str | None = typer.Option(
        None, help="'builtin' (byte level), a tokenizer.json path, or 'worker' (default: builtin)."
    ),
    chat_template: str | None = typer.Option(None, help="Chat template file or text."),
    busy_kv_usage: float | None = typer.Option(
        None, help="A worker over this KV usage (0-1) is busy (default: off)."
    ),
    busy_queue_depth: int | None = typer.Option(
        None, help="A worker with more requests waiting is busy (default: off)."
    ),
    router_queue_threshold: float | None = typer.Option(
        None,
        help="Hold requests at the router while every worker has this many times "
        "max_num_batched_tokens of prompt tokens waiting for prefill (default: off).",
    ),
    router_queue_policy: str | None = typer.Option(
        None,
        help="Router queue order: fcfs, or wspt (fewest uncached tokens first) (default: fcfs).",
    ),
    router_queue_max_pending: int | None = typer.Option(
        None, help="Most requests waiting in the router queue; beyond: 503 (default: unbounded)."
    ),
    max_num_batched_tokens: int | None = typer.Option(
        None,
        help="The workers' max_num_batched_tokens (scales the queue threshold) (default: 8192).",
    ),
    max_body_bytes: int | None = typer.Option(None, help="Largest request body (default: 16 MiB)."),
    max_prompt_tokens: int | None = typer.Option(
        None, help="Longest prompt in tokens (default: 131072)."
    ),
    metrics_scrape_interval_s: float | None = typer.Option(
        None, help="Seconds between scrapes of worker /metrics (default: 1)."
    ),
    health_check_interval_s: float | None = typer.Option(
        None, help="Seconds between worker /health checks (default: 2)."
    ),
    health_check_timeout_s: float | None = typer.Option(
        None, help="Timeout of one worker /health check (default: 2)."
    ),
    request_timeout_s: float | None = typer.Option(
        None, help="Until a worker's answer starts (a whole answer, unstreamed) (default: 300)."
    ),
    stream_idle_timeout_s: float | None = typer.Option(
        None, help="Longest silence inside a streamed answer (default: 300)."
    ),
    connect_timeout_s: float | None = typer.Option(
        None, help="Timeout of connecting to a worker (default: 5)."
    ),
    shutdown_grace_s: float | None = typer.Option(
        None, help="On SIGTERM, how long requests in flight may take to finish (default: 30)."
    ),
    max_retries: int | None = typer.Option(
        None, help="Retries before the first byte (default: 2)."
    ),
    max_connections: int | None = typer.Option(
        None, help="Size of the upstream connection pool (default: 1024)."
    ),
    retry_after_s: float | None = typer.Option(
        None, help="Retry-After seconds when no worker is available (default: 1)."
    ),
    predicted_ttl_s: float | None = typer.Option(
        None, help="Life of predicted entries (default: 120)."
    ),
    decision_log_sample_rate: float | None = typer.Option(
        None, help="Fraction of decisions logged as one JSON line (default: 0)."
    ),
    decision_history: int | None = typer.Option(
        None, help="Decisions kept for /debug/decisions (default: 256)."
    ),
    api_key: str | None = typer.Option(
        None,
        help="Key clients must send as 'Authorization: Bearer' for /v1/* (prefer "
        "KVROUTER_API_KEY: a flag shows in the process list).",
    ),
    admin_api_key: str | None = typer.Option(
        None, help="Key for /admin, /debug and the dashboard's data (default: the --api-key)."
    ),
    worker_api_key: str | None = typer.Option(
        None, help="Key sent to the workers (vLLM --api-key) as 'Authorization: Bearer'."
    ),
    log_level: str = typer.Option(
        "INFO", help="Logging level (default: INFO).", show_default=False
    ),
) -> None:
    """Run the KV-aware router in front of existing workers (vLLM, SGLang, mocker)."""
    # Every parameter but these three is a setting of the same name (None: not given).
    flags: dict[str, Any] = {
        name: value
        for name, value in locals().items()
        if name not in ("ctx", "config", "log_level")
    }
    from kvrouter.gateway.config import build_config

    flags["workers"] = _workers_from_args(workers, list(ctx.args))
    # A bad setting raises ConfigError, which kvrouter.cli reports as one "error:" line.
    _run_async(build_config(flags=flags, file=config), log_level)


def _run_async(cfg: Any, log_level: str) -> None:
    import asyncio
    import logging

    from kvrouter.gateway.server import install_uvloop, serve_forever

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    install_uvloop()
    asyncio.run(serve_forever(cfg))


def run(
    *,
    num_workers: int = typer.Option(4, help="Simulated workers to start."),
    port: int = typer.Option(8000, help="Gateway port (0: any free port)."),
    router_mode: str = typer.Option("kv", help="Routing policy."),
    speedup_ratio: float = typer.Option(10.0, help="Simulated engine speed-up."),
    block_size: int = typer.Option(64, help="Tokens per KV block (workers and router)."),
    log_level: str = typer.Option("WARNING", help="Logging level."),
) -> None:
    """The embedded default: the gateway with simulated workers on loopback."""
    import asyncio
    import logging

    from kvrouter.gateway.embedded import EmbeddedOptions, run_embedded
    from kvrouter.gateway.server import install_uvloop

    if num_workers < 1:
        _fail(f"--num-workers must be at least 1, got {num_workers}")
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    install_uvloop()
    options = EmbeddedOptions(
        num_workers=num_workers,
        port=port,
        router_mode=router_mode,
        speedup_ratio=speedup_ratio,
        block_size=block_size,
    )
    asyncio.run(run_embedded(options))


def top(
    *,
    url: str = typer.Option("http://127.0.0.1:8000", help="The gateway's base URL."),
    interval: float = typer.Option(1.0, help="Seconds between polls."),
) -> None:
    """A live terminal view of a gateway: workers, load, cache, decisions/s (Ctrl-C exits).

    A gateway with keys wants its admin key: KVROUTER_ADMIN_API_KEY, else KVROUTER_API_KEY.
    """
    import functools
    import os

    from kvrouter.gateway.top import fetch_dashboard_data, run_top

    if interval <= 0:
        _fail(f"--interval must be positive, got {interval}")
    if not url.startswith(("http://", "https://")):
        _fail(f"--url must be an http:// or https:// URL, got {url!r}")
    key = os.environ.get("KVROUTER_ADMIN_API_KEY") or os.environ.get("KVROUTER_API_KEY")
    run_top(url, interval, fetch=functools.partial(fetch_dashboard_data, api_key=key))


def bench_gateway(
    *,
    num_requests: int = typer.Option(4000, help="Requests per measured run."),
    concurrency: int = typer.Option(32, help="Requests in flight."),
    num_groups: int = typer.Option(16, help="Prompt groups (shared prefixes)."),
    prompt_chars: int = typer.Option(4000, help="Characters per prompt."),
    stream: bool = typer.Option(False, help="Ask for SSE streams."),
    router_mode: str = typer.Option("kv", help="Routing policy of the gateway."),
    peer: list[str] = typer.Option(
        [],
        metavar="[LABEL=]COMMAND",
        help="Also measure another router: a command that starts it on {port} in front "
        "of {backend} (the backend's URL). Repeatable.",
    ),
    rounds: int = typer.Option(
        1, help="Measure every target this many times, in turn; report the median run."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Gateway overhead: requests/s and added latency vs. straight to a trivial backend.

    Example, side by side with SGLang's router (installed in the same environment):

      kvrouter bench gateway --rounds 3 --peer "sglang=python -m
      sglang_router.launch_router --worker-urls {backend} --port {port}
      --policy cache_aware"
    """
    from kvrouter.gateway.bench import BenchOptions, run_gateway_bench

    try:
        options = BenchOptions(
            num_requests=num_requests,
            concurrency=concurrency,
            num_groups=num_groups,
            prompt_chars=prompt_chars,
            stream=stream,
            router_mode=router_mode,
            peers=tuple(peer),
            rounds=rounds,
        )
    except ValueError as exc:
        _fail(str(exc))
    progress = None if as_json else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        result = run_gateway_bench(options, progress)
    except RuntimeError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(asdict(result)))
        return
    result.print_table(sys.stdout)
