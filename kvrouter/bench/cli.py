"""Commands of the bench area: ``kvrouter demo`` and ``kvrouter bench simulate / replay /
report``; see :mod:`kvrouter.cli` and ``docs/benchmarks.md``.

Heavy imports (numpy, the engine, aiohttp, matplotlib) happen inside the command bodies.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

if TYPE_CHECKING:
    from kvrouter.bench.results import RunResult
    from kvrouter.bench.simulate import SimConfig
    from kvrouter.bench.workloads import Arrivals, Request

__all__ = ["register"]

TraceOpt = Annotated[
    Path | None,
    typer.Option(help="Mooncake-format JSONL trace; without it a built-in workload is used."),
]
WorkloadOpt = Annotated[
    str,
    typer.Option(help="Built-in workload without --trace: multi-turn, shared-prefix, no-reuse."),
]
EventForm = Literal["direct", "array", "map", "map-batch"]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Use only the first N requests.")]
SpeedupOpt = Annotated[
    float, typer.Option(help="Divide trace timestamps by this (open loop, trace arrivals).")
]
RateOpt = Annotated[
    float | None, typer.Option(help="Poisson arrivals at this many requests per second.")
]
ConcurrencyOpt = Annotated[
    int | None, typer.Option(help="Closed loop: keep this many requests in flight.")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of generators, arrivals and policies.")]
QueuePolicy = Literal["fcfs", "wspt"]
QueueThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--queue-threshold",
        "--router-queue-threshold",  # as `kvrouter serve` calls it
        min=0.001,
        help="Router queue: hold requests at the router while every engine has at least "
        "this many times max_num_batched_tokens of prompt tokens waiting for prefill "
        "(default: no queue).",
    ),
]
QueuePolicyOpt = Annotated[
    QueuePolicy,
    typer.Option(
        "--queue-policy",
        "--router-queue-policy",
        help="Order of the router queue: fcfs (arrival order) or wspt (fewest uncached "
        "prompt tokens first).",
    ),
]


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to the top-level ``app`` and the ``bench`` group."""
    bench.command("simulate")(simulate_command)
    bench.command("replay")(replay_command)
    bench.command("report")(report_command)
    app.command("demo")(demo_command)


# ---------------------------------------------------------------------------- inputs


