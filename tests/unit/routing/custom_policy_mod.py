"""User-written routing functions, loaded by import path in the tests."""

from __future__ import annotations

from kvrouter.load.aggregator import AggregatedMetrics


def prefer_cache_then_idle(matches: dict[int, int], metrics: AggregatedMetrics) -> int:
    """The longest match wins unless its worker is over 90% loaded; ties: least loaded."""
    usable = [w for w in matches if metrics.get_worker_load(w) <= 0.9] or list(matches)
    return max(usable, key=lambda w: (matches[w], -metrics.get_worker_load(w), -w))


def returns_unknown(matches: dict[int, int], metrics: AggregatedMetrics) -> int:
    return 999


NOT_CALLABLE = 3
