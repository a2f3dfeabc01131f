"""Small aiohttp servers for integration tests."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web

from kvrouter.engine.http import bound_port


async def serve_app(stack: AsyncExitStack, app: web.Application, **runner_options: Any) -> str:
    """Serve ``app`` on a free loopback port until ``stack`` closes; returns its base URL."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    stack.push_async_callback(runner.cleanup)
    return f"http://127.0.0.1:{bound_port(runner, 0)}"
