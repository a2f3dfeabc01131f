"""Commands of this area; see :mod:`kvrouter.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to the top-level ``app`` and the ``bench`` group."""
    bench.command("indexer")(bench_indexer)


def bench_indexer(  # noqa: PLR0917 (typer maps each parameter to an option)
    trace: Annotated[
        Path | None,
        typer.Option(help="Mooncake-format trace (JSON lines with hash_ids); not with --scale."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Fleet size (default 16; 1024 with --scale).")
    ] = None,
    cap_blocks: Annotated[int, typer.Option(help="LRU cache of each worker, blocks.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Seed of the routing choices and queries.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Replay only the first N requests.")] = None,
    repeats: Annotated[int, typer.Option(help="Replays; the fastest one is reported.")] = 3,
    scale: Annotated[
        bool, typer.Option("--scale", help="Synthetic fleet past 10M entries instead of a trace.")
    ] = False,
    scale_entries: Annotated[
        int, typer.Option(help="Scale mode: (block, worker) entries to index.")
    ] = 10_500_000,
    predicted: Annotated[
        bool,
        typer.Option(
            "--predicted",
            help="Time add_predicted_sequence (booking): small, or --scale-entries with --scale.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time KvIndexer: events applied, find_matches throughput and latency, memory."""
    import json

    from kvrouter.index import bench as index_bench

    if trace is not None and (scale or predicted):
        flag = "--scale" if scale else "--predicted"
        raise typer.BadParameter(f"a trace is not used with {flag}", param_hint="--trace")
    result: Any
    if predicted:
        from kvrouter.index.predicted_bench import SMALL_ENTRIES, run_predicted

        result = run_predicted(
            workers=workers or (1024 if scale else 16),
            target_entries=scale_entries if scale else SMALL_ENTRIES,
            seed=seed,
        )
    elif scale:
        result = index_bench.run_scale(
            workers=workers or 1024, target_entries=scale_entries, seed=seed
        )
    else:
        if trace is None:
            raise typer.BadParameter("give --trace PATH, or --scale", param_hint="--trace")
        if not trace.exists():
            raise typer.BadParameter(f"no such file: {trace}", param_hint="--trace")
        result = index_bench.run_trace(
            trace,
            workers=workers or 16,
            cap_blocks=cap_blocks,
            seed=seed,
            limit=limit,
            repeats=repeats,
        )
    figures = _flatten(index_bench.as_dict(result))
    if as_json:
        typer.echo(json.dumps(figures))
        return
    for name, value in figures.items():
        typer.echo(f"{name:<28} {_show(value)}")


def _flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested results (the phases of ``--predicted``) as ``phase.name`` keys."""
    out: dict[str, Any] = {}
    for name, value in figures.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
