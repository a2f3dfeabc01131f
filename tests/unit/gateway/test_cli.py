"""``kvrouter serve`` turns flags, environment and file into one config."""

from __future__ import annotations

import inspect
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvrouter.cli import app
from kvrouter.gateway import cli as gateway_cli
from kvrouter.gateway import server as server_module
from kvrouter.gateway.config import GatewayConfig, WorkerSpec


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[GatewayConfig]:
    configs: list[GatewayConfig] = []

    def fake_run(cfg: GatewayConfig, log_level: str) -> None:
        configs.append(cfg)

    monkeypatch.setattr(gateway_cli, "_run_async", fake_run)
    for name in ("KVROUTER_PORT", "KVROUTER_WORKERS", "KVROUTER_CONFIG", "KVROUTER_ROUTER_MODE"):
        monkeypatch.delenv(name, raising=False)
    return configs


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, args, env=env)


def test_space_separated_workers_and_flags(captured: list[GatewayConfig]) -> None:
    result = invoke(
        [
            "serve", "--port", "9000",
            "--workers", "http://127.0.0.1:8001", "http://127.0.0.1:8002,kv_events=tcp://127.0.0.1:5557",
            "--router-mode", "round_robin", "--overlap-weight", "2",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (cfg,) = captured
    assert cfg.port == 9000
    assert cfg.router_mode == "round_robin"
    assert cfg.overlap_weight == 2.0
    assert cfg.workers == (
        WorkerSpec("http://127.0.0.1:8001"),
        WorkerSpec("http://127.0.0.1:8002", kv_events="tcp://127.0.0.1:5557"),
    )


def test_flags_override_env_and_file(captured: list[GatewayConfig], tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("port: 7000\ntemperature: 0.5\nworkers: [http://file:1]\n")
    result = invoke(
        ["serve", "--config", str(path), "--temperature", "0.25"],
        env={"KVROUTER_PORT": "7100"},
    )
    assert result.exit_code == 0, result.output
    (cfg,) = captured
    assert (cfg.port, cfg.temperature, cfg.workers) == (7100, 0.25, (WorkerSpec("http://file:1"),))


def test_bad_settings_exit_with_a_clear_message(captured: list[GatewayConfig]) -> None:
    result = invoke(["serve", "--router-mode", "fastest"])
    assert result.exit_code == 2
    assert "router_mode must be one of" in result.output
    result = invoke(["serve", "--workers", "http://a:1", "--prot", "1"])
    assert result.exit_code == 2
    assert "unknown option(s): --prot" in result.output
    assert captured == []


def test_every_setting_has_a_flag(captured: list[GatewayConfig]) -> None:
    result = invoke(
        [
            "serve", "--health-check-timeout-s", "0.5", "--connect-timeout-s", "1.5",
            "--max-connections", "64", "--retry-after-s", "3", "--decision-history", "32",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (cfg,) = captured
    assert cfg.health_check_timeout_s == 0.5
    assert cfg.connect_timeout_s == 1.5
    assert cfg.max_connections == 64
    assert cfg.retry_after_s == 3.0
    assert cfg.decision_history == 32
    # Each parameter of ``serve`` is a flag: no setting is left to YAML and env only.
    serve_flags = set(inspect.signature(gateway_cli.serve).parameters)
    assert {f.name for f in fields(GatewayConfig)} <= serve_flags


def test_new_flags_are_checked(captured: list[GatewayConfig]) -> None:
    result = invoke(["serve", "--max-connections", "0"])
    assert result.exit_code == 2
    assert result.stderr == "error: max_connections must be positive, got 0\n"
    assert captured == []


def test_a_missing_tokenizer_lists_the_accepted_values(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The real start-up, which fails on the tokenizer before it listens.
    monkeypatch.setattr(server_module, "install_uvloop", lambda: False)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    for name in ("KVROUTER_CONFIG", "KVROUTER_TOKENIZER", "KVROUTER_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "missing" / "path"
    result = invoke(["serve", "--port", "0", "--tokenizer", str(missing)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: tokenizer '{missing}' does not exist; give 'builtin', 'worker', 'byte' "
        "or the path of a tokenizer.json (or of a folder holding one)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "notaurl"], "--url must be an http:// or https:// URL"),
        (["--interval", "0"], "--interval must be positive"),
    ],
)
def test_top_refuses_bad_options_at_once(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["top", *args])
    assert result.exit_code == 2
    assert message in result.stderr


def test_run_needs_at_least_one_worker() -> None:
    result = CliRunner().invoke(app, ["run", "--num-workers", "0"])
    assert result.exit_code == 2
    assert "--num-workers must be at least 1, got 0" in result.stderr


async def test_serving_without_workers_warns_how_to_add_them(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def no_wait() -> None:
        return None

    monkeypatch.setattr(server_module, "wait_for_signal", no_wait)
    with caplog.at_level(logging.WARNING, logger="kvrouter.gateway.server"):
        await server_module.serve_forever(GatewayConfig(port=0))
    assert any("no workers configured" in m and "/admin/workers" in m for m in caplog.messages)
