"""The lifecycle every long-lived component shares: ``async with`` = start, then aclose.

>>> class Worker(AsyncLifecycle):
...     async def start(self) -> None: ...
...     async def aclose(self) -> None: ...

Background tasks are stopped with :func:`cancel_and_wait`, never with the common
``task.cancel(); with suppress(CancelledError): await task``: that idiom swallows a
cancellation of the *caller*, and it waits forever on a task that lost its own
cancellation (on CPython 3.11, ``asyncio.wait_for`` drops a cancel that arrives as its
inner awaitable finishes).
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, Self

__all__ = ["AsyncLifecycle", "cancel_and_wait"]

log = logging.getLogger(__name__)


class AsyncLifecycle:
    """Mixin: entering starts the component, leaving closes it (``aclose`` is idempotent
    in every implementation, so an explicit close inside the block is harmless)."""

    async def start(self) -> None:
        """Acquire resources and start background tasks (nothing by default)."""

    async def aclose(self) -> None:
        """Stop background tasks and release resources (nothing by default)."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, grace_s: float = 1.0) -> None:
    """Cancel ``tasks`` (``None`` entries are skipped) and return once all have ended.

    A task still running ``grace_s`` after its cancel has lost or ignored it: it is
    logged and cancelled again, so shutting down cannot hang on it. The tasks' results
    and exceptions are discarded; a cancellation of the caller propagates as usual.
    """
    given = [t for t in tasks if t is not None]
    pending = {task for task in given if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=grace_s)
        for task in pending:
            log.warning("%r did not end %.1f s after its cancel; cancelling again", task, grace_s)
    for task in given:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
