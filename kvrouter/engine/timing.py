"""How long one engine step takes: pluggable timing models.

A model answers two questions, in milliseconds:

* ``prefill_ms(num_tokens)``: one forward pass over ``num_tokens`` uncached prompt tokens;
* ``decode_ms(active_fraction)``: one decode step, where ``active_fraction`` is the share
  of KV blocks in use (active blocks / total blocks), a proxy for attention cost.

A step is composed by :func:`step_ms`: the prefill time of *all* prompt tokens computed in
the step (chunks of several requests form one forward pass), plus one decode time when
the step also advances at least one decoding request::

    step_ms = (prefill_ms(sum of prefill chunk tokens) if any prefill chunk else 0)
            + (decode_ms(active blocks / total blocks) if any decode else 0)

The engine divides the result by its ``speedup_ratio``.

>>> round(DefaultTiming().prefill_ms(1000), 6)
101.55
"""

from __future__ import annotations

import bisect
import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kvrouter.errors import ConfigError

__all__ = ["DefaultTiming", "TableTiming", "TimingModel", "step_ms"]


@runtime_checkable
class TimingModel(Protocol):
    """What the engine needs to know to time a step."""

    def prefill_ms(self, num_tokens: int) -> float:
        """One forward pass over ``num_tokens`` uncached prompt tokens."""
        ...

    def decode_ms(self, active_fraction: float) -> float:
        """One decode step with ``active_fraction`` (0..1) of the KV blocks in use."""
        ...


def step_ms(
    timing: TimingModel, num_prefill_tokens: int, num_decodes: int, active_fraction: float
) -> float:
    """The duration of one step (see the module docstring); 0 when it does nothing."""
    total = 0.0
    if num_prefill_tokens > 0:
        total += timing.prefill_ms(num_prefill_tokens)
    if num_decodes > 0:
        total += timing.decode_ms(active_fraction)
    return total


@dataclass(frozen=True, slots=True)
class DefaultTiming:
    """DESIGN 5's fit for an 8B model on one H100.

    ``prefill_ms(n) = 1.25e-6 n^2 + 7.41e-2 n + 26.2`` and
    ``decode_ms(p) = -5.47 p^2 + 43.88 p + 19.44``; the coefficients can be overridden.

    >>> DefaultTiming().decode_ms(0.0)
    19.44
    """

    prefill_a: float = 1.25e-6
    prefill_b: float = 7.41e-2
    prefill_c: float = 26.2
    decode_a: float = -5.47
    decode_b: float = 43.88
    decode_c: float = 19.44

    def prefill_ms(self, num_tokens: int) -> float:
        n = float(num_tokens)
        return self.prefill_a * n * n + self.prefill_b * n + self.prefill_c

    def decode_ms(self, active_fraction: float) -> float:
        p = active_fraction
        return self.decode_a * p * p + self.decode_b * p + self.decode_c


class _Curve:
    """A piecewise-linear curve through measured points, extended linearly at both ends."""

    __slots__ = ("_xs", "_ys")

    def __init__(self, name: str, points: Iterable[tuple[float, float]]) -> None:
        merged: dict[float, float] = {}
        for x, y in points:
            merged[float(x)] = float(y)
        if not merged:
            raise ConfigError(f"timing table has no {name} points")
        self._xs = sorted(merged)
        self._ys = [merged[x] for x in self._xs]

    def __call__(self, x: float) -> float:
        xs, ys = self._xs, self._ys
        if len(xs) == 1:
            return ys[0]
        # Outside the table, extend the nearest segment rather than clamp: a prompt
        # longer than any measured one still costs more.
        index = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
        x0, x1 = xs[index - 1], xs[index]
        y0, y1 = ys[index - 1], ys[index]
        return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class TableTiming:
    """A timing model interpolated from a user's measurements.

    ``prefill`` holds ``(num_tokens, ms)`` points and ``decode`` ``(active_fraction, ms)``
    points; values between points are interpolated linearly, values outside extend the
    first or last segment (never below 0).

    Files (:meth:`from_path`): JSON ``{"prefill": [[tokens, ms], ...], "decode":
    [[fraction, ms], ...]}`` or CSV with a header ``kind,x,ms`` and ``kind`` one of
    ``prefill`` / ``decode``.

    >>> t = TableTiming(prefill=[(0, 20.0), (1000, 120.0)], decode=[(0.0, 20.0), (1.0, 60.0)])
    >>> t.prefill_ms(500), t.decode_ms(0.25)
    (70.0, 30.0)
    """

    __slots__ = ("_decode", "_prefill")

    def __init__(
        self,
        prefill: Iterable[tuple[float, float]],
        decode: Iterable[tuple[float, float]],
    ) -> None:
        self._prefill = _Curve("prefill", prefill)
        self._decode = _Curve("decode", decode)

    def prefill_ms(self, num_tokens: int) -> float:
        return self._prefill(float(num_tokens))

    def decode_ms(self, active_fraction: float) -> float:
        return self._decode(active_fraction)

    @classmethod
    def from_path(cls, path: str | Path) -> TableTiming:
        """Load a table from a ``.json`` or ``.csv`` file (see the class docstring)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read timing table {path}: {exc}") from exc
        if path.suffix.lower() == ".csv":
            return cls._from_csv(path, text)
        return cls._from_json(path, text)

    @classmethod
    def _from_json(cls, path: Path, text: str) -> TableTiming:
        try:
            data = json.loads(text)
            return cls(_points(data["prefill"]), _points(data["decode"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"bad timing table {path}: {exc}") from exc

    @classmethod
    def _from_csv(cls, path: Path, text: str) -> TableTiming:
        rows: dict[str, list[tuple[float, float]]] = {"prefill": [], "decode": []}
        try:
            for line, row in enumerate(csv.DictReader(text.splitlines()), start=2):
                kind = (row.get("kind") or "").strip().lower()
                if kind not in rows:
                    raise ValueError(f"line {line}: kind must be prefill or decode, got {kind!r}")
                rows[kind].append((float(row["x"]), float(row["ms"])))
            return cls(rows["prefill"], rows["decode"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"bad timing table {path}: {exc}") from exc


def _points(raw: Any) -> list[tuple[float, float]]:
    if not isinstance(raw, Sequence):
        raise TypeError("points must be a list of [x, ms] pairs")
    out: list[tuple[float, float]] = []
    for item in raw:
        x, y = item
        out.append((float(x), float(y)))
    return out
