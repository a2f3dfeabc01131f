"""Routing: policies, the scheduler, and active-sequence tracking (pure, synchronous)."""

from kvrouter.routing.active import ActiveSequences, ActiveStats, WorkerLoad
from kvrouter.routing.policies import (
    POLICY_NAMES,
    CandidateScore,
    CustomPolicy,
    Decision,
    DirectPolicy,
    KvCostPolicy,
    LeastLoadedPolicy,
    Policy,
    PowerOfTwoPolicy,
    PrefixAffinityPolicy,
    RandomPolicy,
    RequestView,
    RoundRobinPolicy,
    RoutingOverrides,
    ScorePolicy,
    WorkerView,
    load_policy,
    make_policy,
)
from kvrouter.routing.scheduler import (
    BusyThresholds,
    IndexerLike,
    KvScheduler,
    ScheduleRequest,
    SchedulerStats,
)
from kvrouter.routing.stats import Histogram
from kvrouter.routing.table import WorkerTable

__all__ = [
    "POLICY_NAMES",
    "ActiveSequences",
    "ActiveStats",
    "BusyThresholds",
    "CandidateScore",
    "CustomPolicy",
    "Decision",
    "DirectPolicy",
    "Histogram",
    "IndexerLike",
    "KvCostPolicy",
    "KvScheduler",
    "LeastLoadedPolicy",
    "Policy",
    "PowerOfTwoPolicy",
    "PrefixAffinityPolicy",
    "RandomPolicy",
    "RequestView",
    "RoundRobinPolicy",
    "RoutingOverrides",
    "ScheduleRequest",
    "SchedulerStats",
    "ScorePolicy",
    "WorkerLoad",
    "WorkerTable",
    "WorkerView",
    "load_policy",
    "make_policy",
]