def _load_requests(
    trace: Path | None, workload: str, limit: int | None, seed: int
) -> list[Request]:
    from kvrouter.bench.workloads import builtin_workload, load_mooncake_trace

    if trace is not None:
        if not trace.exists():
            raise typer.BadParameter(f"no such trace file: {trace}", param_hint="--trace")
        return load_mooncake_trace(trace, limit=limit)
    try:
        requests = builtin_workload(workload, seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--workload") from exc
    requests.sort(key=lambda r: r.arrival_s)
    return requests[:limit] if limit is not None else requests


def _arrivals(
    trace: Path | None, speedup: float, rate: float | None, concurrency: int | None, seed: int
) -> Arrivals:
    from kvrouter.bench.workloads import Arrivals

    if rate is not None and concurrency is not None:
        raise typer.BadParameter("give --rate or --concurrency, not both")
    if concurrency is not None:
        return Arrivals("concurrency", concurrency=concurrency, seed=seed)
    if rate is not None:
        return Arrivals("poisson", rate=rate, seed=seed)
    if trace is None and speedup == 1.0:
        return Arrivals("trace", speedup=1.0, seed=seed)
    return Arrivals("trace", speedup=speedup, seed=seed)


def _sim_config(
    *,
    workers: int,
    event_delay_ms: float,
    engine_speedup: float,
    block_size: int,
    num_gpu_blocks: int,
    seed: int,
    metrics_delay_ms: float | None = None,
    max_decode_steps: int = 256,
    event_form: EventForm = "direct",
    queue_threshold: float | None = None,
    queue_policy: QueuePolicy = "fcfs",
) -> SimConfig:
    from kvrouter.bench.simulate import SimConfig
    from kvrouter.engine import EngineConfig
    from kvrouter.errors import ConfigError

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    engine = EngineConfig(
        block_size=block_size, num_gpu_blocks=num_gpu_blocks, speedup_ratio=engine_speedup
    )
    return SimConfig(
        num_workers=workers,
        engine=engine,
        event_delay_s=event_delay_ms / 1e3,
        metrics_delay_s=None if metrics_delay_ms is None else metrics_delay_ms / 1e3,
        seed=seed,
        max_decode_steps=max_decode_steps,
        event_form=event_form,
        queue_threshold=queue_threshold,
        queue_policy=queue_policy,
    )


def _speedups(text: str) -> list[float]:
    """``--sweep 1,2,4``: the speedups, each a positive number."""
    from kvrouter.errors import ConfigError

    speedups = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            speedup = float(item)
        except ValueError:
            speedup = math.nan
        if not speedup > 0:  # also rejects nan
            raise ConfigError(f"--sweep: {item!r} is not a positive number (e.g. --sweep 1,2,4)")
        speedups.append(speedup)
    if not speedups:
        raise ConfigError(f"--sweep: no speedup in {text!r} (e.g. --sweep 1,2,4)")
    return speedups


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise typer.BadParameter("no policy named", param_hint="--policies")
    if "direct" in names:
        raise typer.BadParameter(
            "direct sends each request to the worker its client names; a workload names none",
            param_hint="--policies",
        )
    return names


# -------------------------------------------------------------------------- simulate


def simulate_command(
    *,
    trace: TraceOpt = None,
    workload: WorkloadOpt = "multi-turn",
    workers: Annotated[int, typer.Option(help="Number of simulated engines.")] = 8,
    speedup: SpeedupOpt = 1.0,
    rate: RateOpt = None,
    concurrency: ConcurrencyOpt = None,
    policies: Annotated[
        str, typer.Option(help="Comma-separated policies, run on identical input.")
    ] = "kv,round_robin,random",
    limit: LimitOpt = None,
    sweep: Annotated[
        str | None, typer.Option(help="Comma-separated speedups to sweep, e.g. 1,2,4,6,8,10.")
    ] = None,
    event_delay_ms: Annotated[
        float, typer.Option(help="Transport lag of KV events and metrics (virtual ms).")
    ] = 5.0,
    metrics_delay_ms: Annotated[
        float | None,
        typer.Option(help="Transport lag of load metrics, if not the events' (virtual ms)."),
    ] = None,
    engine_speedup: Annotated[
        float,
        typer.Option(
            "--engine-speedup",
            "--speedup-ratio",  # as `kvrouter mocker` and `run` call it
            help="The engines' speedup ratio (divides every step time).",
        ),
    ] = 1.0,
    block_size: Annotated[int, typer.Option(help="Engine and router block size.")] = 64,
    num_gpu_blocks: Annotated[int, typer.Option(help="KV blocks per engine.")] = 16384,
    max_decode_steps: Annotated[
        int,
        typer.Option(min=1, help="Decode steps an engine may run in one call (1: step by step)."),
    ] = 256,
    event_form: Annotated[
        EventForm,
        typer.Option(
            help="How KV events reach the router: the engine's structs (direct) or "
            "msgpack bytes in one of vLLM's forms (array, map, map-batch)."
        ),
    ] = "direct",
    queue_threshold: QueueThresholdOpt = None,
    queue_policy: QueuePolicyOpt = "fcfs",
    seed: SeedOpt = 0,
    jobs: Annotated[
        int,
        typer.Option(
            min=1, help="Simulations run at once, in worker processes (figures do not change)."
        ),
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write results.json (sweep.json with --sweep, with plot data) and a report here."
        ),
    ] = None,
) -> None:
    """Simulate engines and the real router in virtual time; compare policies."""
    from kvrouter.bench.results import results_document, save_results
    from kvrouter.bench.workloads import prefix_reuse_limit

    requests = _load_requests(trace, workload, limit, seed)
    config = _sim_config(
        workers=workers,
        event_delay_ms=event_delay_ms,
        metrics_delay_ms=metrics_delay_ms,
        engine_speedup=engine_speedup,
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        seed=seed,
        max_decode_steps=max_decode_steps,
        event_form=event_form,
        queue_threshold=queue_threshold,
        queue_policy=queue_policy,
    )
    names = _policies(policies)
    limit_value = prefix_reuse_limit(
        sorted(requests, key=lambda r: r.arrival_s), config.engine.block_size
    )
    meta = {
        "source": str(trace) if trace else f"builtin:{workload}",
        "requests": len(requests),
        "workers": workers,
        "event_delay_ms": event_delay_ms,
        "metrics_delay_ms": event_delay_ms if metrics_delay_ms is None else metrics_delay_ms,
        "engine_speedup": engine_speedup,
        "block_size": block_size,
        "num_gpu_blocks": num_gpu_blocks,
        "seed": seed,
    }
    if queue_threshold is not None:
        meta["queue"] = {"threshold": queue_threshold, "policy": queue_policy}
    if sweep is not None:
        speedups = _speedups(sweep)
        doc = _run_sweep(
            requests,
            names,
            config,
            speedups,
            limit_value=limit_value,
            meta=meta,
            quiet=as_json,
            jobs=jobs,
        )
        if out is not None:
            save_results(out / "sweep.json", doc)
            _write_report([out / "sweep.json"], out, quiet=as_json)
        if as_json:
            print(json.dumps(doc))
        return
    arrivals = _arrivals(trace, speedup, rate, concurrency, seed)
    meta["arrivals"] = _describe(arrivals)
    runs = _run_policies(requests, names, config, arrivals, quiet=as_json, jobs=jobs)
    if out is not None:
        path = save_results(
            out / "results.json", results_document(runs, reuse_limit=limit_value, meta=meta)
        )
        _write_report([path], out, quiet=as_json)
    if as_json:
        print(json.dumps(results_document(runs, reuse_limit=limit_value, full=False)))
    else:
        _print_table(runs, limit_value)


