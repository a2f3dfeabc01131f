"""Per-request routing overrides, from headers or a ``"kvrouter"`` body field.

Headers (``x-kvrouter-overlap-weight: 2.0``, ``x-kvrouter-temperature``,
``x-kvrouter-weight-cache``, ``x-kvrouter-weight-load``, ``x-kvrouter-worker: 3``) or
the body field ``"kvrouter": {"overlap_weight": 2.0, "worker": 3}``, which the gateway
strips before forwarding. When both give the same setting, the body field wins.

>>> o = parse_overrides({"x-kvrouter-temperature": "0.5"}, {"overlap_weight": 2})
>>> o.policy_params()
{'overlap_weight': 2.0, 'temperature': 0.5}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvrouter.errors import InvalidRequest

__all__ = ["BODY_FIELD", "HEADER_PREFIX", "RoutingOverrides", "parse_overrides"]

BODY_FIELD = "kvrouter"
HEADER_PREFIX = "x-kvrouter-"
_WEIGHTS = ("overlap_weight", "temperature", "weight_cache", "weight_load")
_INTS = ("worker", "dp_rank")


@dataclass(frozen=True, slots=True)
class RoutingOverrides:
    """Settings one request asks for; ``None`` means "use the gateway's"."""

    overlap_weight: float | None = None
    temperature: float | None = None
    weight_cache: float | None = None
    weight_load: float | None = None
    worker_id: int | None = None
    dp_rank: int | None = None

    @property
    def is_empty(self) -> bool:
        return self == _EMPTY

    def policy_params(self) -> dict[str, float]:
        """The weight overrides that were given, by policy parameter name."""
        return {name: v for name in _WEIGHTS if (v := getattr(self, name)) is not None}


_EMPTY = RoutingOverrides()


def _float(name: str, value: Any, source: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{source} {name} must be a number, got {value!r}") from exc
    if not math.isfinite(number) or number < 0:
        raise InvalidRequest(f"{source} {name} must be a finite number >= 0, got {value!r}")
    return number


def _int(name: str, value: Any, source: str) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{source} {name} must be an integer, got {value!r}") from exc
    if number < 0:
        raise InvalidRequest(f"{source} {name} must be >= 0, got {value!r}")
    return number


def _from_headers(headers: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in (*_WEIGHTS, *_INTS):
        raw = headers.get(HEADER_PREFIX + name.replace("_", "-"))
        if raw is None:
            continue
        header = f"header {HEADER_PREFIX}{name.replace('_', '-')}:"
        out[name] = _float(name, raw, header) if name in _WEIGHTS else _int(name, raw, header)
    return out


def _from_body(field: Any) -> dict[str, Any]:
    if field is None:
        return {}
    if not isinstance(field, dict):
        raise InvalidRequest(f'body field "{BODY_FIELD}" must be an object')
    unknown = set(field) - {*_WEIGHTS, *_INTS, "worker_id"}
    if unknown:
        raise InvalidRequest(f'unknown key(s) in "{BODY_FIELD}": {", ".join(sorted(unknown))}')
    out: dict[str, Any] = {}
    for name, value in field.items():
        key = "worker" if name == "worker_id" else name
        source = f'"{BODY_FIELD}.{name}"'
        out[key] = _float(name, value, source) if key in _WEIGHTS else _int(name, value, source)
    return out


def parse_overrides(headers: Mapping[str, str], body_field: Any = None) -> RoutingOverrides:
    """Overrides from request headers and the (already removed) body field.

    Raises :class:`~kvrouter.errors.InvalidRequest` naming the bad value.
    """
    values = _from_headers(headers)
    values.update(_from_body(body_field))
    if not values:
        return _EMPTY
    worker = values.pop("worker", None)
    return RoutingOverrides(worker_id=worker, **values)
