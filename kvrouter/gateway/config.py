"""Gateway settings: one frozen value built from flags, environment and a YAML file.

Precedence, highest first::

    command-line flags  >  KVROUTER_* environment variables  >  YAML file (--config)  >  defaults

Every setting has the same name in all three places: ``--overlap-weight`` on the
command line, ``KVROUTER_OVERLAP_WEIGHT`` in the environment, ``overlap_weight:`` in
YAML. A worker is written as a URL optionally followed by comma-separated options::

    http://127.0.0.1:8001,kv_events=tcp://127.0.0.1:5557,replay=tcp://127.0.0.1:5558,dp_rank=0,worker_id=7

or, in YAML, as a mapping with the same keys (``url`` plus options).

>>> cfg = build_config(flags={"port": 9000}, env={"KVROUTER_PORT": "9100"})
>>> cfg.port
9000
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kvrouter.errors import ConfigError
from kvrouter.events.model import MAX_DP_RANK
from kvrouter.transport.nats_transport import is_nats_endpoint, split_nats_endpoint

__all__ = [
    "ENV_PREFIX",
    "ROUTER_MODES",
    "TOKENIZER_BUILTIN",
    "TOKENIZER_WORKER",
    "GatewayConfig",
    "WorkerSpec",
    "build_config",
    "parse_worker_spec",
]

ENV_PREFIX = "KVROUTER_"
# The built-in policies of kvrouter.routing.policies. A request can name its worker
# under any of them; under ``direct`` every request must.
ROUTER_MODES = (
    "kv",
    "score",
    "prefix_affinity",
    "random",
    "round_robin",
    "power_of_two",
    "least_loaded",
    "direct",
)
TOKENIZER_BUILTIN = "builtin"
TOKENIZER_WORKER = "worker"

_WORKER_OPTION_KEYS = ("kv_events", "replay", "metrics", "dp_rank", "worker_id")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker as configured: its HTTP base URL and optional event endpoints.

    ``kv_events`` is the worker's ZMQ PUB endpoint (vLLM ``--kv-events-config``), ``replay``
    its ROUTER replay endpoint; with neither the worker is routed in approximate mode
    (predicted cache entries only). ``metrics`` is an optional ZMQ endpoint of pushed
    ``ForwardPassMetrics``; without it the gateway scrapes ``{url}/metrics``. Any of the
    three may instead be a NATS subject, ``nats://host:port/subject`` (a NATS event
    stream's replay subject defaults to ``subject.replay``).
    """

    url: str
    kv_events: str | None = None
    replay: str | None = None
    metrics: str | None = None
    dp_rank: int = 0
    worker_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-friendly mapping (the admin API's input and output shape)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Every setting of ``kvrouter serve``; see ``docs/gateway.md`` for the table."""

    host: str = "127.0.0.1"
    port: int = 8000
    workers: tuple[WorkerSpec, ...] = ()
    router_mode: str = "kv"
    router_policy: str | None = None
    overlap_weight: float = 1.0
    temperature: float = 0.0
    weight_cache: float = 1.0
    weight_load: float = 1.0
    cache_weight: float = 16.0
    block_size: int = 16
    tokenizer: str = TOKENIZER_BUILTIN
    chat_template: str | None = None
    busy_kv_usage: float | None = None
    busy_queue_depth: int | None = None
    router_queue_threshold: float | None = None
    router_queue_policy: str = "fcfs"
    router_queue_max_pending: int | None = None
    max_num_batched_tokens: int = 8192
    max_body_bytes: int = 16 * 1024 * 1024
    max_prompt_tokens: int = 131_072
    metrics_scrape_interval_s: float = 1.0
    health_check_interval_s: float = 2.0
    health_check_timeout_s: float = 2.0
    request_timeout_s: float = 300.0
    stream_idle_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    connect_timeout_s: float = 5.0
    max_retries: int = 2
    predicted_ttl_s: float = 120.0
    decision_log_sample_rate: float = 0.0
    max_connections: int = 1024
    retry_after_s: float = 1.0
    decision_history: int = 256
    # Secrets: kept out of repr() so that a logged config shows no key.
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    worker_api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _validate(self)


def _validate(cfg: GatewayConfig) -> None:
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port must be in 0..65535, got {cfg.port}")
    if cfg.router_mode not in ROUTER_MODES:
        raise ConfigError(
            f"router_mode must be one of {', '.join(ROUTER_MODES)}; got {cfg.router_mode!r}"
        )
    if cfg.block_size <= 0:
        raise ConfigError(f"block_size must be positive, got {cfg.block_size}")
    for name in ("overlap_weight", "temperature", "weight_cache", "weight_load", "cache_weight"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in (
        "max_body_bytes",
        "max_prompt_tokens",
        "max_connections",
        "decision_history",
        "max_num_batched_tokens",
    ):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in (
        "metrics_scrape_interval_s",
        "health_check_interval_s",
        "health_check_timeout_s",
        "request_timeout_s",
        "stream_idle_timeout_s",
        "connect_timeout_s",
        "predicted_ttl_s",
        "retry_after_s",
    ):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.shutdown_grace_s < 0:
        raise ConfigError(f"shutdown_grace_s must be >= 0, got {cfg.shutdown_grace_s}")
    if cfg.max_retries < 0:
        raise ConfigError(f"max_retries must be >= 0, got {cfg.max_retries}")
    if not 0.0 <= cfg.decision_log_sample_rate <= 1.0:
        raise ConfigError(
            f"decision_log_sample_rate must be in 0..1, got {cfg.decision_log_sample_rate}"
        )
    if cfg.busy_kv_usage is not None and not 0.0 < cfg.busy_kv_usage <= 1.0:
        raise ConfigError(f"busy_kv_usage must be in (0, 1], got {cfg.busy_kv_usage}")
    if cfg.busy_queue_depth is not None and cfg.busy_queue_depth < 0:
        raise ConfigError(f"busy_queue_depth must be >= 0, got {cfg.busy_queue_depth}")
    if cfg.router_queue_threshold is not None and cfg.router_queue_threshold <= 0:
        raise ConfigError(
            f"router_queue_threshold must be positive, got {cfg.router_queue_threshold}"
        )
    if cfg.router_queue_policy not in ("fcfs", "wspt"):
        raise ConfigError(
            f"router_queue_policy must be fcfs or wspt, got {cfg.router_queue_policy!r}"
        )
    if cfg.router_queue_max_pending is not None and cfg.router_queue_max_pending < 0:
        raise ConfigError(
            f"router_queue_max_pending must be >= 0, got {cfg.router_queue_max_pending}"
        )
    for name in ("api_key", "admin_api_key", "worker_api_key"):
        key = getattr(cfg, name)
        if key is not None and (not key or key != key.strip() or any(c < " " for c in key)):
            raise ConfigError(
                f"{name} must be a non-empty string without spaces around it or control characters"
            )
    _validate_workers(cfg.workers)


def _validate_workers(workers: tuple[WorkerSpec, ...]) -> None:
    seen: set[tuple[int, int]] = set()
    for spec in workers:
        if spec.worker_id is None:
            continue
        key = (spec.worker_id, spec.dp_rank)
        if key in seen:
            raise ConfigError(f"worker_id {spec.worker_id} (dp_rank {spec.dp_rank}) is used twice")
        seen.add(key)


# -- workers -------------------------------------------------------------------------


def parse_worker_spec(value: str | Mapping[str, Any] | WorkerSpec) -> WorkerSpec:
    """A :class:`WorkerSpec` from ``"URL,key=value,..."`` or a mapping with ``url``.

    >>> parse_worker_spec("http://h:8001,kv_events=tcp://h:5557,dp_rank=1").dp_rank
    1
    """
    if isinstance(value, WorkerSpec):
        return value
    if isinstance(value, str):
        url, _, rest = value.strip().partition(",")
        options: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, val = item.partition("=")
            if not sep:
                raise ConfigError(f"worker option {item!r} in {value!r} is not key=value")
            options[key.strip()] = val.strip()
        return _worker_from_mapping({"url": url, **options})
    if isinstance(value, Mapping):
        return _worker_from_mapping(value)
    raise ConfigError(f"a worker must be a URL string or a mapping, got {type(value).__name__}")


def _worker_from_mapping(data: Mapping[str, Any]) -> WorkerSpec:
    unknown = set(data) - {"url", *_WORKER_OPTION_KEYS}
    if unknown:
        raise ConfigError(
            f"unknown worker option(s) {', '.join(sorted(unknown))}; "
            f"known: url, {', '.join(_WORKER_OPTION_KEYS)}"
        )
    endpoints = {key: _endpoint(key, data.get(key)) for key in ("kv_events", "replay", "metrics")}
    if endpoints["replay"] and not endpoints["kv_events"]:
        raise ConfigError("a worker's replay endpoint needs its kv_events endpoint too")
    worker_id = data.get("worker_id")
    return WorkerSpec(
        url=_worker_url(data.get("url")),
        dp_rank=_bounded_int("dp_rank", data.get("dp_rank", 0), MAX_DP_RANK),
        worker_id=None if worker_id in (None, "") else _bounded_int("worker_id", worker_id),
        **endpoints,
    )


MAX_WORKER_ID = 2**63 - 1  # a signed 64-bit id, as Dynamo's


def _worker_url(value: Any) -> str:
    """A worker's base URL, checked and with its scheme and host in lower case."""
    url = str(value or "").strip().rstrip("/")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ConfigError(f"worker url must not contain spaces or control characters: {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port out of range
    except ValueError as exc:  # e.g. "http://[::1" or a port of 99999
        raise ConfigError(f"worker url {url!r}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"worker url {url!r}: port 0 is not a port a worker listens on")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"worker url must be http(s)://host:port, got {url!r}")
    if parts.query or parts.fragment or parts.username is not None:
        raise ConfigError(
            f"worker url {url!r}: give only scheme, host, port and an optional path "
            "(a worker's API key goes in worker_api_key)"
        )
    if parts.path.endswith("/v1"):
        raise ConfigError(f"worker url {url!r}: give the server's root, without /v1")
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    return f"{scheme}://{netloc}{parts.path}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _endpoint(key: str, value: Any) -> str | None:
    """A KV event, replay or metrics endpoint: ``tcp://host:port``, ``ipc://path`` or NATS."""
    endpoint = _opt_str(value)
    if endpoint is None:
        return None
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest or any(c.isspace() for c in endpoint):
        raise ConfigError(
            f"worker {key} endpoint must look like tcp://host:port or "
            f"nats://host:port/subject, got {endpoint!r}"
        )
    if is_nats_endpoint(endpoint):
        try:
            split_nats_endpoint(endpoint)
        except ValueError as exc:
            raise ConfigError(f"worker {key}: {exc}") from exc
    elif scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"worker {key} endpoint {endpoint!r}: expected tcp://host:port")
    elif scheme != "ipc":
        raise ConfigError(f"worker {key} endpoint {endpoint!r}: expected tcp://, ipc:// or nats://")
    return endpoint


def _opt_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _bounded_int(name: str, value: Any, most: int = MAX_WORKER_ID) -> int:
    """A whole number in ``0..most``: an int, or a string of one (from a flag)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdecimal() and text.isascii():
            value = int(text)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not 0 <= value <= most:
        raise ConfigError(f"{name} must be between 0 and {most}, got {value}")
    return value


# -- sources -------------------------------------------------------------------------


_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(GatewayConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a raw value (a string from env, anything from YAML) into the field's type."""
    kind = _FIELD_TYPES[name]
    if name == "workers":
        return _coerce_workers(value)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if "None" in kind:
            return None
        raise ConfigError(f"{name} must be set, got {value!r}")
    try:
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
    except (TypeError, ValueError) as exc:
        expected = "an integer" if kind.startswith("int") else "a number"
        raise ConfigError(f"{name} must be {expected}, got {value!r}") from exc
    return str(value)


def _coerce_workers(value: Any) -> tuple[WorkerSpec, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        # In the environment, workers are separated by whitespace (commas belong to a spec).
        return tuple(parse_worker_spec(item) for item in value.split())
    if isinstance(value, list | tuple):
        return tuple(parse_worker_spec(item) for item in value)
    raise ConfigError(f"workers must be a list, got {type(value).__name__}")


def _read_file(path: Path | str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG":
            name = key[len(ENV_PREFIX) :].lower()
            if name in _FIELD_TYPES:
                out[name] = value
    return out


def _check_names(source: str, values: Mapping[str, Any]) -> None:
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {source}: {', '.join(unknown)}")


def build_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | str | None = None,
) -> GatewayConfig:
    """Merge the sources (flags > env > file > defaults) into a validated config.

    ``flags`` holds only the settings given on the command line (``None`` values are
    ignored, so a CLI can pass every option). ``env`` defaults to :data:`os.environ`;
    ``file`` defaults to ``$KVROUTER_CONFIG`` when set.
    """
    env = os.environ if env is None else env
    if file is None and env.get(ENV_PREFIX + "CONFIG"):
        file = env[ENV_PREFIX + "CONFIG"]
    file_values = _read_file(file)
    _check_names(f"config file {file}", file_values)
    flag_values = {k: v for k, v in (flags or {}).items() if v is not None}
    _check_names("flags", flag_values)
    if flag_values.get("workers") == []:
        del flag_values["workers"]
    merged: dict[str, Any] = {}
    for source in (file_values, _read_env(env), flag_values):
        for name, value in source.items():
            merged[name] = _coerce(name, value)
    try:
        return GatewayConfig(**merged)
    except TypeError as exc:  # pragma: no cover - names are checked above
        raise ConfigError(str(exc)) from exc


def with_workers(cfg: GatewayConfig, workers: tuple[WorkerSpec, ...]) -> GatewayConfig:
    """A copy of ``cfg`` with another worker list (validated)."""
    return dataclasses.replace(cfg, workers=workers)
