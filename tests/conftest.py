"""Shared test fixtures."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA_DIR = Path(
    os.environ.get("KVROUTER_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
)
TRACE_PATH = DATA_DIR / "mooncake_conversation_trace.jsonl"


@pytest.fixture
def trace_path() -> Path:
    if not TRACE_PATH.exists():
        pytest.skip(f"shared trace not found at {TRACE_PATH} (set KVROUTER_DATA_DIR)")
    return TRACE_PATH


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback TCP port that something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]
