"""The gateway's workers: who they are, whether they are in rotation, and since when.

The registry is plain synchronous state; the health checker, the metrics scraper and
the proxy report into it, and listeners hear when a worker leaves or rejoins the
rotation (the gateway removes a dead worker's blocks from the index then).

::

    add(spec) ──> in rotation ──(failed health check / unreachable for a request /
                      ^          error_threshold failed answers in a row)──> out of rotation
                      │                                                       │
                      └───────────────(health check passes again)─────────────┘

A worker that answers but fails a request (a 5xx, a 200 nobody can use) is only
skipped by that request's retries; one that fails every request while its health check
passes would otherwise stay in rotation for good, and win every tie of the cost model
(its cache, never filled, is the smallest).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from kvrouter.clock import Clock, monotonic
from kvrouter.errors import ConfigError
from kvrouter.events.model import WorkerKey
from kvrouter.gateway.config import MAX_WORKER_ID, WorkerSpec

__all__ = ["WorkerInfo", "WorkerRegistry", "WorkerState"]

log = logging.getLogger(__name__)

Listener = Callable[["WorkerState"], None]


@dataclass(slots=True)
class WorkerState:
    """Mutable bookkeeping of one worker (owned by :class:`WorkerRegistry`)."""

    spec: WorkerSpec
    worker_id: int
    added_s: float
    healthy: bool = True
    consecutive_failures: int = 0
    consecutive_errors: int = 0  # failed answers since its last good one
    last_health_ok_s: float | None = None
    last_metrics_s: float | None = None
    last_error: str | None = None
    num_requests: int = 0
    num_in_flight: int = 0
    num_failures: int = 0
    model_ids: tuple[str, ...] = ()
    lora_ids: tuple[str, ...] = ()  # the model ids that are LoRA adapters (vLLM: a parent)
    models_at_s: float = -math.inf  # when its /v1/models was last read

    @property
    def key(self) -> WorkerKey:
        return WorkerKey(self.worker_id, self.spec.dp_rank)

    @property
    def url(self) -> str:
        return self.spec.url

    def info(self, now_s: float) -> WorkerInfo:
        """A frozen view of this worker at ``now_s``."""
        age = None if self.last_metrics_s is None else max(0.0, now_s - self.last_metrics_s)
        return WorkerInfo(
            worker_id=self.worker_id,
            dp_rank=self.spec.dp_rank,
            url=self.spec.url,
            kv_events=self.spec.kv_events,
            replay=self.spec.replay,
            healthy=self.healthy,
            consecutive_failures=self.consecutive_failures,
            metrics_age_s=age,
            last_error=self.last_error,
            num_requests=self.num_requests,
            num_in_flight=self.num_in_flight,
            num_failures=self.num_failures,
            model_ids=self.model_ids,
        )


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What ``GET /admin/workers`` and ``/metrics`` report about one worker."""

    worker_id: int
    dp_rank: int
    url: str
    kv_events: str | None
    replay: str | None
    healthy: bool
    consecutive_failures: int
    metrics_age_s: float | None
    last_error: str | None
    num_requests: int
    num_in_flight: int
    num_failures: int
    model_ids: tuple[str, ...]

    @property
    def mode(self) -> str:
        """``"events"`` when the worker publishes KV events, else ``"approximate"``."""
        return "events" if self.kv_events else "approximate"


