"""``kvrouter mocker`` options: the KV event encoding a worker publishes."""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine
from typing import Any

import pytest
from typer.testing import CliRunner

from kvrouter.cli import app
from kvrouter.engine import cli as engine_cli
from kvrouter.engine.cli import MockerOptions


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[MockerOptions]:
    seen: list[MockerOptions] = []

    async def fake_serve(options: MockerOptions) -> None:
        seen.append(options)

    def fake_loop(coro: Coroutine[Any, Any, None]) -> None:
        with contextlib.suppress(StopIteration):
            coro.send(None)

    monkeypatch.setattr(engine_cli, "_serve_in_process", fake_serve)
    monkeypatch.setattr(engine_cli, "run_event_loop", fake_loop)
    return seen


@pytest.mark.parametrize("form", ["array", "map", "map-batch"])
def test_kv_events_form_is_passed_on(captured: list[MockerOptions], form: str) -> None:
    result = CliRunner().invoke(app, ["mocker", "--kv-events-form", form])
    assert result.exit_code == 0, result.output
    assert [o.kv_events_form for o in captured] == [form]


def test_default_form_is_the_array_form(captured: list[MockerOptions]) -> None:
    assert CliRunner().invoke(app, ["mocker"]).exit_code == 0
    assert captured[0].kv_events_form == "array"


def test_unknown_form_is_a_usage_error(captured: list[MockerOptions]) -> None:
    result = CliRunner().invoke(app, ["mocker", "--kv-events-form", "json"])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # unwrap the error box
    assert "'json' is not one of array, map, map-batch" in text
    assert captured == []


def test_worker_processes_inherit_the_form() -> None:
    options = MockerOptions(num_workers=2, kv_events_form="map-batch")
    command = engine_cli._child_command(options, 1)
    assert command[command.index("--kv-events-form") + 1] == "map-batch"


def test_nats_url_is_passed_on_and_inherited(captured: list[MockerOptions]) -> None:
    result = CliRunner().invoke(app, ["mocker", "--nats-url", "nats://127.0.0.1:4222"])
    assert result.exit_code == 0, result.output
    assert captured[0].nats_url == "nats://127.0.0.1:4222"
    assert CliRunner().invoke(app, ["mocker"]).exit_code == 0
    assert captured[1].nats_url is None
    command = engine_cli._child_command(captured[0], 0)
    assert command[command.index("--nats-url") + 1] == "nats://127.0.0.1:4222"
    assert "--nats-url" not in engine_cli._child_command(captured[1], 0)


@pytest.fixture
def start_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mocker`` starts its workers for real, then stops instead of waiting for a signal."""

    async def start_and_stop(options: MockerOptions) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await engine_cli.start_workers(options, stack)

    monkeypatch.setattr(engine_cli, "_serve_in_process", start_and_stop)


def test_a_bad_block_size_is_one_error_line(start_only: None) -> None:
    result = CliRunner().invoke(app, ["mocker", "--block-size", "0", "--base-port", "0"])
    assert result.exit_code == 2
    assert result.stderr == "error: block_size must be positive, got 0\n"


def test_a_missing_tokenizer_is_one_error_line(start_only: None) -> None:
    result = CliRunner().invoke(app, ["mocker", "--tokenizer", "/nope.json", "--base-port", "0"])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: tokenizer '/nope.json' does not exist; give 'byte' or the path of a "
        "tokenizer.json (or of a folder holding one)\n"
    )


def test_a_taken_kv_events_port_is_one_error_line(start_only: None, taken_port: int) -> None:
    args = ["mocker", "--base-port", "0", "--kv-events-base-port", str(taken_port)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: cannot bind tcp://127.0.0.1:{taken_port}: Address already in use\n"
    )


def test_a_taken_http_port_is_one_error_line(start_only: None, taken_port: int) -> None:
    args = ["mocker", "--base-port", str(taken_port), "--kv-events-base-port", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: worker 0: cannot listen for HTTP on 127.0.0.1:{taken_port}: "
        "Address already in use\n"
    )
