"""Helpers shared by the transport tests (unit and integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

BLOCK_SIZE = 4


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.005)


def tokens(start: int, num_blocks: int) -> list[int]:
    """Distinct token ids for ``num_blocks`` blocks."""
    return list(range(start, start + num_blocks * BLOCK_SIZE))
