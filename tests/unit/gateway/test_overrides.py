"""Per-request routing overrides from headers and the "kvrouter" body field."""

from __future__ import annotations

import pytest

from kvrouter.errors import InvalidRequest
from kvrouter.gateway.overrides import RoutingOverrides, parse_overrides


def test_nothing_given_is_empty() -> None:
    overrides = parse_overrides({"content-type": "application/json"})
    assert overrides == RoutingOverrides()
    assert overrides.is_empty
    assert overrides.policy_params() == {}


def test_headers() -> None:
    overrides = parse_overrides(
        {
            "x-kvrouter-overlap-weight": "2.5",
            "x-kvrouter-temperature": "0.1",
            "x-kvrouter-weight-cache": "3",
            "x-kvrouter-weight-load": "0",
            "x-kvrouter-worker": "4",
        }
    )
    assert overrides == RoutingOverrides(
        overlap_weight=2.5, temperature=0.1, weight_cache=3.0, weight_load=0.0, worker_id=4
    )
    assert overrides.policy_params() == {
        "overlap_weight": 2.5,
        "temperature": 0.1,
        "weight_cache": 3.0,
        "weight_load": 0.0,
    }


def test_body_field_wins_over_headers() -> None:
    overrides = parse_overrides(
        {"x-kvrouter-overlap-weight": "2.5", "x-kvrouter-temperature": "0.3"},
        {"overlap_weight": 4, "worker_id": 1},
    )
    assert overrides == RoutingOverrides(overlap_weight=4.0, temperature=0.3, worker_id=1)


def test_body_worker_alias() -> None:
    assert parse_overrides({}, {"worker": 2}).worker_id == 2


@pytest.mark.parametrize(
    ("headers", "field", "message"),
    [
        ({"x-kvrouter-overlap-weight": "heavy"}, None, "must be a number"),
        ({"x-kvrouter-temperature": "-1"}, None, ">= 0"),
        ({"x-kvrouter-temperature": "nan"}, None, "finite"),
        ({"x-kvrouter-worker": "1.5"}, None, "must be an integer"),
        ({}, {"overlap_weight": True}, "must be a number"),
        ({}, {"speed": 1}, "unknown key"),
        ({}, [1, 2], "must be an object"),
        ({}, {"worker": -1}, ">= 0"),
    ],
)
def test_bad_overrides_are_invalid_requests(
    headers: dict[str, str], field: object, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_overrides(headers, field)
