"""The latency series of vLLM's ``/metrics`` that dashboards plot, for the simulated engine.

Times are the server's loop clock (seconds); a histogram renders as Prometheus text with
vLLM's names and buckets (``vllm/v1/metrics/loggers.py``).

>>> h = Histogram((0.1, 1.0))
>>> h.observe(0.05); h.observe(0.5)
>>> print("\\n".join(h.render("vllm:x_seconds", 'model_name="m"')))
# TYPE vllm:x_seconds histogram
vllm:x_seconds_bucket{model_name="m",le="0.1"} 1
vllm:x_seconds_bucket{model_name="m",le="1.0"} 2
vllm:x_seconds_bucket{model_name="m",le="+Inf"} 2
vllm:x_seconds_count{model_name="m"} 2
vllm:x_seconds_sum{model_name="m"} 0.55
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Histogram", "LatencyMetrics"]

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_TOKEN_GAP_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class Histogram:
    """Cumulative buckets, a count and a sum, as Prometheus keeps them."""

    __slots__ = ("_bounds", "_counts", "count", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)
        if index < len(self._counts):
            self._counts[index] += 1
        self.count += 1
        self.total += value

    def render(self, name: str, labels: str) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        running = 0
        for bound, n in zip(self._bounds, self._counts, strict=True):
            running += n
            lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        lines.append(f"{name}_sum{{{labels}}} {round(self.total, 6)}")
        return lines


@dataclass(slots=True)
class LatencyMetrics:
    """What the server records per finished request, rendered under vLLM's names."""

    ttft: Histogram = field(default_factory=lambda: Histogram(_TTFT_BUCKETS))
    inter_token: Histogram = field(default_factory=lambda: Histogram(_TOKEN_GAP_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(_REQUEST_BUCKETS))
    prompt_tokens: int = 0
    finished: Counter[str] = field(default_factory=Counter)  # by finish reason

    def render(self, labels: str) -> list[str]:
        lines = [
            *self.ttft.render("vllm:time_to_first_token_seconds", labels),
            *self.inter_token.render("vllm:inter_token_latency_seconds", labels),
            *self.e2e.render("vllm:e2e_request_latency_seconds", labels),
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {self.prompt_tokens}",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason in ("stop", "length", "abort"):
            count = self.finished.get(reason, 0)
            lines.append(
                f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {count}'
            )
        return lines