class WorkerRegistry:
    """Workers by id, with health state and leave/rejoin listeners.

    >>> reg = WorkerRegistry()
    >>> reg.add(WorkerSpec("http://127.0.0.1:8001")).worker_id
    0
    >>> [w.worker_id for w in reg.in_rotation()]
    [0]
    """

    def __init__(
        self, clock: Clock = monotonic, failure_threshold: int = 1, error_threshold: int = 5
    ) -> None:
        if failure_threshold < 1 or error_threshold < 1:
            raise ValueError(
                "failure_threshold and error_threshold must be >= 1, got "
                f"{failure_threshold} and {error_threshold}"
            )
        self._clock = clock
        self._failure_threshold = failure_threshold
        self._error_threshold = error_threshold
        self._workers: dict[int, WorkerState] = {}
        self._ranks_at: Counter[str] = Counter()  # URL -> how many workers (ranks) it serves
        self._on_down: list[Listener] = []
        self._on_up: list[Listener] = []
        self._on_removed: list[Listener] = []
        # The rotation by key, rebuilt only when membership or health changes: the
        # request path reads it for every request.
        self._rotation: Mapping[WorkerKey, WorkerState] | None = None

    # -- listeners ---------------------------------------------------------------
    def add_listeners(
        self,
        on_down: Listener | None = None,
        on_up: Listener | None = None,
        on_removed: Listener | None = None,
    ) -> None:
        """Call ``on_down`` when a worker leaves the rotation, ``on_up`` when it
        (re)joins, ``on_removed`` when it is deleted."""
        for hook, hooks in (
            (on_down, self._on_down),
            (on_up, self._on_up),
            (on_removed, self._on_removed),
        ):
            if hook is not None:
                hooks.append(hook)

    # -- membership ----------------------------------------------------------------
    def add(self, spec: WorkerSpec) -> WorkerState:
        """Register ``spec`` (its ``worker_id`` or the next free one) and put it in rotation."""
        worker_id = spec.worker_id if spec.worker_id is not None else self._next_id()
        if worker_id in self._workers:
            raise ConfigError(f"worker_id {worker_id} is already registered")
        if any(w.spec.url == spec.url and w.spec.dp_rank == spec.dp_rank for w in self):
            raise ConfigError(f"worker {spec.url} (dp_rank {spec.dp_rank}) is already registered")
        state = WorkerState(spec=spec, worker_id=worker_id, added_s=self._clock())
        self._workers[worker_id] = state
        self._ranks_at[spec.url] += 1
        self._rotation = None
        log.info("worker %d added: %s (%s)", worker_id, spec.url, spec.kv_events or "approximate")
        for hook in self._on_up:
            hook(state)
        return state

    def remove(self, worker_id: int) -> WorkerState:
        """Delete a worker; raises ``KeyError`` when it is unknown."""
        state = self._workers.pop(worker_id)
        self._ranks_at[state.url] -= 1
        if not self._ranks_at[state.url]:
            del self._ranks_at[state.url]
        self._rotation = None
        log.info("worker %d removed: %s", worker_id, state.url)
        for hook in self._on_removed:
            hook(state)
        return state

    def _next_id(self) -> int:
        found = max(self._workers, default=-1) + 1
        if found > MAX_WORKER_ID:
            raise ConfigError(f"no worker id is left above {found - 1}; give the worker one")
        return found

    def rank_to_name(self, state: WorkerState) -> int | None:
        """The data-parallel rank of its server that ``state`` is, when it must be named
        (vLLM's and SGLang's ``X-data-parallel-rank`` header; its own series of the
        server's ``/metrics``): when several ranks of one URL are registered, or one that
        is not rank 0. ``None``: the server as a whole is this worker."""
        rank = state.spec.dp_rank
        return rank if rank or self._ranks_at[state.url] > 1 else None

    def get(self, worker_id: int) -> WorkerState | None:
        return self._workers.get(worker_id)

    def __iter__(self) -> Iterator[WorkerState]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def in_rotation(self) -> list[WorkerState]:
        """Workers that may receive requests now."""
        return list(self.rotation().values())

    def rotation(self) -> Mapping[WorkerKey, WorkerState]:
        """Workers that may receive requests now, by key (a cached read-only view)."""
        rotation = self._rotation
        if rotation is None:
            live = {w.key: w for w in self._workers.values() if w.healthy}
            rotation = self._rotation = MappingProxyType(live)
        return rotation

    def infos(self) -> list[WorkerInfo]:
        now = self._clock()
        return [w.info(now) for w in self._workers.values()]

    # -- health --------------------------------------------------------------------
    def mark_ok(self, worker_id: int) -> None:
        """A health check or request succeeded; a worker out of rotation rejoins."""
        state = self._workers.get(worker_id)
        if state is None:
            return
        state.consecutive_failures = 0
        state.last_health_ok_s = self._clock()
        if not state.healthy:
            state.healthy = True
            state.last_error = None
            self._rotation = None
            log.info("worker %d back in rotation", worker_id)
            for hook in self._on_up:
                hook(state)

    def mark_failed(self, worker_id: int, reason: str) -> None:
        """A health check or request failed; at the threshold the worker leaves rotation."""
        state = self._workers.get(worker_id)
        if state is None:
            return
        state.consecutive_failures += 1
        state.num_failures += 1
        state.last_error = reason
        if state.consecutive_failures >= self._failure_threshold:
            self._take_out(state, reason)

    def mark_error(self, worker_id: int, reason: str) -> None:
        """A worker answered a request but failed it; at ``error_threshold`` such answers
        in a row (none good between them) it leaves rotation until a health check
        passes, and after that at its next failed answer."""
        state = self._workers.get(worker_id)
        if state is None:
            return
        state.consecutive_errors += 1
        state.num_failures += 1
        state.last_error = reason
        if state.consecutive_errors >= self._error_threshold:
            self._take_out(state, f"{state.consecutive_errors} failed answers in a row: {reason}")

    def _take_out(self, state: WorkerState, reason: str) -> None:
        if state.healthy:
            state.healthy = False
            self._rotation = None
            log.warning("worker %d out of rotation: %s", state.worker_id, reason)
            for hook in self._on_down:
                hook(state)

    def mark_metrics(self, worker_id: int) -> None:
        state = self._workers.get(worker_id)
        if state is not None:
            state.last_metrics_s = self._clock()
