"""The gateway's own counters and recent decisions, exposed as frozen values.

Counters are plain integers bumped on the request path (no locks: one event loop);
:meth:`GatewayCounters.stats` copies them into a :class:`GatewayStats` that the
Prometheus collector and the dashboard read. Decision counts and histograms are the
scheduler's (``KvScheduler.stats()``); the gateway keeps the recent decisions with
their explanations for ``/debug/decisions``.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvrouter.gateway.core import RouteResult

__all__ = ["DecisionRecord", "GatewayCounters", "GatewayStats"]


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One routing decision, as ``/debug/decisions`` shows it."""

    request_id: str
    time_s: float
    worker_id: int
    dp_rank: int
    policy: str
    overlap_blocks: int
    request_blocks: int
    latency_s: float
    route: RouteResult | None = None  # explained on demand, not on the request path
    pinned: bool = False

    @property
    def explanation(self) -> tuple[str, ...]:
        return self.route.explanation if self.route is not None else ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "time_s": self.time_s,
            "worker_id": self.worker_id,
            "dp_rank": self.dp_rank,
            "policy": self.policy,
            "overlap_blocks": self.overlap_blocks,
            "request_blocks": self.request_blocks,
            "latency_us": round(self.latency_s * 1e6, 1),
            "pinned": self.pinned,
            "explanation": list(self.explanation),
        }


@dataclass(frozen=True, slots=True)
class GatewayStats:
    """A snapshot of the gateway's counters."""

    num_requests: dict[tuple[str, int], int]
    num_in_flight: int
    num_retries: int
    num_upstream_errors: dict[str, int]
    num_disconnects: int
    num_short_prompts: int
    num_decisions: dict[tuple[str, int], int]
    num_batches: int = 0
    num_batch_prompts: int = 0


@dataclass(slots=True)
class GatewayCounters:
    """Mutable counters of the request path."""

    history: int = 256
    num_in_flight: int = 0
    num_retries: int = 0
    num_disconnects: int = 0
    num_short_prompts: int = 0
    num_inline_prepares: int = 0  # tokenized + hashed on the event loop (small, cheap)
    num_batches: int = 0  # batch completions fanned out, one request per prompt
    num_batch_prompts: int = 0  # ... and the prompts they held
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    upstream_errors: Counter[str] = field(default_factory=Counter)
    decisions: Counter[tuple[str, int]] = field(default_factory=Counter)
    recent: deque[DecisionRecord] = field(init=False)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.history)

    def record_decision(self, record: DecisionRecord) -> None:
        self.decisions[(record.policy, record.worker_id)] += 1
        self.recent.append(record)

    def recent_decisions(self, n: int) -> list[DecisionRecord]:
        """The last ``n`` decisions, newest first."""
        if n <= 0:
            return []
        items = list(self.recent)[-n:]
        items.reverse()
        return items

    def stats(self) -> GatewayStats:
        return GatewayStats(
            num_requests=dict(self.requests),
            num_in_flight=self.num_in_flight,
            num_retries=self.num_retries,
            num_upstream_errors=dict(self.upstream_errors),
            num_disconnects=self.num_disconnects,
            num_short_prompts=self.num_short_prompts,
            num_decisions=dict(self.decisions),
            num_batches=self.num_batches,
            num_batch_prompts=self.num_batch_prompts,
        )
