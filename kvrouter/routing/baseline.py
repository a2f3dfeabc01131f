"""Policies that ignore the cache: random, round robin, direct, power of two, least
loaded; and a user's ``func(matches, metrics) -> worker_id`` wrapped as a policy."""

from __future__ import annotations

import importlib
import os
import random
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np

from kvrouter.errors import ConfigError, InvalidRequest
from kvrouter.events.model import WorkerKey
from kvrouter.load.aggregator import AggregatedMetrics
from kvrouter.routing.table import WorkerTable, decide
from kvrouter.routing.views import Decision, RequestView, WorkerView

__all__ = [
    "CustomPolicy",
    "CustomRouter",
    "DirectPolicy",
    "LeastLoadedPolicy",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "load_policy",
]


class RandomPolicy:
    """Uniformly random."""

    name = "random"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        return decide(self.name, request, workers, self._rng.randrange(len(workers)))


class RoundRobinPolicy:
    """Candidates in worker order, one after the other (skipping busy ones)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        order = sorted(range(len(workers)), key=lambda i: workers[i].worker)
        chosen = order[self._next % len(order)]
        self._next += 1
        return decide(self.name, request, workers, chosen)


class DirectPolicy:
    """The worker the caller named; an unknown worker is the caller's error."""

    name = "direct"

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        if request.target is None:
            raise InvalidRequest(
                "direct routing needs a target worker (the x-kvrouter-worker header, "
                'or "kvrouter": {"worker": ID} in the body)'
            )
        for i, view in enumerate(workers):
            if view.worker == request.target:
                return decide(self.name, request, workers, i)
        raise InvalidRequest(f"unknown worker {request.target} for direct routing")


def _load_key(view: WorkerView) -> tuple[float, int, int]:
    # Fraction first; without totals or metrics, raw router-side counts decide.
    return (view.load, view.prefill_tokens, view.active_blocks)


class PowerOfTwoPolicy:
    """Two random candidates; the less loaded one wins (ties: the first drawn)."""

    name = "power_of_two"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        if len(workers) == 1:
            loads = np.array([workers[0].load])
            return decide(self.name, request, workers, 0, scores=loads, score_name="load")
        a, b = self._rng.sample(range(len(workers)), 2)
        pair = [workers[a], workers[b]]
        chosen = 1 if _load_key(pair[1]) < _load_key(pair[0]) else 0
        loads = np.array([v.load for v in pair])
        return decide(self.name, request, pair, chosen, scores=loads, score_name="load")


class LeastLoadedPolicy:
    """The least loaded candidate: the lowest load, then the fewest queued prefill
    tokens, then the fewest active blocks; ties random."""

    name = "least_loaded"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        table = WorkerTable.of(workers)
        loads = table.load
        # The same set as comparing (load, prefill_tokens, active_blocks) tuples.
        tied = np.flatnonzero(loads == loads.min())
        for column in (table.prefill_tokens, table.active_blocks):
            if len(tied) > 1:
                values = column[tied]
                tied = tied[values == values.min()]
        chosen = int(tied[0]) if len(tied) == 1 else self._rng.choice(tied.tolist())
        return decide(self.name, request, table, chosen, scores=loads, score_name="load")


CustomRouter = Callable[[dict[int, int], AggregatedMetrics], "int | WorkerKey"]


class CustomPolicy:
    """Wraps a user's ``func(matches, metrics) -> worker_id`` as a policy.

    ``matches`` is ``{worker_id: matched_blocks}`` over the candidates (the best rank of
    a data-parallel worker); ``metrics`` is an :class:`AggregatedMetrics` of the
    candidates, with ``get_worker_load(worker_id)``. Returning a ``WorkerKey`` picks a
    rank; a bare ``worker_id`` gets its rank with the longest match, then the lowest load.
    """

    def __init__(self, func: CustomRouter, name: str | None = None) -> None:
        self._func = func
        self.name: str = name or str(getattr(func, "__qualname__", "custom"))

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        matches: dict[int, int] = {}
        for view in workers:
            wid = view.worker.worker_id
            matches[wid] = max(matches.get(wid, 0), request.overlap(view.worker))
        metrics = AggregatedMetrics.from_endpoints(v.metrics for v in workers if v.metrics)
        answer = self._func(matches, metrics)
        return decide(self.name, request, workers, self._index_of(answer, request, workers))

    def _index_of(self, answer: object, request: RequestView, workers: Sequence[WorkerView]) -> int:
        if isinstance(answer, WorkerKey):
            found = [i for i, v in enumerate(workers) if v.worker == answer]
        elif isinstance(answer, int) and not isinstance(answer, bool):
            found = [i for i, v in enumerate(workers) if v.worker.worker_id == answer]
        else:
            found = []
        if not found:
            raise ConfigError(f"policy {self.name} returned {answer!r}, which is not a candidate")
        return min(found, key=lambda i: (-request.overlap(workers[i].worker), workers[i].load))


def load_policy(path: str) -> CustomPolicy:
    """Import ``"package.module:function"`` (or ``"package.module.function"``) as a policy.

    The module is looked for on ``sys.path``, then in the current directory (as uvicorn
    looks for an app): the ``kvrouter`` console script does not put the directory it is
    started from on ``sys.path``, where ``python -m`` would.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"policy path {path!r} must look like 'package.module:function'")
    try:
        module = _import_user_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import policy module {module_name!r} (looked on sys.path and in "
            f"{os.getcwd()}): {exc}"
        ) from exc
    func = getattr(module, attr, None)
    if not callable(func):
        raise ConfigError(f"{module_name!r} has no callable {attr!r}")
    return CustomPolicy(func, name=path)


def _import_user_module(name: str) -> ModuleType:
    cwd = os.getcwd()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only a top-level package that is nowhere to be found is worth a second look;
        # a module that fails on a missing import of its own is not.
        if exc.name != name.partition(".")[0] or _on_sys_path(cwd):
            raise
    # The directory stays on sys.path: the module may import its siblings later on.
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(name)
    except ImportError:
        sys.path.remove(cwd)
        raise


def _on_sys_path(directory: str) -> bool:
    return any(os.path.abspath(entry or os.curdir) == directory for entry in sys.path)
