"""What a routing policy sees and what it returns.

A policy is a pure function ``(RequestView, Sequence[WorkerView]) -> Decision``:

* :class:`RequestView`: the prompt's size, the cached prefix per worker (``overlaps``),
  the blocks already active per worker (``shared_active``), per-request overrides;
* :class:`WorkerView`: one candidate's router-side load and engine metrics;
* :class:`Decision`: the chosen worker, with a :class:`CandidateScore` row per candidate
  shown (at most :data:`MAX_ROWS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from kvrouter.errors import InvalidRequest
from kvrouter.events.model import WorkerKey
from kvrouter.load.aggregator import EndpointMetrics

__all__ = [
    "MAX_ROWS",
    "CandidateScore",
    "Decision",
    "Policy",
    "RequestView",
    "RoutingOverrides",
    "WorkerView",
]

MAX_ROWS = 16  # candidate rows a decision keeps


@dataclass(frozen=True, slots=True)
class RoutingOverrides:
    """Per-request changes to a policy's parameters; ``None`` keeps the policy's own."""

    overlap_weight: float | None = None
    temperature: float | None = None
    weight_cache: float | None = None
    weight_load: float | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RoutingOverrides:
        """Build from e.g. a request body's ``{"temperature": 0.5}``; unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"unknown routing override(s) {unknown}; valid: {sorted(known)}")
        values: dict[str, float | None] = {}
        for key, value in data.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise InvalidRequest(f"routing override {key!r} must be a number, got {value!r}")
            values[key] = None if value is None else float(value)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a policy may know about the request."""

    request_id: str
    num_tokens: int
    num_blocks: int  # full blocks (the hashed ones)
    overlaps: Mapping[WorkerKey, int]  # cached prefix blocks per worker (device tier)
    block_size: int
    overrides: RoutingOverrides | None = None
    target: WorkerKey | None = None  # the named worker of a direct request
    # Blocks of this request already held by in-flight requests on the worker (they
    # would not add to its active blocks).
    shared_active: Mapping[WorkerKey, int] = field(default_factory=dict)
    # Blocks the index holds per worker (ties go to the smaller cache); read only on ties.
    tree_sizes: Mapping[WorkerKey, int] = field(default_factory=dict)

    def overlap(self, worker: WorkerKey) -> int:
        return self.overlaps.get(worker, 0)

    def hit_rate(self, worker: WorkerKey) -> float:
        """Matched blocks / request blocks (0 for a prompt shorter than one block)."""
        return self.overlap(worker) / self.num_blocks if self.num_blocks else 0.0

    def uncached_tokens(self, worker: WorkerKey) -> int:
        return max(0, self.num_tokens - self.overlap(worker) * self.block_size)

    def new_blocks(self, worker: WorkerKey) -> int:
        """Blocks this request would add to the worker's active blocks."""
        total = -(-self.num_tokens // self.block_size)  # a partial tail block counts
        return max(0, total - self.shared_active.get(worker, 0))


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What a policy may know about one candidate worker."""

    worker: WorkerKey
    metrics: EndpointMetrics | None = None
    prefill_tokens: int = 0  # router-side: queued prompt tokens of in-flight requests
    active_blocks: int = 0  # router-side: deduplicated blocks of in-flight requests
    total_blocks: int | None = None
    reported_load: float | None = None  # the aggregator's load (stale-adjusted), 0..1
    busy: bool = False
    busy_reasons: tuple[str, ...] = ()

    @property
    def load(self) -> float:
        """KV usage 0..1: the router's own estimate or the engine's, whichever is higher.

        The router's estimate is current; the engine's includes what the router does
        not see (other routers, decode growth) but lags.
        """
        own = self.active_blocks / self.total_blocks if self.total_blocks else 0.0
        return max(own, self.reported_load or 0.0)


@dataclass(frozen=True, slots=True)
class CandidateScore:
    """One row of a decision: how a policy saw one candidate."""

    worker: WorkerKey
    overlap_blocks: int
    hit_rate: float
    load: float
    prefill_blocks: float
    decode_blocks: float
    score: float | None  # None: the policy does not score (random, round robin, direct)
    selected: bool


def _worker_label(worker: WorkerKey) -> str:
    if worker.dp_rank:
        return f"Worker {worker.worker_id} (dp {worker.dp_rank})"
    return f"Worker {worker.worker_id}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen worker and why."""

    request_id: str
    worker: WorkerKey
    policy: str
    candidates: tuple[CandidateScore, ...]
    score_name: str | None  # "cost" (lower wins), "score" (higher wins), "load" or None
    num_blocks: int
    overlap_blocks: int
    # Candidates considered; ``candidates`` holds rows for at most MAX_ROWS of them (the
    # chosen one and the best others).
    num_candidates: int = 0

    def explain(self) -> list[str]:
        """One line per candidate, e.g.
        ``Worker 2: 50% cache hit, 50% load -> score 0.00 (Selected)``."""
        lines = [self._line(row) for row in self.candidates]
        hidden = self.num_candidates - len(self.candidates)
        if hidden > 0:
            lines.append(f"... and {hidden} more candidates")
        return lines

    def _line(self, row: CandidateScore) -> str:
        text = f"{_worker_label(row.worker)}: {row.hit_rate:.0%} cache hit, {row.load:.0%} load"
        if self.score_name == "cost":
            text += f", {row.prefill_blocks:.2f} prefill + {row.decode_blocks:.2f} decode blocks"
        if row.score is not None and self.score_name is not None:
            text += f" -> {self.score_name} {row.score:.2f}"
        return text + (" (Selected)" if row.selected else "")

    def summary(self) -> str:
        """One log line: the choice and every candidate."""
        rows = "; ".join(self._line(row) for row in self.candidates)
        return (
            f"request={self.request_id} policy={self.policy} worker={self.worker.worker_id}"
            f" dp={self.worker.dp_rank} overlap={self.overlap_blocks}/{self.num_blocks} [{rows}]"
        )


class Policy(Protocol):
    """A routing policy; ``workers`` is never empty and holds no busy worker.

    ``workers`` is valid for the duration of the call only: the scheduler passes its
    cached candidate table and updates it in place as load changes.
    """

    @property
    def name(self) -> str: ...

    def __call__(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision: ...
