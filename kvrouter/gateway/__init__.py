"""The gateway: ``kvrouter serve`` / ``kvrouter run`` (see ``docs/gateway.md``).

Only the light config names are imported here, so ``kvrouter --help`` stays fast; the
server is :class:`kvrouter.gateway.server.GatewayServer`.
"""

from __future__ import annotations

from kvrouter.gateway.config import GatewayConfig, WorkerSpec, build_config, parse_worker_spec

__all__ = ["GatewayConfig", "WorkerSpec", "build_config", "parse_worker_spec"]
