"""Config precedence (flags > env > file > defaults) and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrouter.errors import ConfigError
from kvrouter.gateway.config import GatewayConfig, WorkerSpec, build_config, parse_worker_spec


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_given() -> None:
    cfg = build_config(flags={}, env={})
    assert cfg == GatewayConfig()
    assert cfg.port == 8000
    assert cfg.router_mode == "kv"
    assert cfg.workers == ()


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path, "port: 7000\noverlap_weight: 3.0\ntemperature: 0.2\nblock_size: 32\n"
    )
    env = {"KVROUTER_PORT": "7100", "KVROUTER_OVERLAP_WEIGHT": "2.5"}
    cfg = build_config(flags={"port": 7200, "temperature": None}, env=env, file=path)
    assert cfg.port == 7200  # flag
    assert cfg.overlap_weight == 2.5  # env over file
    assert cfg.temperature == 0.2  # file (the flag was not given)
    assert cfg.block_size == 32  # file
    assert cfg.max_retries == 2  # default


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "router_mode: round_robin\n")
    cfg = build_config(flags={}, env={"KVROUTER_CONFIG": str(path)})
    assert cfg.router_mode == "round_robin"


def test_workers_from_each_source(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "workers:\n"
        "  - http://10.0.0.1:8000\n"
        "  - url: http://10.0.0.2:8000\n"
        "    kv_events: tcp://10.0.0.2:5557\n"
        "    replay: tcp://10.0.0.2:5558\n"
        "    dp_rank: 1\n"
        "    worker_id: 9\n",
    )
    from_file = build_config(flags={}, env={}, file=path)
    assert from_file.workers == (
        WorkerSpec("http://10.0.0.1:8000"),
        WorkerSpec(
            "http://10.0.0.2:8000",
            kv_events="tcp://10.0.0.2:5557",
            replay="tcp://10.0.0.2:5558",
            dp_rank=1,
            worker_id=9,
        ),
    )
    env = {"KVROUTER_WORKERS": "http://a:1 http://b:2,kv_events=tcp://b:5557"}
    from_env = build_config(flags={}, env=env, file=path)
    assert from_env.workers == (
        WorkerSpec("http://a:1"),
        WorkerSpec("http://b:2", kv_events="tcp://b:5557"),
    )
    from_flags = build_config(flags={"workers": ["http://c:3/"]}, env=env, file=path)
    assert from_flags.workers == (WorkerSpec("http://c:3"),)
    # An empty flag list means "not given".
    assert build_config(flags={"workers": []}, env=env).workers == from_env.workers


def test_worker_spec_string_options() -> None:
    spec = parse_worker_spec("http://h:8001,kv_events=tcp://h:5557,replay=tcp://h:5558,dp_rank=2")
    assert spec == WorkerSpec(
        "http://h:8001", kv_events="tcp://h:5557", replay="tcp://h:5558", dp_rank=2
    )


def test_worker_spec_mapping_checks_types_and_normalises_the_url() -> None:
    spec = parse_worker_spec({"url": "HTTP://LocalHost:8001/", "worker_id": 7, "dp_rank": "1"})
    assert spec == WorkerSpec("http://localhost:8001", worker_id=7, dp_rank=1)
    assert parse_worker_spec("http://h:80").url == parse_worker_spec("http://h").url == "http://h"
    assert parse_worker_spec("https://h:443/p").url == "https://h/p"
    assert parse_worker_spec("http://[::1]:8001/vllm,kv_events=ipc:///tmp/kv").url == (
        "http://[::1]:8001/vllm"
    )
    for bad in (70.0, True, "7x", -1):
        with pytest.raises(ConfigError, match="worker_id"):
            parse_worker_spec({"url": "http://h:1", "worker_id": bad})


def test_worker_spec_nats_endpoints() -> None:
    spec = parse_worker_spec(
        "http://h:8001,kv_events=nats://n:4222/kvr.events.w1,metrics=nats://n:4222/kvr.metrics.w1"
    )
    assert spec == WorkerSpec(
        "http://h:8001",
        kv_events="nats://n:4222/kvr.events.w1",
        metrics="nats://n:4222/kvr.metrics.w1",
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://h:1", "http"),
        ("http://h:1,colour=blue", "unknown worker option"),
        ("http://h:1,dp_rank=x", "dp_rank must be an integer"),
        ("http://h:1,kv_events=h:5557", "tcp://"),
        ("http://h:1,justaword", "not key=value"),
        ("http://h:1,kv_events=nats://h:4222", "worker kv_events: a NATS endpoint looks like"),
        ("http://h:1,metrics=nats://h:4222/a/b", "worker metrics: a NATS endpoint"),
        ("http://exa mple:80", "spaces or control characters"),
        ("http://h:1\nX-Evil: 1", "spaces or control characters"),
        ("http://h:99999", "out of range"),
        ("http://h:1/v1", "without /v1"),
        ("http://h:1/?x=1", "only scheme, host, port"),
        ("http://user:pw@h:1", "worker_api_key"),
        ("http://h:1,worker_id=-3", "worker_id must be between 0 and"),
        ("http://h:1,worker_id=³", "worker_id must be an integer"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://h:0", "port 0"),
        (f"http://h:1,worker_id={2**64}", "between 0 and"),
        ("http://h:1,dp_rank=100000", "dp_rank must be between 0 and 65535"),
        ("http://h:1,kv_events=tcp://h:999999", "expected tcp://host:port"),
        ("http://h:1,kv_events=udp://h:5", "expected tcp://, ipc:// or nats://"),
        ("http://h:1,replay=tcp://h:5558", "needs its kv_events"),
    ],
)
def test_bad_worker_specs(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_worker_spec(value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVROUTER_PORT": "eighty"}, "port must be an integer"),
        ({"KVROUTER_PORT": "70000"}, "port must be in"),
        ({"KVROUTER_ROUTER_MODE": "fastest"}, "router_mode must be one of"),
        ({"KVROUTER_TEMPERATURE": "-1"}, "temperature must be >= 0"),
        ({"KVROUTER_BLOCK_SIZE": "0"}, "block_size must be positive"),
        ({"KVROUTER_DECISION_LOG_SAMPLE_RATE": "2"}, "decision_log_sample_rate"),
        ({"KVROUTER_BUSY_KV_USAGE": "1.5"}, "busy_kv_usage"),
        ({"KVROUTER_MAX_RETRIES": "1.5"}, "max_retries must be an integer"),
        ({"KVROUTER_STREAM_IDLE_TIMEOUT_S": "0"}, "stream_idle_timeout_s must be positive"),
        ({"KVROUTER_API_KEY": " padded"}, "api_key must be a non-empty string"),
        ({"KVROUTER_WORKER_API_KEY": "two\nlines"}, "worker_api_key must be"),
    ],
)
def test_bad_values_raise_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(flags={}, env=env)


def test_keys_come_from_the_environment_and_stay_out_of_repr() -> None:
    env = {"KVROUTER_API_KEY": "client-secret", "KVROUTER_WORKER_API_KEY": "worker-secret"}
    cfg = build_config(flags={}, env=env)
    assert (cfg.api_key, cfg.admin_api_key, cfg.worker_api_key) == (
        "client-secret",
        None,
        "worker-secret",
    )
    assert "secret" not in repr(cfg)
    # A bad key is refused without echoing it.
    with pytest.raises(ConfigError) as info:
        build_config(flags={}, env={"KVROUTER_ADMIN_API_KEY": "bad\tsecret"})
    assert "secret" not in str(info.value)


def test_unknown_keys_in_file_are_named(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "prot: 8000\n")
    with pytest.raises(ConfigError, match=r"unknown setting.*prot"):
        build_config(flags={}, env={}, file=path)


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(flags={}, env={}, file=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(flags={}, env={}, file=write_yaml(tmp_path, "port: [1,\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(flags={}, env={}, file=write_yaml(tmp_path, "- 1\n- 2\n"))


def test_unrelated_environment_is_ignored() -> None:
    cfg = build_config(flags={}, env={"KVROUTER_NOT_A_SETTING": "1", "PORT": "1"})
    assert cfg.port == 8000


def test_optional_settings_accept_none() -> None:
    cfg = build_config(flags={}, env={"KVROUTER_BUSY_KV_USAGE": "0.9"})
    assert cfg.busy_kv_usage == 0.9
    cfg = build_config(flags={}, env={"KVROUTER_BUSY_KV_USAGE": "none"})
    assert cfg.busy_kv_usage is None


def test_duplicate_worker_ids_rejected() -> None:
    with pytest.raises(ConfigError, match="used twice"):
        build_config(
            flags={"workers": ["http://a:1,worker_id=1", "http://b:1,worker_id=1"]}, env={}
        )


def test_prefix_affinity_mode_takes_its_cache_weight() -> None:
    from kvrouter.gateway.kvcore import build_policy
    from kvrouter.routing import PrefixAffinityPolicy

    cfg = build_config(flags={"router_mode": "prefix_affinity", "cache_weight": 4.0})
    policy = build_policy(cfg)
    assert isinstance(policy, PrefixAffinityPolicy)
    assert policy.cache_weight == 4.0
    with pytest.raises(ConfigError, match="cache_weight"):
        build_config(flags={"cache_weight": -1.0})


def test_router_queue_settings_from_env_and_checks() -> None:
    env = {"KVROUTER_ROUTER_QUEUE_THRESHOLD": "4", "KVROUTER_ROUTER_QUEUE_POLICY": "wspt"}
    cfg = build_config(flags={"router_queue_max_pending": 100}, env=env)
    assert (cfg.router_queue_threshold, cfg.router_queue_policy) == (4.0, "wspt")
    assert (cfg.router_queue_max_pending, cfg.max_num_batched_tokens) == (100, 8192)
    assert build_config(flags={}, env={}).router_queue_threshold is None
    with pytest.raises(ConfigError, match="router_queue_policy must be fcfs or wspt"):
        GatewayConfig(router_queue_policy="lifo")
    with pytest.raises(ConfigError, match="router_queue_threshold must be positive"):
        GatewayConfig(router_queue_threshold=0)
    with pytest.raises(ConfigError, match="max_num_batched_tokens must be positive"):
        GatewayConfig(max_num_batched_tokens=0)
