"""Reports: tables and plots from results files.

``kvrouter bench report RESULTS.json... --out DIR`` writes::

    DIR/report.md        the table, in markdown (for a README)
    DIR/report.html      one self-contained page: table + every plot, PNGs inlined
    DIR/ttft_cdf.png     TTFT CDF of every run
    DIR/load.png         requests in flight per worker over time, one panel per run
    DIR/hit_rate.png     prefix-cache hit rate over time
    DIR/sweep.png        mean TTFT against speedup (only for sweep results)
    DIR/sweep_throughput.png  output tokens/s against speedup (sweeps)

A results file is either one run per policy (``{"policies": ..., "reuse_limit": ...}``)
or a sweep (``{"sweep": [{"speedup": s, "policies": ...}, ...], ...}``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrouter.bench.results import RunResult, load_results, read_json_file
from kvrouter.errors import ConfigError

__all__ = [
    "ReportFiles",
    "collect_runs",
    "common_limit",
    "load_imbalance",
    "markdown_table",
    "read_sweep",
    "rich_table",
    "sweep_markdown",
    "table_rows",
    "write_report",
]

_COLUMNS = (
    ("run", "run"),
    ("TTFT mean ms", "ttft_mean_ms"),
    ("p50", "ttft_p50_ms"),
    ("p90", "ttft_p90_ms"),
    ("p99", "ttft_p99_ms"),
    ("ITL ms", "itl_mean_ms"),
    ("E2E ms", "e2e_mean_ms"),
    ("tok/s", "throughput_tok_s"),
    ("reuse", "prefix_reuse"),
    ("of limit", "reuse_of_limit"),
    ("imbalance", "imbalance"),
    ("done", "completed"),
    ("errors", "errors"),
    ("wall s", "wall_s"),
)


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    markdown: Path
    html: Path
    images: tuple[Path, ...]


def collect_runs(
    paths: Sequence[str | Path],
) -> tuple[dict[str, RunResult], dict[str, float | None]]:
    """Every run of every (non-sweep) results file, and each run's reuse limit.

    A run is compared with the limit of the workload it ran, so each keeps its own
    file's ``reuse_limit``. Runs are named by policy; a policy found in several files is
    named ``SOURCE:policy`` in each, SOURCE being the file's stem, or its folder's name
    for the ``results.json`` that ``--out`` writes.
    """
    docs = [(Path(path), load_results(path)) for path in paths]
    seen = Counter(name for _, doc in docs for name in doc["policies"])
    runs: dict[str, RunResult] = {}
    limits: dict[str, float | None] = {}
    for path, doc in docs:
        limit = doc.get("reuse_limit")
        for name, data in doc["policies"].items():
            key = name if seen[name] == 1 else f"{_source_name(path)}:{name}"
            base, n = key, 2
            while key in runs:
                key, n = f"{base}#{n}", n + 1
            runs[key] = RunResult.from_json(data)
            limits[key] = None if limit is None else float(limit)
    return runs, limits


def _source_name(path: Path) -> str:
    if path.stem == "results" and path.parent.name:
        return path.parent.name
    return path.stem


def common_limit(limits: Mapping[str, float | None]) -> float | None:
    """The reuse limit every run shares (``None`` when they differ or none is known)."""
    values = set(limits.values())
    return values.pop() if len(values) == 1 else None


def load_imbalance(run: RunResult) -> float | None:
    """Max over mean prompt tokens per worker (1.0: perfectly even; ``None``: unknown)."""
    tokens = [float(w.get("prompt_tokens", 0)) for w in run.per_worker.values()]
    if len(tokens) < 2 or sum(tokens) == 0:
        return None
    return max(tokens) / (sum(tokens) / len(tokens))


def table_rows(
    runs: Mapping[str, RunResult], limits: Mapping[str, float | None]
) -> list[dict[str, Any]]:
    """One dict per run with every column of the table (values, not strings)."""
    rows = []
    for name, run in runs.items():
        row: dict[str, Any] = {"run": name, **run.figures}
        reuse = run.figures.get("prefix_reuse")
        reuse_limit = limits.get(name)
        row["reuse_of_limit"] = reuse / reuse_limit if reuse is not None and reuse_limit else None
        row["imbalance"] = load_imbalance(run)
        row["errors"] = run.extra.get("errors")
        rows.append(row)
    return rows


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if key in ("prefix_reuse", "reuse_of_limit"):
        return f"{value:.1%}"
    if key in ("completed", "errors"):
        return str(int(value))
    if key in ("imbalance", "wall_s"):
        return f"{value:.2f}"
    return f"{value:,.1f}"


def markdown_table(runs: Mapping[str, RunResult], limits: Mapping[str, float | None]) -> str:
    """The table as GitHub markdown, with the reuse limit under it."""
    lines = [
        "| " + " | ".join(title for title, _ in _COLUMNS) + " |",
        "|" + "|".join("---" if key == "run" else "---:" for _, key in _COLUMNS) + "|",
    ]
    for row in table_rows(runs, limits):
        lines.append("| " + " | ".join(_fmt(key, row.get(key)) for _, key in _COLUMNS) + " |")
    caption = _limit_caption(limits)
    if caption:
        lines.append("")
        lines.append(caption + ".")
    return "\n".join(lines) + "\n"


def _limit_caption(limits: Mapping[str, float | None]) -> str | None:
    shared = common_limit(limits)
    if shared is not None:
        return f"Prefix-reuse limit (one infinite cache): {shared:.1%}"
    if any(v is not None for v in limits.values()):
        return "Of limit: each run's reuse over the limit of its own workload"
    return None


def rich_table(runs: Mapping[str, RunResult], limits: Mapping[str, float | None]) -> Any:
    """The table for the terminal (a ``rich.table.Table``)."""
    from rich.table import Table

    table = Table(caption=_limit_caption(limits))
    for title, key in _COLUMNS:
        table.add_column(title, justify="left" if key == "run" else "right")
    for row in table_rows(runs, limits):
        table.add_row(*(_fmt(key, row.get(key)) for _, key in _COLUMNS))
    return table


def sweep_markdown(sweep: Sequence[Mapping[str, Any]], key: str = "ttft_mean_ms") -> str:
    """A speedup x policy table of one figure from a sweep document's ``sweep`` list."""
    names = sorted({name for point in sweep for name in point["policies"]})
    lines = [
        "| speedup | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for point in sweep:
        cells = [_fmt(key, point["policies"].get(name, {}).get(key)) for name in names]
        lines.append(f"| {point['speedup']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def plot_ttft_cdf(runs: Mapping[str, RunResult]) -> bytes:
    """TTFT CDF of every run (log-scaled x)."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, run in runs.items():
        values = sorted(v for v in run.ttft_ms if v > 0)
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_load(runs: Mapping[str, RunResult]) -> bytes:
    """Requests in flight per worker over time: one panel per run, one line per worker."""
    shown = [(name, run) for name, run in runs.items() if run.series.t_s]
    fig = _figure(7.0, 2.4 * max(1, len(shown)))
    for i, (name, run) in enumerate(shown):
        ax = fig.add_subplot(len(shown), 1, i + 1)
        for worker, values in run.series.active.items():
            ax.plot(run.series.t_s[: len(values)], values, linewidth=0.8, label=worker)
        ax.set_title(f"{name}: requests in flight per worker", fontsize=9)
        ax.set_ylabel("requests")
        ax.grid(True, alpha=0.3)
    if shown:
        fig.axes[-1].set_xlabel("time (s)")
    return _png(fig)


def plot_hit_rate(runs: Mapping[str, RunResult], reuse_limit: float | None) -> bytes:
    """Prefix-cache hit rate over time, per run; the reuse limit as a dashed line."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, run in runs.items():
        points = [
            (t, h)
            for t, h in zip(run.series.t_s, run.series.hit_rate, strict=False)
            if h is not None
        ]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=0.9, label=name)
    if reuse_limit is not None:
        ax.axhline(reuse_limit, color="grey", linestyle="--", label="limit")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("prompt tokens from cache")
    ax.set_title("Prefix-cache hit rate over time")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_sweep(
    sweep: Sequence[Mapping[str, Any]], key: str = "ttft_mean_ms", *, log_y: bool = True
) -> bytes:
    """One figure against speedup, one line per policy (log-scaled y unless ``log_y``
    is false)."""
    fig = _figure()
    ax = fig.add_subplot()
    names = sorted({name for point in sweep for name in point["policies"]})
    for name in names:
        xs, ys = [], []
        for point in sweep:
            value = point["policies"].get(name, {}).get(key)
            if value is not None and value > 0 and math.isfinite(value):
                xs.append(point["speedup"])
                ys.append(value)
        ax.plot(xs, ys, marker="o", label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("trace speedup")
    ax.set_ylabel(key)
    ax.set_title(f"{key} against load")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)


# -------------------------------------------------------------------------- output

_SWEEP_TABLES = (
    ("Mean TTFT (ms)", "ttft_mean_ms"),
    ("Output tokens/s", "throughput_tok_s"),
    ("Prefix reuse", "prefix_reuse"),
)


def write_report(paths: Sequence[str | Path], out_dir: str | Path) -> ReportFiles:
    """Read results files and write the markdown, the PNGs and the HTML page."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_paths: list[str | Path] = []
    sweeps: list[list[dict[str, Any]]] = []
    for path in paths:
        sweep = read_sweep(path)
        if sweep is None:
            run_paths.append(path)
        else:
            sweeps.append(sweep)
    runs, limits = collect_runs(run_paths)
    images: dict[str, bytes] = {}
    parts: list[str] = []
    if runs:
        parts.append(markdown_table(runs, limits))
        images["ttft_cdf.png"] = plot_ttft_cdf(runs)
        images["load.png"] = plot_load(runs)
        images["hit_rate.png"] = plot_hit_rate(runs, common_limit(limits))
    for i, sweep in enumerate(sweeps):
        suffix = str(i or "")
        for title, key in _SWEEP_TABLES:
            parts.append(f"{title} by speedup:\n\n" + sweep_markdown(sweep, key))
        images[f"sweep{suffix}.png"] = plot_sweep(sweep)
        images[f"sweep_throughput{suffix}.png"] = plot_sweep(sweep, "throughput_tok_s", log_y=False)
    written = []
    for name, data in images.items():
        target = out / name
        target.write_bytes(data)
        written.append(target)
    markdown = out / "report.md"
    markdown.write_text("# Benchmark report\n\n" + "\n".join(parts))
    page = out / "report.html"
    page.write_text(_html_page(parts, images))
    return ReportFiles(markdown, page, tuple(written))


def read_sweep(path: str | Path) -> list[dict[str, Any]] | None:
    """The ``sweep`` list of a sweep results file; ``None`` for a plain results file."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a results file")
    sweep = data.get("sweep")
    if sweep is None:
        return None
    if not isinstance(sweep, list):
        raise ConfigError(f"{path}: 'sweep' is not a list")
    return sweep


def _html_page(parts: Sequence[str], images: Mapping[str, bytes]) -> str:
    body = []
    for part in parts:
        body.append(_markdown_table_html(part))
    for name, data in images.items():
        encoded = base64.b64encode(data).decode()
        body.append(
            f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
            f'src="data:image/png;base64,{encoded}">'
        )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>kvrouter benchmark</title>"
        f"<style>{style}</style></head><body><h1>kvrouter benchmark</h1>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def _markdown_table_html(markdown: str) -> str:
    """The few markdown shapes this module writes (text lines and pipe tables) as HTML."""
    out: list[str] = []
    rows: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            tag = "th" if not rows else "td"
            rows.append(
                "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"
            )
            continue
        if rows:
            out.append("<table>" + "".join(rows) + "</table>")
            rows = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if rows:
        out.append("<table>" + "".join(rows) + "</table>")
    return "\n".join(out)
