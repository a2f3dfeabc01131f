"""Parse vLLM / SGLang Prometheus ``/metrics`` text into one load snapshot (DESIGN 3.3).

Only the text exposition format is read, and only the handful of series the router
needs. Labels are parsed (so quoted commas and braces cannot confuse the parser) but
otherwise ignored: an engine that exposes one series per model or per engine core is
summed for counts and averaged for fractions. Lines that do not parse are skipped and
counted, never fatal.

>>> snap = parse_engine_metrics('vllm:num_requests_running{model_name="m"} 3.0\\n')
>>> snap.engine, snap.num_requests_running
('vllm', 3)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["EngineSnapshot", "Sample", "iter_samples", "parse_engine_metrics"]

# name, optional {labels}, value, optional timestamp.
_SAMPLE_RE = re.compile(
    r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"(?:\{(?P<labels>(?:[^\"}]|\"(?:[^\"\\]|\\.)*\")*)\})?"
    r"[ \t]+(?P<value>\S+)(?:[ \t]+(?P<ts>-?\d+))?[ \t]*$"
)
_LABEL_RE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')

_VLLM_RUNNING = "vllm:num_requests_running"
_VLLM_WAITING = "vllm:num_requests_waiting"
_VLLM_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_VLLM_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
_VLLM_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
_VLLM_CACHE_INFO = "vllm:cache_config_info"
_SGLANG_RUNNING = "sglang:num_running_reqs"
_SGLANG_WAITING = "sglang:num_queue_reqs"
_SGLANG_USAGE = "sglang:token_usage"
_SGLANG_HIT_RATE = "sglang:cache_hit_rate"

_WANTED = frozenset(
    {
        _VLLM_RUNNING,
        _VLLM_WAITING,
        *_VLLM_USAGE,
        *_VLLM_QUERIES,
        *_VLLM_HITS,
        _VLLM_CACHE_INFO,
        _SGLANG_RUNNING,
        _SGLANG_WAITING,
        _SGLANG_USAGE,
        _SGLANG_HIT_RATE,
    }
)
_ENGINE_LABEL = "engine"  # vLLM: one value per data-parallel rank of the server


@dataclass(frozen=True, slots=True)
class Sample:
    """One parsed exposition line."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """What one scrape says about an engine; ``None`` where the engine did not say.

    ``kv_usage`` and ``cache_hit_rate`` are fractions in 0..1. vLLM reports prefix-cache
    *counters* (``prefix_cache_queries`` / ``prefix_cache_hits``, in tokens); turning
    them into a rate needs two scrapes, which the aggregator does.
    """

    engine: str | None
    num_requests_running: int | None = None
    num_requests_waiting: int | None = None
    kv_usage: float | None = None
    kv_total_blocks: int | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    cache_hit_rate: float | None = None
    num_samples: int = 0
    num_malformed: int = 0


def _parse_labels(text: str | None) -> tuple[tuple[str, str], ...] | None:
    if not text:
        return ()
    labels: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _LABEL_RE.match(text, pos)
        if match is None:
            if text[pos:].strip() == "":
                break
            return None
        labels.append((match.group(1), match.group(2)))
        pos = match.end()
    return tuple(labels)


def _parse_value(text: str) -> float | None:
    try:
        return float(text)  # accepts NaN, +Inf, -Inf, 1e3
    except ValueError:
        return None


def iter_samples(text: str) -> Iterator[Sample | None]:
    """Every sample line of ``text`` as a :class:`Sample`, or ``None`` if it is malformed.

    Comments (``# HELP``, ``# TYPE``) and blank lines are skipped silently.
    """
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None:
            yield None
            continue
        labels = _parse_labels(match.group("labels"))
        value = _parse_value(match.group("value"))
        if labels is None or value is None:
            yield None
            continue
        yield Sample(match.group("name"), labels, value)


def _sum(values: list[float] | None) -> float | None:
    return math.fsum(values) if values else None


def _mean(values: list[float] | None) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _first(series: dict[str, list[float]], names: tuple[str, ...]) -> list[float] | None:
    for name in names:
        if name in series:
            return series[name]
    return None


def _finite(value: float | None) -> float | None:
    """A counter's value, or ``None`` when it is not a number one can subtract."""
    return value if value is not None and math.isfinite(value) else None


def _as_int(value: float | None) -> int | None:
    """A count: rounded, never below zero (``None``: absent or not finite)."""
    return None if value is None or not math.isfinite(value) else max(0, round(value))


def _clamp01(value: float | None) -> float | None:
    return None if value is None else min(1.0, max(0.0, value))


def _num_gpu_blocks(samples: list[Sample]) -> int | None:
    total = 0
    found = False
    for sample in samples:
        for key, value in sample.labels:
            if key == "num_gpu_blocks" and value.isdigit():
                total += int(value)
                found = True
    return total if found else None


def _collect(
    text: str, dp_rank: int | None = None
) -> tuple[dict[str, list[float]], list[Sample], int, int]:
    wanted: list[Sample] = []
    engines: set[str] = set()
    num_samples = num_malformed = 0
    for sample in iter_samples(text):
        if sample is None:
            num_malformed += 1
            continue
        num_samples += 1
        if sample.name not in _WANTED or math.isnan(sample.value):
            continue
        wanted.append(sample)
        if engine := _label(sample, _ENGINE_LABEL):
            engines.add(engine)
    if dp_rank is not None and len(engines) > 1:
        rank = str(dp_rank)
        wanted = [s for s in wanted if _label(s, _ENGINE_LABEL) in (rank, "")]
    series: dict[str, list[float]] = {}
    info: list[Sample] = []
    for sample in wanted:
        if sample.name == _VLLM_CACHE_INFO:
            info.append(sample)
        series.setdefault(sample.name, []).append(sample.value)
    return series, info, num_samples, num_malformed


def _label(sample: Sample, name: str) -> str:
    return next((value for key, value in sample.labels if key == name), "")


def parse_engine_metrics(text: str, dp_rank: int | None = None) -> EngineSnapshot:
    """Read one ``/metrics`` page of a vLLM or SGLang engine.

    Counts (running, waiting, counters) are summed over label sets; fractions (KV
    usage, SGLang's hit rate) are averaged. ``engine`` is ``"vllm"``, ``"sglang"``, or
    ``None`` when the page has none of the known series.

    A vLLM server of several data-parallel ranks labels each rank's series
    ``engine="<rank>"``; with ``dp_rank`` such a page gives that rank's figures alone.
    A page of one engine is read whole whatever ``dp_rank`` says.
    """
    series, info, num_samples, num_malformed = _collect(text, dp_rank)
    if any(name.startswith("vllm:") for name in series):
        return EngineSnapshot(
            engine="vllm",
            num_requests_running=_as_int(_sum(series.get(_VLLM_RUNNING))),
            num_requests_waiting=_as_int(_sum(series.get(_VLLM_WAITING))),
            kv_usage=_clamp01(_mean(_first(series, _VLLM_USAGE))),
            kv_total_blocks=_num_gpu_blocks(info),
            prefix_cache_queries=_finite(_sum(_first(series, _VLLM_QUERIES))),
            prefix_cache_hits=_finite(_sum(_first(series, _VLLM_HITS))),
            num_samples=num_samples,
            num_malformed=num_malformed,
        )
    if any(name.startswith("sglang:") for name in series):
        return EngineSnapshot(
            engine="sglang",
            num_requests_running=_as_int(_sum(series.get(_SGLANG_RUNNING))),
            num_requests_waiting=_as_int(_sum(series.get(_SGLANG_WAITING))),
            kv_usage=_clamp01(_mean(series.get(_SGLANG_USAGE))),
            cache_hit_rate=_clamp01(_mean(series.get(_SGLANG_HIT_RATE))),
            num_samples=num_samples,
            num_malformed=num_malformed,
        )
    return EngineSnapshot(engine=None, num_samples=num_samples, num_malformed=num_malformed)
