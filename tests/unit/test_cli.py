"""``kvrouter``: a user's mistake ends any command with one ``error:`` line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvrouter.bench import cli as bench_cli
from kvrouter.cli import DEBUG_ENV, EXIT_USER_ERROR, app, describe_error
from kvrouter.errors import ConfigError

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def test_a_router_error_is_one_line_on_stderr() -> None:
    result = runner.invoke(app, ["mocker", "--block-size", "0"])
    assert result.exit_code == EXIT_USER_ERROR == 2
    assert result.stderr == "error: block_size must be positive, got 0\n"
    assert result.stdout == ""


def test_an_os_error_names_the_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "report", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path}: Is a directory\n"


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_debug_env_shows_the_exception(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(DEBUG_ENV, value)
    result = runner.invoke(app, ["mocker", "--block-size", "0"])
    assert result.exit_code == 1
    assert isinstance(result.exception, ConfigError)
    assert "error:" not in result.output


def test_debug_env_off_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEBUG_ENV, "0")
    result = runner.invoke(app, ["mocker", "--block-size", "0"])
    assert result.exit_code == 2
    assert result.stderr == "error: block_size must be positive, got 0\n"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise KeyError("hash_ids")

    monkeypatch.setattr(bench_cli, "_load_requests", broken)
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 1
    assert isinstance(result.exception, KeyError)
    assert "error:" not in result.output


def test_a_closed_pipe_is_left_to_click(monkeypatch: pytest.MonkeyPatch) -> None:
    def closed(*args: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(bench_cli, "_load_requests", closed)
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 1
    assert "error:" not in result.output


def test_the_console_entry_prints_no_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvrouter", "demo", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == "error: --workers must be at least 1, got 0\n"
    assert done.stdout == ""


def test_the_debug_switch_is_in_the_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert f"{DEBUG_ENV}=1" in result.stdout


def test_describe_error() -> None:
    missing = FileNotFoundError(2, "No such file or directory", "trace.jsonl")
    assert describe_error(missing) == "trace.jsonl: No such file or directory"
    assert describe_error(OSError(98, "address already in use")) == "address already in use"
    assert describe_error(TimeoutError()) == "TimeoutError"  # never an empty message
    assert describe_error(ConfigError("port must be in 0..65535")) == "port must be in 0..65535"
