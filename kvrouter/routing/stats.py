"""Histograms as values, for the scheduler's statistics."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Histogram", "HistogramBuilder"]


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts per bucket: ``counts[i]`` holds values ``<= bounds[i]`` (and above the
    previous bound); the last count is everything above ``bounds[-1]``."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    count: int

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper_bound, values <= bound)`` pairs, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        acc = 0
        for bound, num in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += num
            out.append((bound, acc))
        return out

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (0 when empty)."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        for bound, acc in self.cumulative():
            if acc >= rank:
                return bound
        return float("inf")


class HistogramBuilder:
    """The mutable side of :class:`Histogram`."""

    __slots__ = ("_bounds", "_count", "_counts", "_total")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(bounds):
            raise ValueError("histogram bounds must be sorted")
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(self._bounds) + 1)
        self._total = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._total += value
        self._count += 1

    def value(self) -> Histogram:
        return Histogram(self._bounds, tuple(self._counts), self._total, self._count)
