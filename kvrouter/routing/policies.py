"""Routing policies: pure functions of ``(RequestView, Sequence[WorkerView]) -> Decision``.

The scheduler builds the views (cache overlaps, router-side load, engine metrics) and
removes busy workers; a policy only chooses. Policies that need randomness take a
``random.Random`` when they are made, so a seeded run is reproducible.

=================  ==========================================================
``random``         uniform over candidates
``round_robin``    candidates in worker order, one after the other
``direct``         the worker the caller named (``ScheduleRequest.worker``)
``power_of_two``   two random candidates, the less loaded one
``least_loaded``   the least loaded candidate
``kv``             the cost model, DESIGN 4 (default)
``score``          the seed rule ``hit_rate * weight_cache - load * weight_load``
``prefix_affinity`` the cost model with recomputed prefix tokens weighed more
``pkg.mod:func``   a user's ``func(matches, metrics) -> worker_id``
=================  ==========================================================

The types live in :mod:`kvrouter.routing.views`, the policies in
:mod:`kvrouter.routing.baseline` and :mod:`kvrouter.routing.cost`; this module gathers
them and builds policies by name.

>>> policy = make_policy("score")
>>> req = RequestView("r1", num_tokens=64, num_blocks=4, overlaps={WorkerKey(2): 2},
...                   block_size=16)
>>> policy(req, [WorkerView(WorkerKey(2), reported_load=0.5)]).explain()
['Worker 2: 50% cache hit, 50% load -> score 0.00 (Selected)']
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from kvrouter.errors import ConfigError
from kvrouter.events.model import WorkerKey
from kvrouter.routing.baseline import (
    CustomPolicy,
    CustomRouter,
    DirectPolicy,
    LeastLoadedPolicy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    load_policy,
)
from kvrouter.routing.cost import KvCostPolicy, PrefixAffinityPolicy, ScorePolicy
from kvrouter.routing.table import WorkerTable
from kvrouter.routing.views import (
    MAX_ROWS,
    CandidateScore,
    Decision,
    Policy,
    RequestView,
    RoutingOverrides,
    WorkerView,
)

__all__ = [
    "MAX_ROWS",
    "POLICY_NAMES",
    "CandidateScore",
    "CustomPolicy",
    "CustomRouter",
    "Decision",
    "DirectPolicy",
    "KvCostPolicy",
    "LeastLoadedPolicy",
    "Policy",
    "PowerOfTwoPolicy",
    "PrefixAffinityPolicy",
    "RandomPolicy",
    "RequestView",
    "RoundRobinPolicy",
    "RoutingOverrides",
    "ScorePolicy",
    "WorkerKey",
    "WorkerTable",
    "WorkerView",
    "load_policy",
    "make_policy",
]

_FACTORIES: dict[str, Callable[..., Policy]] = {
    "random": RandomPolicy,
    "round_robin": RoundRobinPolicy,
    "direct": DirectPolicy,
    "power_of_two": PowerOfTwoPolicy,
    "least_loaded": LeastLoadedPolicy,
    "kv": KvCostPolicy,
    "score": ScorePolicy,
    "prefix_affinity": PrefixAffinityPolicy,
}
_TAKES_RNG = frozenset({"random", "power_of_two", "least_loaded", "kv", "score", "prefix_affinity"})
POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_policy(name: str, *, rng: random.Random | None = None, **params: Any) -> Policy:
    """A policy by name, e.g. ``make_policy("kv", overlap_weight=2.0)``.

    A name with a ``:`` is a user's function (:func:`load_policy`). Unknown names and
    parameters raise :class:`~kvrouter.errors.ConfigError` (a ``ValueError``).
    """
    if ":" in name:
        if params:
            raise ConfigError(f"custom policy {name!r} takes no parameters, got {sorted(params)}")
        return load_policy(name)
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown policy {name!r}; valid: {', '.join(POLICY_NAMES)}")
    if name in _TAKES_RNG:
        params["rng"] = rng
    try:
        return factory(**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for policy {name!r}: {exc}") from exc