def _describe(arrivals: Arrivals) -> dict[str, Any]:
    if arrivals.kind == "trace":
        return {"kind": "trace", "speedup": arrivals.speedup}
    if arrivals.kind == "poisson":
        return {"kind": "poisson", "rate": arrivals.rate, "seed": arrivals.seed}
    return {"kind": "concurrency", "concurrency": arrivals.concurrency}


def _run_policies(
    requests: list[Request],
    names: list[str],
    config: SimConfig,
    arrivals: Arrivals,
    *,
    quiet: bool,
    jobs: int = 1,
) -> dict[str, RunResult]:
    results = _simulate_all(requests, [(n, arrivals) for n in names], config, quiet, jobs)
    return dict(zip(names, results, strict=True))


def _simulate_all(
    requests: list[Request],
    runs: list[tuple[str, Arrivals]],
    config: SimConfig,
    quiet: bool,
    jobs: int,
) -> list[RunResult]:
    from kvrouter.bench.simulate import simulate_many
    from kvrouter.errors import ConfigError

    def done(index: int, result: RunResult) -> None:
        if not quiet:
            name, arrivals = runs[index]
            at = (
                f" at speedup {arrivals.speedup:g}"
                if len(runs) > 1 and arrivals.kind == "trace"
                else ""
            )
            wall = result.figures["wall_s"]
            print(
                f"{name}{at}: {len(requests)} requests simulated in {wall:.1f} s", file=sys.stderr
            )

    try:
        return simulate_many(requests, runs, config, jobs=jobs, on_done=done)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policies") from exc


def _run_sweep(
    requests: list[Request],
    names: list[str],
    config: SimConfig,
    speedups: list[float],
    *,
    limit_value: float,
    meta: dict[str, Any],
    quiet: bool,
    jobs: int = 1,
) -> dict[str, Any]:
    from kvrouter.bench.workloads import Arrivals

    runs = [
        (name, Arrivals("trace", speedup=speedup, seed=config.seed))
        for speedup in speedups
        for name in names
    ]
    results = iter(_simulate_all(requests, runs, config, quiet, jobs))
    points = []
    for speedup in speedups:
        point_runs = {name: next(results) for name in names}
        if not quiet:
            print(f"trace speedup {speedup:g}:", file=sys.stderr)
            _print_table(point_runs, limit_value)
        policies = {name: run.to_json(full=False) for name, run in point_runs.items()}
        points.append({"speedup": speedup, "policies": policies})
    return {"sweep": points, "reuse_limit": limit_value, "meta": meta}


def _print_table(
    runs: dict[str, RunResult], limit_value: float | Mapping[str, float | None] | None
) -> None:
    """``limit_value``: the workload's reuse limit, or each run's (runs of several files)."""
    from rich.console import Console

    from kvrouter.bench.report import rich_table

    limits = limit_value if isinstance(limit_value, Mapping) else dict.fromkeys(runs, limit_value)
    # Wide enough for every column; a narrower terminal wraps rather than truncates.
    console = Console()
    console.width = max(console.width, 150)
    console.print(rich_table(runs, limits))
    for name, run in runs.items():
        for message, count in run.extra.get("error_messages", {}).items():
            print(f"{name}: {count} failed: {message}", file=sys.stderr)
        if run.extra.get("cached_tokens_reported") is False:
            print(
                f"{name}: the server reported no cached tokens, so prefix reuse is unknown "
                "(vLLM reports them with --enable-prompt-tokens-details, SGLang with "
                "--enable-cache-report)",
                file=sys.stderr,
            )


def _write_report(paths: list[Path], out: Path, *, quiet: bool) -> None:
    from kvrouter.bench.report import write_report

    files = write_report(paths, out)
    if not quiet:
        print(f"report: {files.html} and {files.markdown}", file=sys.stderr)


# ---------------------------------------------------------------------------- replay


