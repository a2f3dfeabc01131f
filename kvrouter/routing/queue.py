"""The router queue: requests wait at the router while every worker is saturated.

Without it, a router under overload sends each request at once to some engine's queue,
where it may wait minutes; the routing decision was made against the cache and load of
the moment it arrived, and by the time the engine admits it the prefix it was sent for
may be gone. With a queue, a request is routed only when some worker has room for more
prefill work: the decision is made late, against the cache as it is when the engine is
about to run it, and the order of waiting requests can be chosen.

* **Saturated**: every worker already has at least ``threshold_tokens`` prompt tokens
  routed to it that are still being prefilled (the router's own count, as in
  :class:`~kvrouter.routing.active.ActiveSequences`). Dynamo's
  ``--router-queue-threshold`` is the same limit as a multiple of the engines'
  ``max_num_batched_tokens``.
* **Order**: ``fcfs`` (arrival order) or ``wspt`` (weighted shortest processing time:
  fewest uncached prompt tokens first, measured against the best cached prefix any
  worker holds when the request arrives; ties in arrival order). ``wspt`` lowers the
  mean time to first token under overload at the expense of the longest prompts,
  which wait until the load drops.
* ``max_pending`` bounds the queue: a request beyond it is refused at once with
  :class:`~kvrouter.errors.AllWorkersBusy` (back-pressure instead of unbounded waiting).

The queue is pure, like the scheduler it wraps: callers :meth:`RouterQueue.submit`
requests, then call :meth:`RouterQueue.dispatch` after every submit and every
``on_first_token`` / ``on_finish`` (the events that free prefill capacity) and start
the requests it hands back.

>>> from kvrouter.clock import ManualClock
>>> from kvrouter.routing.scheduler import KvScheduler, ScheduleRequest
>>> sched = KvScheduler(None, policy="round_robin", block_size=4, clock=ManualClock())
>>> sched.add_worker(0)
>>> queue = RouterQueue(sched, QueueConfig(threshold_tokens=8))
>>> queue.submit(ScheduleRequest("a", token_ids=list(range(12))), "a")
>>> queue.submit(ScheduleRequest("b", token_ids=list(range(12))), "b")
>>> [(item, d.worker.worker_id) for item, d in queue.dispatch()]
[('a', 0)]
>>> len(queue)
1
>>> sched.on_first_token("a")
True
>>> [item for item, _ in queue.dispatch()]
['b']
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from kvrouter.errors import AllWorkersBusy, InvalidRequest, RouterError
from kvrouter.routing.policies import Decision
from kvrouter.routing.scheduler import KvScheduler, ScheduleRequest

__all__ = ["QUEUE_POLICIES", "QueueConfig", "QueuePolicy", "QueueStats", "RouterQueue"]

QueuePolicy = Literal["fcfs", "wspt"]
QUEUE_POLICIES: tuple[QueuePolicy, ...] = ("fcfs", "wspt")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """``threshold_tokens``: a worker with fewer queued prefill tokens than this can take
    another request. ``policy``: the order of waiting requests. ``max_pending``: the most
    requests that may wait (``None``: no bound)."""

    threshold_tokens: int
    policy: QueuePolicy = "fcfs"
    max_pending: int | None = None

    def __post_init__(self) -> None:
        if self.threshold_tokens <= 0:
            raise ValueError(f"threshold_tokens must be positive, got {self.threshold_tokens}")
        if self.policy not in QUEUE_POLICIES:
            raise ValueError(
                f"unknown queue policy {self.policy!r}; valid: {', '.join(QUEUE_POLICIES)}"
            )
        if self.max_pending is not None and self.max_pending < 0:
            raise ValueError(f"max_pending must be >= 0 or None, got {self.max_pending}")

    @classmethod
    def scaled(
        cls,
        threshold: float,
        max_num_batched_tokens: int,
        policy: str = "fcfs",
        max_pending: int | None = None,
    ) -> QueueConfig:
        """A threshold given as a multiple of the engines' ``max_num_batched_tokens``
        (Dynamo's ``--router-queue-threshold``), rounded, at least 1 token."""
        tokens = max(1, round(threshold * max_num_batched_tokens))
        return cls(tokens, policy, max_pending)  # type: ignore[arg-type]  # checked there


@dataclass(frozen=True, slots=True)
class QueueStats:
    pending: int
    num_queued: int  # requests that had to wait at least once
    num_dispatched: int
    num_cancelled: int
    num_refused: int  # over max_pending
    max_pending_seen: int


class RouterQueue(Generic[T]):
    """Requests waiting at the router, each with the caller's ``item`` (a future, a
    record: whatever the caller needs to start the request once it is routed)."""

    def __init__(self, scheduler: KvScheduler, config: QueueConfig) -> None:
        self.scheduler = scheduler
        self.config = config
        self._heap: list[tuple[int, int, str]] = []
        self._waiting: dict[str, tuple[ScheduleRequest, T]] = {}
        self._seq = 0
        self._num_queued = 0
        self._num_dispatched = 0
        self._num_cancelled = 0
        self._num_refused = 0
        self._max_seen = 0
        self._fresh: list[str] = []  # submitted since the last dispatch

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._waiting

    def submit(self, request: ScheduleRequest, item: T) -> None:
        """Add ``request`` to the queue; :meth:`dispatch` routes it when there is room.

        Raises :class:`AllWorkersBusy` when ``max_pending`` requests already wait and this
        one could not be routed at once, and :class:`~kvrouter.errors.InvalidRequest` for
        a request id that is already waiting.
        """
        if request.request_id in self._waiting:
            raise InvalidRequest(f"request {request.request_id!r} is already queued")
        limit = self.config.max_pending
        if limit is not None and len(self._waiting) >= limit and not self.has_capacity():
            self._num_refused += 1
            raise AllWorkersBusy(
                f"every worker is saturated and {len(self._waiting)} requests are "
                "already waiting at the router"
            )
        key = 0
        if self.config.policy == "wspt":
            key = self.scheduler.uncached_tokens(request)
        self._seq += 1
        heapq.heappush(self._heap, (key, self._seq, request.request_id))
        self._waiting[request.request_id] = (request, item)
        self._fresh.append(request.request_id)

    def cancel(self, request_id: str) -> T | None:
        """Take a waiting request out (its client left or timed out); returns its item,
        or ``None`` if it is not waiting (already dispatched or unknown)."""
        entry = self._waiting.pop(request_id, None)
        if entry is None:
            return None
        self._num_cancelled += 1
        return entry[1]

    def has_capacity(self) -> bool:
        """Whether some worker can take another request now (no workers: ``True``, so
        the scheduler's own error reaches the caller)."""
        return self.scheduler.min_prefill_tokens() < self.config.threshold_tokens

    def dispatch(self) -> list[tuple[T, Decision | RouterError]]:
        """Route waiting requests, in queue order, while some worker has room.

        Returns each routed request's item with its decision, or with the error that
        routing it raised (no workers, all busy by the scheduler's thresholds, an invalid
        request): the caller fails that request, the queue goes on.
        """
        out: list[tuple[T, Decision | RouterError]] = []
        heap, waiting = self._heap, self._waiting
        while heap:
            if not self.has_capacity():
                break
            _, _, request_id = heapq.heappop(heap)
            entry = waiting.pop(request_id, None)
            if entry is None:
                continue  # cancelled
            request, item = entry
            try:
                out.append((item, self.scheduler.schedule(request)))
            except RouterError as exc:
                out.append((item, exc))
            self._num_dispatched += 1
        if self._fresh:
            self._num_queued += sum(1 for r in self._fresh if r in waiting)
            self._fresh.clear()
        self._max_seen = max(self._max_seen, len(waiting))
        return out

    def stats(self) -> QueueStats:
        return QueueStats(
            pending=len(self._waiting),
            num_queued=self._num_queued,
            num_dispatched=self._num_dispatched,
            num_cancelled=self._num_cancelled,
            num_refused=self._num_refused,
            max_pending_seen=self._max_seen,
        )
