"""Load: the metrics workers report and the router's aggregated view of them."""

from kvrouter.load.aggregator import (
    AggregatedMetrics,
    AggregatorStats,
    EndpointMetrics,
    KvMetricsAggregator,
    MetricsSource,
)
from kvrouter.load.metrics import ForwardPassMetrics
from kvrouter.load.prometheus import EngineSnapshot, parse_engine_metrics

__all__ = [
    "AggregatedMetrics",
    "AggregatorStats",
    "EndpointMetrics",
    "EngineSnapshot",
    "ForwardPassMetrics",
    "KvMetricsAggregator",
    "MetricsSource",
    "parse_engine_metrics",
]