def replay_command(
    *,
    url: Annotated[
        str,
        typer.Option(help="Base URL of an OpenAI-compatible server (with or without /v1)."),
    ],
    trace: TraceOpt = None,
    workload: WorkloadOpt = "multi-turn",
    speedup: SpeedupOpt = 1.0,
    rate: RateOpt = None,
    concurrency: ConcurrencyOpt = None,
    limit: LimitOpt = None,
    model: Annotated[
        str | None, typer.Option(help="Model name (default: the first listed).")
    ] = None,
    prompt_mode: Annotated[
        str, typer.Option(help="Send prompts as 'tokens' (token ids) or 'text'.")
    ] = "tokens",
    label: Annotated[str, typer.Option(help="Name of this run in the results.")] = "live",
    timeout_s: Annotated[float, typer.Option(help="Per-request timeout.")] = 600.0,
    seed: SeedOpt = 0,
    out: Annotated[Path, typer.Option(help="Results JSON file to write.")] = Path(
        "replay-results.json"
    ),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Replay a workload against a live endpoint over HTTP and measure it."""
    from kvrouter.bench.replay import ReplayConfig, run_replay
    from kvrouter.bench.results import results_document, save_results
    from kvrouter.bench.workloads import prefix_reuse_limit

    if prompt_mode not in ("tokens", "text"):
        raise typer.BadParameter("must be 'tokens' or 'text'", param_hint="--prompt-mode")
    requests = _load_requests(trace, workload, limit, seed)
    arrivals = _arrivals(trace, speedup, rate, concurrency, seed)
    config = ReplayConfig(
        url=_base_url(url),
        model=model,
        prompt_mode="text" if prompt_mode == "text" else "tokens",
        request_timeout_s=timeout_s,
    )
    result = run_replay(requests, arrivals, config, show_progress=progress)
    limit_value = prefix_reuse_limit(sorted(requests, key=lambda r: r.arrival_s), 64)
    meta = {"url": url, "requests": len(requests), "arrivals": _describe(arrivals)}
    doc = results_document({label: result}, reuse_limit=limit_value, meta=meta)
    save_results(out, doc)
    _print_table({label: result}, limit_value)
    print(f"results: {out}", file=sys.stderr)


def _base_url(url: str) -> str:
    """The server's root: OpenAI clients take a base URL ending in ``/v1``; we add it."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


# ---------------------------------------------------------------------------- report


def report_command(
    results: Annotated[list[Path], typer.Argument(help="Results JSON files.")],
    out: Annotated[Path, typer.Option(help="Folder for report.md, report.html and PNGs.")] = Path(
        "bench-report"
    ),
) -> None:
    """Tables and plots (PNG, markdown, one self-contained HTML page) from results files."""
    from kvrouter.bench.report import collect_runs, read_sweep

    for path in results:
        if not path.exists():
            raise typer.BadParameter(f"no such file: {path}", param_hint="RESULTS")
    runs, limit_value = collect_runs([p for p in results if read_sweep(p) is None])
    if runs:
        _print_table(runs, limit_value)
    _write_report(list(results), out, quiet=False)


# ------------------------------------------------------------------------------ demo


def demo_command(
    *,
    trace: TraceOpt = None,
    limit: Annotated[int, typer.Option(help="Requests taken from --trace.")] = 600,
    speedup: Annotated[float, typer.Option(help="Trace speedup (with --trace).")] = 1.0,
    workers: Annotated[int, typer.Option(help="Simulated engines.")] = 4,
    seed: SeedOpt = 0,
) -> None:
    """kv routing against round robin on the same workload, simulated in a few seconds."""
    from kvrouter.bench.workloads import prefix_reuse_limit

    requests = _load_requests(trace, "multi-turn", limit if trace else None, seed)
    config = _sim_config(
        workers=workers,
        event_delay_ms=5.0,
        engine_speedup=1.0,
        block_size=64,
        num_gpu_blocks=16384,
        seed=seed,
    )
    arrivals = _arrivals(trace, speedup, None, None, seed)
    source = str(trace) if trace else "96 multi-turn chat sessions (built in)"
    print(
        f"workload: {source}, {len(requests)} requests, {workers} simulated engines",
        file=sys.stderr,
    )
    runs = _run_policies(requests, ["kv", "round_robin"], config, arrivals, quiet=False)
    limit_value = prefix_reuse_limit(sorted(requests, key=lambda r: r.arrival_s), 64)
    _print_table(runs, limit_value)
    kv_ttft = runs["kv"].figures["ttft_mean_ms"]
    rr_ttft = runs["round_robin"].figures["ttft_mean_ms"]
    if kv_ttft and rr_ttft:
        print(f"kv mean TTFT is {rr_ttft / kv_ttft:.1f}x lower than round robin's")
