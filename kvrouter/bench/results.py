"""Benchmark results: per-request records, the summary figures, and the JSON file.

The simulator and the live replay both produce one :class:`RunResult` per policy (or
label); a results file holds several of them, so ``kvrouter bench report`` can put a
simulated run next to a live one::

    {"policies": {"kv": {"ttft_mean_ms": ..., ..., "per_worker": {...},
                         "ttft_ms": [...], "series": {...}}},
     "reuse_limit": 0.3736, "meta": {...}}

``summary_figures`` are the headline numbers; the ``ttft_ms`` list and ``series`` are
what the report's plots need and are left out of the one-line ``--json`` output.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrouter.errors import ConfigError

__all__ = [
    "FIGURE_KEYS",
    "RequestRecord",
    "RunResult",
    "Series",
    "load_results",
    "percentile",
    "read_json_file",
    "results_document",
    "save_results",
    "summarize",
]

_ERROR_MESSAGES = 5  # distinct error messages kept per run

FIGURE_KEYS = (
    "ttft_mean_ms",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "itl_mean_ms",
    "e2e_mean_ms",
    "throughput_tok_s",
    "prefix_reuse",
    "completed",
    "wall_s",
)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What happened to one request; times are seconds on the run's own clock.

    ``first_token_s`` / ``finish_s`` are ``None`` when the request failed before
    them; ``worker`` is ``None`` when the driver cannot tell (a live gateway).
    """

    request_id: str
    arrival_s: float
    first_token_s: float | None
    finish_s: float | None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    worker: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None


@dataclass(slots=True)
class Series:
    """Time series sampled during a run (for the report's plots).

    ``active[w][i]`` is worker ``w``'s requests in flight at ``t_s[i]``;
    ``hit_rate[i]`` is the fraction of prompt tokens served from cache by requests
    that finished in the window ending at ``t_s[i]`` (``None``: none finished).
    """

    t_s: list[float] = field(default_factory=list)
    active: dict[str, list[int]] = field(default_factory=dict)
    hit_rate: list[float | None] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"t_s": self.t_s, "active": self.active, "hit_rate": self.hit_rate}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Series:
        return cls(
            t_s=[float(t) for t in data.get("t_s", [])],
            active={str(k): [int(v) for v in vs] for k, vs in data.get("active", {}).items()},
            hit_rate=[None if h is None else float(h) for h in data.get("hit_rate", [])],
        )


@dataclass(frozen=True, slots=True)
class RunResult:
    """One policy's (or one live label's) run: figures plus what the plots need."""

    figures: dict[str, float | int | None]
    per_worker: dict[str, dict[str, float | int]]
    ttft_ms: list[float]
    series: Series
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, *, full: bool = True) -> dict[str, Any]:
        """The policy entry of a results document (``full=False``: figures only)."""
        out: dict[str, Any] = dict(self.figures)
        out.update(self.extra)
        out["per_worker"] = self.per_worker
        if full:
            out["ttft_ms"] = self.ttft_ms
            out["series"] = self.series.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResult:
        figures = {key: data.get(key) for key in FIGURE_KEYS}
        known = {*FIGURE_KEYS, "per_worker", "ttft_ms", "series"}
        return cls(
            figures=figures,
            per_worker={str(k): dict(v) for k, v in data.get("per_worker", {}).items()},
            ttft_ms=[float(x) for x in data.get("ttft_ms", [])],
            series=Series.from_json(data.get("series", {})),
            extra={k: v for k, v in data.items() if k not in known},
        )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, linearly interpolated."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    frac = pos - low
    return sorted_values[low] * (1.0 - frac) + sorted_values[high] * frac


def summarize(
    records: Iterable[RequestRecord],
    *,
    wall_s: float,
    series: Series | None = None,
    extra: Mapping[str, Any] | None = None,
) -> RunResult:
    """Turn per-request records into the headline figures.

    ITL is the mean gap between output tokens over every gap of every request
    (token-weighted), as serving benchmarks usually report it.
    """
    items = list(records)
    done = [r for r in items if r.ok]
    ttft = sorted(
        (r.first_token_s - r.arrival_s) * 1e3 for r in done if r.first_token_s is not None
    )
    e2e = [(r.finish_s - r.arrival_s) * 1e3 for r in done if r.finish_s is not None]
    decode_ms = sum(
        (r.finish_s - r.first_token_s) * 1e3
        for r in done
        if r.finish_s is not None and r.first_token_s is not None
    )
    gaps = sum(max(0, r.output_tokens - 1) for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    span_s = _span_s(done)
    figures: dict[str, float | int | None] = {
        "ttft_mean_ms": _mean(ttft),
        "ttft_p50_ms": _finite(percentile(ttft, 50)),
        "ttft_p90_ms": _finite(percentile(ttft, 90)),
        "ttft_p99_ms": _finite(percentile(ttft, 99)),
        "itl_mean_ms": decode_ms / gaps if gaps else None,
        "e2e_mean_ms": _mean(e2e),
        "throughput_tok_s": output_tokens / span_s if span_s > 0 else None,
        "prefix_reuse": sum(r.cached_tokens for r in done) / prompt_tokens
        if prompt_tokens
        else None,
        "completed": len(done),
        "wall_s": wall_s,
    }
    more: dict[str, Any] = {"requests": len(items), "errors": len(items) - len(done)}
    if more["errors"]:
        # Why they failed: the commonest messages, so a failed run explains itself.
        failed = Counter(r.error or "no tokens" for r in items if not r.ok)
        more["error_messages"] = dict(failed.most_common(_ERROR_MESSAGES))
    more.update(extra or {})
    return RunResult(figures, _per_worker(done), ttft, series or Series(), more)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _span_s(done: Sequence[RequestRecord]) -> float:
    if not done:
        return 0.0
    start = min(r.arrival_s for r in done)
    end = max(r.finish_s for r in done if r.finish_s is not None)
    return end - start


def _per_worker(done: Sequence[RequestRecord]) -> dict[str, dict[str, float | int]]:
    """Requests, tokens and reuse per worker: how evenly the router spread the load."""
    out: dict[str, dict[str, float | int]] = {}
    for r in done:
        if r.worker is None:
            continue
        entry = out.setdefault(
            str(r.worker), {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0}
        )
        entry["requests"] += 1
        entry["prompt_tokens"] += r.prompt_tokens
        entry["cached_tokens"] += r.cached_tokens
    for entry in out.values():
        prompt = entry["prompt_tokens"]
        entry["prefix_reuse"] = entry["cached_tokens"] / prompt if prompt else 0.0
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def results_document(
    runs: Mapping[str, RunResult],
    *,
    reuse_limit: float | None,
    meta: Mapping[str, Any] | None = None,
    full: bool = True,
) -> dict[str, Any]:
    """The JSON document for several runs on one workload."""
    doc: dict[str, Any] = {
        "policies": {name: run.to_json(full=full) for name, run in runs.items()},
        "reuse_limit": reuse_limit,
    }
    if meta:
        doc["meta"] = dict(meta)
    return doc


def save_results(path: str | Path, document: Mapping[str, Any]) -> Path:
    """Write a results document as JSON (creating parent folders)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    return target


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results document; raises ``ConfigError`` if it has no ``policies``."""
    data = read_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("policies"), dict):
        raise ConfigError(f"{path}: not a results file (no 'policies' object)")
    return data


def read_json_file(path: str | Path) -> Any:
    """The JSON value in the file at ``path``; ``ConfigError`` naming the file if it is not JSON."""
    try:
        return json.loads(Path(path).read_bytes())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not JSON (not UTF-8 text)") from exc
