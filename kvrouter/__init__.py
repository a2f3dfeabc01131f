"""kvrouter: a KV-cache-aware request router for fleets of LLM inference engines.

The public names are imported on first use, so ``import kvrouter`` stays cheap::

    from kvrouter import KvIndexer, KvMetricsAggregator, KvScheduler
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "KvIndexer": "kvrouter.index",
    "OverlapScores": "kvrouter.index",
    "KvMetricsAggregator": "kvrouter.load.aggregator",
    "ForwardPassMetrics": "kvrouter.load.metrics",
    "KvScheduler": "kvrouter.routing.scheduler",
    "ScheduleRequest": "kvrouter.routing.scheduler",
    "BusyThresholds": "kvrouter.routing.scheduler",
    "ActiveSequences": "kvrouter.routing.active",
    "Decision": "kvrouter.routing.policies",
    "RoutingOverrides": "kvrouter.routing.policies",
    "KvCostPolicy": "kvrouter.routing.policies",
    "ScorePolicy": "kvrouter.routing.policies",
    "RandomPolicy": "kvrouter.routing.policies",
    "RoundRobinPolicy": "kvrouter.routing.policies",
    "DirectPolicy": "kvrouter.routing.policies",
    "PowerOfTwoPolicy": "kvrouter.routing.policies",
    "LeastLoadedPolicy": "kvrouter.routing.policies",
    "PrefixAffinityPolicy": "kvrouter.routing.policies",
    "CustomPolicy": "kvrouter.routing.policies",
    "make_policy": "kvrouter.routing.policies",
    "load_policy": "kvrouter.routing.policies",
    "WorkerKey": "kvrouter.events.model",
    "compute_block_hashes": "kvrouter.hashing",
    "compute_sequence_hashes": "kvrouter.hashing",
    "hash_request": "kvrouter.hashing",
    "make_salt": "kvrouter.hashing",
}

__all__ = [
    "ActiveSequences",
    "BusyThresholds",
    "CustomPolicy",
    "Decision",
    "DirectPolicy",
    "ForwardPassMetrics",
    "KvCostPolicy",
    "KvIndexer",
    "KvMetricsAggregator",
    "KvScheduler",
    "LeastLoadedPolicy",
    "OverlapScores",
    "PowerOfTwoPolicy",
    "PrefixAffinityPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RoutingOverrides",
    "ScheduleRequest",
    "ScorePolicy",
    "WorkerKey",
    "compute_block_hashes",
    "compute_sequence_hashes",
    "hash_request",
    "load_policy",
    "make_policy",
    "make_salt",
]

if TYPE_CHECKING:
    from kvrouter.events.model import WorkerKey
    from kvrouter.hashing import (
        compute_block_hashes,
        compute_sequence_hashes,
        hash_request,
        make_salt,
    )
    from kvrouter.index import KvIndexer, OverlapScores
    from kvrouter.load.aggregator import KvMetricsAggregator
    from kvrouter.load.metrics import ForwardPassMetrics
    from kvrouter.routing.active import ActiveSequences
    from kvrouter.routing.policies import (
        CustomPolicy,
        Decision,
        DirectPolicy,
        KvCostPolicy,
        LeastLoadedPolicy,
        PowerOfTwoPolicy,
        PrefixAffinityPolicy,
        RandomPolicy,
        RoundRobinPolicy,
        RoutingOverrides,
        ScorePolicy,
        load_policy,
        make_policy,
    )
    from kvrouter.routing.scheduler import BusyThresholds, KvScheduler, ScheduleRequest


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvrouter' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
