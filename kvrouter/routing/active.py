"""Active sequences: the load the router itself has put on each worker.

Engine metrics lag behind; the router knows at once what it has just sent. For every
routed request, from :meth:`ActiveSequences.add_request` until :meth:`~ActiveSequences.free`,
this tracks

* its **prefill tokens** (the uncached part of its prompt) until its first token arrives
  (:meth:`~ActiveSequences.mark_prefill_done`), and
* its **KV blocks**, deduplicated per worker by sequence hash: two requests sharing a
  prefix on the same worker hold its blocks once (reference counted), as the engine's
  prefix cache does. Blocks that cannot be shared (a partial tail block, decode space)
  are counted per request as ``num_private_blocks``.

::

    worker 0:  req a: [s1 s2 s3] + 1 private     holders: s1=2 s2=2 s3=1 s4=1
               req b: [s1 s2 s4]                 active_blocks = 4 + 1 = 5

A completion that never comes (a lost connection the caller missed) must not leak load:
with ``expiry_s`` set, requests older than that are freed on the next call that mutates
state, and counted as expired.

>>> from kvrouter.clock import ManualClock
>>> active = ActiveSequences(clock=ManualClock())
>>> active.add_request("a", WorkerKey(0), [11, 12], num_prefill_tokens=32)
>>> active.add_request("b", WorkerKey(0), [11, 13], num_prefill_tokens=16)
>>> active.active_blocks(WorkerKey(0)), active.prefill_tokens(WorkerKey(0))
(3, 48)
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict, _count_elements  # type: ignore[attr-defined]
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from kvrouter.clock import Clock, monotonic
from kvrouter.events.model import WorkerKey

__all__ = ["ActiveSequences", "ActiveStats", "WorkerLoad"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """The router-side load of one worker."""

    prefill_tokens: int
    active_blocks: int
    num_requests: int


@dataclass(frozen=True, slots=True)
class ActiveStats:
    """Totals over every worker, plus lifetime counters."""

    num_requests: int
    num_prefill_tokens: int
    num_active_blocks: int
    num_workers: int
    num_added: int
    num_freed: int
    num_expired: int


@dataclass(slots=True)
class _Request:
    worker: WorkerKey
    seq_hashes: tuple[int, ...]
    prefill_tokens: int
    private_blocks: int
    started_s: float


@dataclass(slots=True)
class _Worker:
    prefill_tokens: int = 0
    private_blocks: int = 0
    num_requests: int = 0
    version: int = 0
    # sequence hash -> requests holding it. Every request books a whole chain from the
    # prompt's start, so the held set is prefix-closed: holding block i means holding
    # every block before it (shared_blocks relies on this to binary-search).
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def distinct_blocks(self) -> int:
        return len(self.counts)

    @property
    def active_blocks(self) -> int:
        return len(self.counts) + self.private_blocks


_IDLE = WorkerLoad(0, 0, 0)
_JOURNAL_MAX = 8192


class ActiveSequences:
    """Per-worker prefill tokens and deduplicated active blocks of in-flight requests."""

    def __init__(self, *, clock: Clock = monotonic, expiry_s: float | None = None) -> None:
        if expiry_s is not None and expiry_s <= 0:
            raise ValueError(f"expiry_s must be positive or None, got {expiry_s}")
        self._clock = clock
        self._expiry_s = expiry_s
        # Insertion order is arrival order, so expiry only ever looks at the front.
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._workers: dict[WorkerKey, _Worker] = {}
        self._version = 0
        # (version, worker) per change, in version order: lets a reader that cached
        # per-worker views find the few that changed instead of checking every worker.
        self._journal: list[tuple[int, WorkerKey]] = []
        self._num_added = 0
        self._num_freed = 0
        self._num_expired = 0

    def add_request(
        self,
        request_id: str,
        worker: WorkerKey,
        seq_hashes: Sequence[int],
        num_prefill_tokens: int,
        *,
        num_private_blocks: int = 0,
    ) -> None:
        """Book a routed request on ``worker``; ``request_id`` must not be active already."""
        self.expire()
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already active")
        if num_prefill_tokens < 0 or num_private_blocks < 0:
            raise ValueError("num_prefill_tokens and num_private_blocks must be >= 0")
        # A prompt that repeats a block still holds one block per position, and the
        # sequence hash already tells positions apart; duplicates here would be a bug.
        hashes = tuple(dict.fromkeys(seq_hashes))
        req = _Request(worker, hashes, num_prefill_tokens, num_private_blocks, self._clock())
        self._requests[request_id] = req
        state = self._workers.get(worker)
        if state is None:
            state = self._workers[worker] = _Worker()
        state.prefill_tokens += num_prefill_tokens
        state.private_blocks += num_private_blocks
        state.num_requests += 1
        _count_elements(state.counts, hashes)  # C speed: this runs once per routed request
        self._touch(state, worker)
        self._num_added += 1

    def _touch(self, state: _Worker, worker: WorkerKey) -> None:
        self._version += 1
        state.version = self._version
        journal = self._journal
        journal.append((self._version, worker))
        if len(journal) > _JOURNAL_MAX:
            del journal[: len(journal) // 2]

    def mark_prefill_done(self, request_id: str) -> bool:
        """The first token arrived: its prompt no longer counts as queued prefill.

        Returns ``False`` (and changes nothing) if the request is unknown or already done.
        """
        req = self._requests.get(request_id)
        if req is None or req.prefill_tokens == 0:
            return False
        state = self._workers[req.worker]
        state.prefill_tokens -= req.prefill_tokens
        req.prefill_tokens = 0
        self._touch(state, req.worker)
        return True

    def free(self, request_id: str) -> bool:
        """The request ended (any way); idempotent: ``False`` if it was not active."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._release(req)
        self._num_freed += 1
        return True

    def _release(self, req: _Request) -> None:
        worker = req.worker
        state = self._workers[worker]
        state.prefill_tokens -= req.prefill_tokens
        state.private_blocks -= req.private_blocks
        state.num_requests -= 1
        counts = state.counts
        for h in req.seq_hashes:
            left = counts[h] - 1
            if left:
                counts[h] = left
            else:
                del counts[h]
        self._touch(state, worker)
        if state.num_requests == 0:
            assert state.distinct_blocks == state.prefill_tokens == state.private_blocks == 0, (
                f"worker {worker} has no requests but holds load: {state}"
            )
            del self._workers[worker]

    def expire(self) -> int:
        """Free every request older than ``expiry_s``; returns how many were freed."""
        if self._expiry_s is None or not self._requests:
            return 0
        deadline = self._clock() - self._expiry_s
        num = 0
        while self._requests:
            request_id, req = next(iter(self._requests.items()))
            if req.started_s > deadline:
                break
            del self._requests[request_id]
            self._release(req)
            num += 1
            logger.warning(
                "request %s on worker %s expired without completing", request_id, req.worker
            )
        self._num_expired += num
        return num

    def remove_worker(self, worker: WorkerKey) -> int:
        """Drop every request on ``worker`` (it left); returns how many."""
        ids = [rid for rid, req in self._requests.items() if req.worker == worker]
        for request_id in ids:
            self._release(self._requests.pop(request_id))
        return len(ids)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def worker_of(self, request_id: str) -> WorkerKey | None:
        req = self._requests.get(request_id)
        return None if req is None else req.worker

    def prefill_tokens(self, worker: WorkerKey) -> int:
        state = self._workers.get(worker)
        return 0 if state is None else state.prefill_tokens

    def active_blocks(self, worker: WorkerKey) -> int:
        state = self._workers.get(worker)
        return 0 if state is None else state.active_blocks

    def num_requests(self, worker: WorkerKey) -> int:
        state = self._workers.get(worker)
        return 0 if state is None else state.num_requests

    def num_shared_blocks(self, worker: WorkerKey, seq_hashes: Sequence[int]) -> int:
        """How many of ``seq_hashes`` are already active on ``worker`` (would not be new)."""
        return self.shared_blocks(seq_hashes).get(worker, 0)

    def shared_blocks(self, seq_hashes: Sequence[int]) -> dict[WorkerKey, int]:
        """For every worker holding some of ``seq_hashes``: how many it holds.

        Sequence hashes name whole prefixes, so a worker holding block ``i`` of a prompt
        holds every block before it; the walk stops at the first block nobody holds.
        """
        out: dict[WorkerKey, int] = {}
        if not seq_hashes:
            return out
        first = seq_hashes[0]
        workers = self._workers
        # One dict probe per worker with requests: cheaper on the request path than
        # keeping a fleet-wide index of every booked block up to date.
        for worker, state in workers.items():
            counts = state.counts
            if first not in counts:
                continue
            # Prefix-closed: find the first block not held by bisection.
            lo, hi = 1, len(seq_hashes)
            while lo < hi:
                mid = (lo + hi) // 2
                if seq_hashes[mid] in counts:
                    lo = mid + 1
                else:
                    hi = mid
            out[worker] = lo
        return out

    @property
    def current_version(self) -> int:
        """Changes whenever any worker's load changes."""
        return self._version

    def changed_since(self, version: int) -> list[WorkerKey] | None:
        """Workers whose load changed after ``current_version`` was ``version`` (with
        repeats); ``None`` when that is too far back to tell (assume every worker)."""
        if version >= self._version:
            return []
        journal = self._journal
        if not journal or journal[0][0] > version + 1:
            return None
        start = bisect.bisect_right(journal, version, key=itemgetter(0))
        return [worker for _, worker in journal[start:]]

    def version(self, worker: WorkerKey) -> int:
        """Changes whenever ``worker``'s load changes (0: it has none)."""
        state = self._workers.get(worker)
        return 0 if state is None else state.version

    def load(self, worker: WorkerKey) -> WorkerLoad:
        state = self._workers.get(worker)
        if state is None:
            return _IDLE
        return WorkerLoad(state.prefill_tokens, state.active_blocks, state.num_requests)

    def stats(self) -> ActiveStats:
        workers = self._workers.values()
        return ActiveStats(
            num_requests=len(self._requests),
            num_prefill_tokens=sum(w.prefill_tokens for w in workers),
            num_active_blocks=sum(w.active_blocks for w in workers),
            num_workers=len(self._workers),
            num_added=self._num_added,
            num_freed=self._num_freed,
            num_expired=self._num_expired,
        )
