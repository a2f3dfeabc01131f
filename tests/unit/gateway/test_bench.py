"""The gateway bench's option parsing and run selection (no processes)."""

from __future__ import annotations

import pytest

from kvrouter.gateway.bench import BenchOptions, RunFigures, _median_run, parse_peer


def test_peer_label_comes_from_the_prefix_or_the_module_or_program() -> None:
    assert parse_peer("sgl=python -m sglang_router.launch_router --port {port}") == (
        "sgl",
        "python -m sglang_router.launch_router --port {port}",
    )
    # An "=" inside an option is not a label.
    assert parse_peer("python -m mod.router --port={port}")[0] == "mod.router"
    assert parse_peer("/opt/bin/my-router --listen :{port}")[0] == "my-router"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty peer command"),
        ("x=   ", "empty peer command"),
        ("router --port 8000", "must listen on {port}"),
        ("router --name 'unclosed {port}", "quotation"),
    ],
)
def test_bad_peer_commands_are_refused_before_anything_starts(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchOptions(peers=(spec,))


def test_options_refuse_nonsense_counts() -> None:
    with pytest.raises(ValueError, match="rounds"):
        BenchOptions(rounds=0)
    with pytest.raises(ValueError, match="positive"):
        BenchOptions(concurrency=0)


def test_the_median_run_is_reported() -> None:
    runs = [RunFigures(rps, 1.0, 2.0, 0, 1.0) for rps in (900.0, 1500.0, 1200.0)]
    assert _median_run(runs).requests_per_s == 1200.0
    assert _median_run(runs[:2]).requests_per_s == 900.0  # the lower of two
